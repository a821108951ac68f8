"""`Metrics`: exact per-view counters for scripted streams, and the Prometheus export."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route
from support.apps import app_for

from sseviews import Broadcast, DisconnectReason, Event, EventStreamView, Metrics
from sseviews.testing import EventStream, EventStreamClient

pytestmark = pytest.mark.anyio

TIMEOUT = 3.0
NO_DISCONNECTS = {reason.value: 0 for reason in DisconnectReason}


def disconnects(**counts: int) -> dict[str, int]:
    return {**NO_DISCONNECTS, **counts}


class Scripted(EventStreamView):
    """Yields `?n=` events of growing (multi-byte) size, then ends as `?end=` says."""

    ping_interval = None

    async def events(self) -> AsyncIterator[Any]:
        query = self.request.query_params
        for i in range(int(query["n"])):
            yield Event({"i": i, "text": "é€" * i}, event="tick", id=str(i))
        ending = query.get("end", "completed")
        if ending == "error":
            raise RuntimeError("boom")
        if ending == "wait":
            await anyio.sleep_forever()


def room_view(broadcast: Broadcast, metrics: Metrics, *, relay: bool) -> type[EventStreamView]:
    """Streams group "room" directly, or (`relay`) through an overridden events()."""

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        async for event in self.subscription:
            yield event

    namespace: dict[str, Any] = {
        "broadcast": broadcast,
        "groups": ["room"],
        "ping_interval": None,
        "metrics": metrics,
    }
    if relay:
        namespace["events"] = events
    return type("Room", (EventStreamView,), namespace)


async def read(stream: EventStream, count: int) -> list[Event]:
    return [await stream.next_event(timeout=TIMEOUT) for _ in range(count)]


# -- exact counts -----------------------------------------------------------------------------


async def test_metrics_generator_view_counts_exactly() -> None:
    metrics = Metrics()
    view = type("Scripted", (Scripted,), {"metrics": metrics})
    received: list[bytes] = []
    async with EventStreamClient(view, timeout=TIMEOUT) as client:
        async with client.stream("/?n=3&end=completed") as stream:
            await stream.wait_ended()
            assert len([e async for e in stream]) == 3
        received.append(stream.raw)
        async with client.stream("/?n=2&end=wait") as stream:
            assert [e.id for e in await read(stream, 2)] == ["0", "1"]
            counters = metrics.snapshot()["Scripted"]
            assert (counters["open"], counters["streams"]) == (1, 2)
        received.append(stream.raw)
        async with client.stream("/?n=4&end=error") as stream:
            await stream.wait_ended()
            names = [e.event async for e in stream]
            assert names == ["tick"] * 4 + ["sseviews.error"]  # not counted as an event
        received.append(stream.raw)
        async with client.stream("/?n=1&end=wait") as stream:
            await read(stream, 1)
            await client.shutdown()
        received.append(stream.raw)
    snapshot = metrics.snapshot()
    assert snapshot == {
        "Scripted": {
            "open": 0,
            "streams": 4,
            "events": 3 + 2 + 4 + 1,
            "bytes": sum(len(raw) for raw in received),
            "pings": 0,
            "disconnects": disconnects(client_closed=1, completed=1, shutdown=1, error=1),
            "refused": {},
        }
    }
    # The body held only events (and the error's sseviews.error): nothing else was written.
    errors = [raw.count(b"event: sseviews.error\n") for raw in received]
    assert errors == [0, 0, 1, 0]
    assert all(
        raw.count(b"\n\n") == raw.count(b"event: tick\n") + error
        for raw, error in zip(received, errors, strict=True)
    )
    assert json.loads(json.dumps(snapshot)) == snapshot


async def test_metrics_counts_every_event_of_batched_writes() -> None:
    # A generator that never waits is written in few large sends; each event still counts.
    metrics = Metrics()

    class Burst(EventStreamView):
        ping_interval = None

        async def events(self) -> AsyncIterator[Any]:
            for i in range(500):
                yield "x" * (i % 700)

    Burst.metrics = metrics
    async with EventStreamClient(Burst, timeout=TIMEOUT) as client:
        async with client.stream("/") as stream:
            await stream.wait_ended()
            assert len([e async for e in stream]) == 500
    counters = metrics.snapshot()["Burst"]
    assert counters["events"] == 500
    assert counters["bytes"] == len(stream.raw)
    assert counters["disconnects"] == disconnects(completed=1)


@pytest.mark.parametrize("relay", [False, True], ids=["direct", "relay"])
async def test_metrics_broadcast_fan_out_counts_each_client(relay: bool) -> None:
    metrics = Metrics()
    broadcast = Broadcast("memory://")
    app = app_for(broadcast, Route("/room", room_view(broadcast, metrics, relay=relay)))
    async with EventStreamClient(app, timeout=TIMEOUT) as client, AsyncExitStack() as open_:
        streams = [await open_.enter_async_context(client.stream("/room")) for _ in range(3)]
        assert metrics.snapshot()["Room"]["open"] == 3
        ids = [await broadcast.publish("room", {"n": n, "pad": "ü" * n}) for n in range(2)]
        await broadcast.publish("elsewhere", "not counted")
        for stream in streams:
            assert [e.id for e in await read(stream, 2)] == ids
        counters = metrics.snapshot()["Room"]
        assert counters["events"] == 2 * 3
        assert counters["bytes"] == sum(len(stream.raw) for stream in streams)
    counters = metrics.snapshot()["Room"]
    assert counters["open"] == 0
    assert counters["streams"] == 3
    assert counters["events"] == 6
    assert counters["disconnects"] == disconnects(client_closed=3)


@pytest.mark.parametrize("relay", [False, True], ids=["direct", "relay"])
async def test_metrics_replay_backlog_counted(relay: bool) -> None:
    metrics = Metrics()
    broadcast = Broadcast("memory://")
    app = app_for(broadcast, Route("/room", room_view(broadcast, metrics, relay=relay)))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        ids = [await broadcast.publish("room", f"missed {n}") for n in range(4)]
        async with client.stream("/room", headers={"Last-Event-ID": ids[0]}) as stream:
            assert [e.id for e in await read(stream, 3)] == ids[1:]
            live = await broadcast.publish("room", "live")
            assert [e.id for e in await read(stream, 1)] == [live]
            counters = metrics.snapshot()["Room"]
            assert counters["events"] == 3 + 1
            assert counters["bytes"] == len(stream.raw)


@pytest.mark.parametrize("relay", [False, True], ids=["direct", "relay"])
async def test_metrics_events_written_to_a_paused_client_counted(relay: bool) -> None:
    # Direct: the first event offered while the client is not reading starts a send
    # that blocks, and the writer task finishes it later. It is sent, so it counts.
    metrics = Metrics()
    broadcast = Broadcast("memory://")
    app = app_for(broadcast, Route("/room", room_view(broadcast, metrics, relay=relay)))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/room") as stream:
            stream.pause()
            ids = [await broadcast.publish("room", f"event {n}") for n in range(3)]
            await anyio.sleep(0.05)
            stream.resume()
            assert [e.id for e in await read(stream, 3)] == ids
        counters = metrics.snapshot()["Room"]
        assert (counters["events"], counters["bytes"]) == (3, len(stream.raw))


async def test_metrics_pings_counted_with_their_bytes() -> None:
    metrics = Metrics()

    class Quiet(EventStreamView):
        ping_interval = 0.05

        async def events(self) -> AsyncIterator[Any]:
            yield "hello"
            await anyio.sleep(0.4)

    Quiet.metrics = metrics
    async with EventStreamClient(Quiet, timeout=TIMEOUT) as client:
        async with client.stream("/") as stream:
            await stream.wait_ended()
    counters = metrics.snapshot()["Quiet"]
    assert len(stream.comments) >= 3
    assert set(stream.comments) == {"ping"}
    assert counters["pings"] == len(stream.comments)
    assert counters["events"] == 1
    assert counters["bytes"] == len(stream.raw)
    assert counters["disconnects"] == disconnects(completed=1)


async def test_metrics_bytes_include_the_retry_line() -> None:
    # bytes_sent_total is documented as "Body bytes written"; pings count, and so
    # must the `retry:` line every stream of a view with `retry` starts with.
    metrics = Metrics()

    class Retrying(EventStreamView):
        ping_interval = None
        retry = 2500

        async def events(self) -> AsyncIterator[Any]:
            yield "hello"

    Retrying.metrics = metrics
    async with EventStreamClient(Retrying, timeout=TIMEOUT) as client:
        async with client.stream("/") as stream:
            await stream.wait_ended()
    assert stream.raw == b"retry: 2500\ndata: hello\n\n"
    assert metrics.snapshot()["Retrying"]["bytes"] == len(stream.raw)


async def test_metrics_refusals_counted_by_status() -> None:
    metrics = Metrics()
    broadcast = Broadcast("memory://")

    class Guarded(EventStreamView):
        ping_interval = None
        max_connections = 1

        async def on_connect(self) -> None:
            if self.request.headers.get("authorization") != "ok":
                raise HTTPException(401)

        def groups(self) -> list[str]:
            return self.request.query_params.getlist("g")

        def authorize_group(self, group: str) -> bool:
            return group != "secret"

    Guarded.broadcast = broadcast
    Guarded.metrics = metrics
    auth = {"authorization": "ok"}
    app = app_for(broadcast, Route("/s", Guarded))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        assert (await client.post("/s?g=room", headers=auth)).status_code == 405
        assert (await client.get("/s?g=room")).status_code == 401
        assert (await client.get("/s?g=secret", headers=auth)).status_code == 403
        assert (await client.get("/s?g=a%20b", headers=auth)).status_code == 400
        bad_id = {**auth, "Last-Event-ID": "a\0b"}
        assert (await client.get("/s?g=room", headers=bad_id)).status_code == 400
        assert metrics.snapshot()["Guarded"]["streams"] == 0
        async with client.stream("/s?g=room", headers=auth) as stream:
            assert stream.status_code == 200
            assert (await client.get("/s?g=room", headers=auth)).status_code == 503
        await client.shutdown()
        # During shutdown a new stream gets 200 and ends at once (the browser retries).
        assert (await client.get("/s?g=room", headers=auth)).status_code == 200
    counters = metrics.snapshot()["Guarded"]
    assert counters["refused"] == {200: 1, 400: 2, 401: 1, 403: 1, 405: 1, 503: 1}
    assert counters["streams"] == 1
    assert counters["open"] == 0
    assert counters["disconnects"] == disconnects(client_closed=1)


async def test_metrics_unavailable_broadcast_counts_as_refused_200() -> None:
    metrics = Metrics()
    broadcast = Broadcast("memory://")
    async with broadcast:  # connected, then closed: unavailable (never connected gets 503)
        pass
    view = room_view(broadcast, metrics, relay=False)
    async with EventStreamClient(view, timeout=TIMEOUT) as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert response.content == b""
    counters = metrics.snapshot()["Room"]
    assert counters["refused"] == {200: 1}
    assert (counters["streams"], counters["events"], counters["bytes"]) == (0, 0, 0)


# -- which views count, and where -----------------------------------------------------------


async def test_metrics_views_without_metrics_count_nothing() -> None:
    metrics = Metrics()

    class Counted(EventStreamView):
        ping_interval = None

        async def events(self) -> AsyncIterator[Any]:
            yield "x"

    Counted.metrics = metrics

    class Uncounted(Counted):
        metrics = None

    class Plain(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield "x"

    app = Starlette(routes=[Route("/u", Uncounted), Route("/p", Plain)])
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        for path in ("/u", "/p"):
            async with client.stream(path) as stream:
                assert (await stream.next_event()).data == "x"
            assert (await client.post(path)).status_code == 405
    assert metrics.snapshot() == {}
    assert not [line for line in metrics.prometheus().splitlines() if not line.startswith("#")]


async def test_metrics_subclass_counted_under_its_own_name() -> None:
    metrics = Metrics()

    class Base(EventStreamView):
        ping_interval = None

        async def events(self) -> AsyncIterator[Any]:
            yield "x"

    Base.metrics = metrics

    class Child(Base):
        pass

    async with EventStreamClient(Child, timeout=TIMEOUT) as client:
        async with client.stream("/") as stream:
            await stream.wait_ended()
    assert list(metrics.snapshot()) == ["Child"]
    assert metrics.snapshot()["Child"]["events"] == 1


async def test_metrics_instances_are_independent() -> None:
    first, second = Metrics(), Metrics()

    def view(metrics: Metrics) -> type[EventStreamView]:
        async def events(self: EventStreamView) -> AsyncIterator[Any]:
            yield "x"

        return type("Stream", (EventStreamView,), {"metrics": metrics, "events": events})

    app = Starlette(routes=[Route("/1", view(first)), Route("/2", view(second))])
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/1") as stream:
            await stream.wait_ended()
        assert first.snapshot()["Stream"]["streams"] == 1
        assert second.snapshot() == {}
        for _ in range(2):
            async with client.stream("/2") as stream:
                await stream.wait_ended()
    assert first.snapshot()["Stream"]["streams"] == 1
    assert second.snapshot()["Stream"]["streams"] == 2
    assert 'sseviews_streams_total{view="Stream"} 1\n' in first.prometheus()
    assert 'sseviews_streams_total{view="Stream"} 2\n' in second.prometheus()
    assert Metrics().snapshot() == {}


@pytest.mark.parametrize("value", ["metrics", Metrics, object(), {}])
def test_metrics_setting_must_be_a_metrics_instance(value: Any) -> None:
    with pytest.raises(TypeError, match="metrics"):
        type("Bad", (EventStreamView,), {"metrics": value})


# -- Prometheus text ---------------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_COMMENT = re.compile(rf"# (HELP|TYPE) ({_NAME}) (.+)")
_SAMPLE = re.compile(rf"({_NAME})(?:\{{(.*)\}})? (-?[0-9]+(?:\.[0-9]+)?)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,?)')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], value)


def _labels(text: str) -> tuple[tuple[str, str], ...]:
    labels: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        match = _LABEL.match(text, position)
        assert match is not None, f"bad label set: {text!r}"
        labels.append((match[1], _unescape(match[2])))
        position = match.end()
        assert match[3] or position == len(text), f"missing comma: {text!r}"
    return tuple(labels)


def parse_prometheus(text: str) -> dict[str, dict[str, Any]]:
    """Parse text format 0.0.4 strictly: HELP, then TYPE, then that family's samples."""
    assert text.endswith("\n")
    families: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in text[:-1].split("\n"):
        comment = _COMMENT.fullmatch(line)
        if comment is not None:
            kind, name, rest = comment.groups()
            if kind == "HELP":
                assert name not in families, f"family {name} declared twice"
                current = families[name] = {"help": rest, "type": None, "samples": {}}
            else:
                assert current is families.get(name) and current["type"] is None, line
                assert rest in ("counter", "gauge"), line
                current["type"] = rest
            continue
        sample = _SAMPLE.fullmatch(line)
        assert sample is not None, f"not a Prometheus line: {line!r}"
        name, labels, value = sample.groups()
        assert current is not None and current["type"] is not None, line
        assert name is not None and families.get(name) is current, f"{name} outside its family"
        key = _labels(labels or "")
        assert key not in current["samples"], f"duplicate sample: {line!r}"
        current["samples"][key] = int(value)
    return families


async def test_metrics_prometheus_text_parses_line_by_line() -> None:
    metrics = Metrics()
    weird_name = 'We"ird\\view\nname'

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        yield "x"
        if self.request.query_params.get("end") == "error":
            raise RuntimeError("boom")

    settings = {"metrics": metrics, "events": events, "ping_interval": None}
    weird = type(weird_name, (EventStreamView,), settings)
    plain = type("Plain", (EventStreamView,), settings)
    app = Starlette(routes=[Route("/w", weird), Route("/p", plain)])
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        for url in ("/w", "/w?end=error", "/p"):
            async with client.stream(url) as stream:
                await stream.wait_ended()
        assert (await client.post("/w")).status_code == 405
        assert (await client.request("DELETE", "/w")).status_code == 405
    text = metrics.prometheus()
    families = parse_prometheus(text)
    assert {name: family["type"] for name, family in families.items()} == {
        "sseviews_open_streams": "gauge",
        "sseviews_streams_total": "counter",
        "sseviews_events_sent_total": "counter",
        "sseviews_bytes_sent_total": "counter",
        "sseviews_pings_sent_total": "counter",
        "sseviews_disconnects_total": "counter",
        "sseviews_refused_total": "counter",
    }
    assert all(family["help"] for family in families.values())
    snapshot = metrics.snapshot()
    for name in (weird_name, "Plain"):
        view = (("view", name),)
        assert families["sseviews_open_streams"]["samples"][view] == 0
        assert families["sseviews_streams_total"]["samples"][view] == snapshot[name]["streams"]
        assert families["sseviews_events_sent_total"]["samples"][view] == snapshot[name]["events"]
        assert families["sseviews_bytes_sent_total"]["samples"][view] == snapshot[name]["bytes"]
        assert families["sseviews_pings_sent_total"]["samples"][view] == 0
        for reason in DisconnectReason:
            key = (("view", name), ("reason", reason.value))
            expected = snapshot[name]["disconnects"][reason.value]
            assert families["sseviews_disconnects_total"]["samples"][key] == expected
    assert snapshot[weird_name]["streams"] == 2
    assert snapshot[weird_name]["events"] == 2
    assert snapshot[weird_name]["disconnects"] == disconnects(completed=1, error=1)
    assert families["sseviews_refused_total"]["samples"] == {
        (("view", weird_name), ("status", "405")): 2
    }
    assert 'sseviews_streams_total{view="We\\"ird\\\\view\\nname"} 2' in text.splitlines()


def test_metrics_prometheus_without_views_declares_every_family() -> None:
    families = parse_prometheus(Metrics().prometheus())
    assert len(families) == 7
    assert all(family["samples"] == {} for family in families.values())


async def test_metrics_endpoint_serves_prometheus_text() -> None:
    metrics = Metrics()

    class Clock(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield "tick"

    Clock.metrics = metrics
    app = Starlette(routes=[Route("/metrics", metrics.endpoint), Route("/clock", Clock)])
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/clock") as stream:
            await stream.wait_ended()
        response = await client.get("/metrics")
    assert response.status_code == 200
    content_type = [part.strip() for part in response.headers["content-type"].split(";")]
    assert content_type[:2] == ["text/plain", "version=0.0.4"]
    assert "charset=utf-8" in content_type
    assert response.text == metrics.prometheus()
    families = parse_prometheus(response.text)
    assert families["sseviews_events_sent_total"]["samples"] == {(("view", "Clock"),): 1}
