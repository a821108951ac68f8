"""Limits and access control: `max_connections` and `authorize_group`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route
from support.apps import app_for

from sseviews import Broadcast, DisconnectReason, EventStreamView
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio

TIMEOUT = 3.0


class Trace:
    """What the views of one test saw: hook calls in order, and how their streams ended."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.reasons: list[DisconnectReason] = []
        self.streaming = 0  # events() running now
        self.most_streaming = 0
        self._changed = anyio.Event()

    def step(self, name: str) -> None:
        self.steps.append(name)
        self.changed()

    def changed(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        with anyio.fail_after(TIMEOUT):
            while not predicate():
                await self._changed.wait()


def limited_view(trace: Trace, limit: int | None, **settings: Any) -> type[EventStreamView]:
    """A view limited to `limit` streams; `?end=completed|error` ends them, else they wait."""

    async def on_connect(self: EventStreamView) -> None:
        trace.step("on_connect")

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        trace.streaming += 1
        trace.most_streaming = max(trace.most_streaming, trace.streaming)
        try:
            yield "hello"
            ending = self.request.query_params.get("end")
            if ending == "error":
                raise RuntimeError("boom")
            if ending != "completed":
                await anyio.sleep_forever()
        finally:
            trace.streaming -= 1

    async def on_disconnect(self: EventStreamView, reason: DisconnectReason) -> None:
        trace.reasons.append(reason)
        trace.changed()

    namespace: dict[str, Any] = {
        "max_connections": limit,
        "ping_interval": None,
        "on_connect": on_connect,
        "events": events,
        "on_disconnect": on_disconnect,
    }
    namespace.update(settings)
    return type("Limited", (EventStreamView,), namespace)


# -- max_connections -----------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "retry_after"), [({}, "5"), ({"retry_after": 7}, "7")])
async def test_max_connections_extra_stream_gets_503_with_retry_after(
    settings: dict[str, Any], retry_after: str
) -> None:
    trace = Trace()
    view = limited_view(trace, 2, **settings)
    async with EventStreamClient(view, timeout=TIMEOUT) as client, AsyncExitStack() as open_:
        for _ in range(2):
            stream = await open_.enter_async_context(client.stream("/"))
            assert stream.status_code == 200
            assert (await stream.next_event()).data == "hello"
        assert trace.steps == ["on_connect", "on_connect"]
        async with client.stream("/") as refused:
            assert refused.status_code == 503
            await refused.wait_ended()
            assert refused.headers["retry-after"] == retry_after
            assert refused.headers["content-type"].startswith("text/plain")
            assert refused.text == "Too many open streams"
        response = await client.get("/")
        assert response.status_code == 503
        assert response.headers["retry-after"] == retry_after
        # Neither refused request reached on_connect, and the open streams go on.
        assert trace.steps == ["on_connect", "on_connect"]
        assert trace.reasons == []
        assert trace.streaming == 2


async def test_max_connections_refusal_logged_with_view_and_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    trace = Trace()
    view = limited_view(trace, 1)
    with caplog.at_level(logging.WARNING, logger="sseviews"):
        async with EventStreamClient(view, timeout=TIMEOUT) as client:
            async with client.stream("/") as stream:
                await stream.next_event()
                assert (await client.get("/full")).status_code == 503
    logged = [r.getMessage() for r in caplog.records if r.name == "sseviews"]
    assert len(logged) == 1
    assert "Limited /full (testclient:50000)" in logged[0]
    assert "max_connections" in logged[0]


@pytest.mark.parametrize("ending", ["client_closed", "completed", "error"])
async def test_max_connections_slot_frees_when_a_stream_ends(ending: str) -> None:
    trace = Trace()
    view = limited_view(trace, 1)
    async with EventStreamClient(view, timeout=TIMEOUT) as client:
        async with client.stream("/", params={"end": ending}) as first:
            assert first.status_code == 200
            assert (await first.next_event()).data == "hello"
            if ending != "client_closed":
                await first.wait_ended()
            else:
                assert (await client.get("/")).status_code == 503
        # Leaving the block waits until the app has returned: the slot is free again.
        assert trace.reasons == [DisconnectReason(ending)]
        async with client.stream("/") as second:
            assert second.status_code == 200
            assert (await second.next_event()).data == "hello"
            assert (await client.get("/")).status_code == 503
    assert trace.steps == ["on_connect", "on_connect"]


async def test_max_connections_refused_and_failed_requests_free_their_slot() -> None:
    class Guarded(EventStreamView):
        max_connections = 1
        ping_interval = None

        async def on_connect(self) -> None:
            token = self.request.headers.get("authorization")
            if token == "boom":
                raise RuntimeError("on_connect failed")
            if token != "ok":
                raise HTTPException(401, "log in first")

        async def events(self) -> AsyncIterator[Any]:
            yield "hello"
            await anyio.sleep_forever()

    ok = {"authorization": "ok"}
    async with EventStreamClient(Guarded, timeout=TIMEOUT) as client:
        for _ in range(3):
            assert (await client.get("/")).status_code == 401
            with pytest.raises(RuntimeError, match="on_connect failed"):
                await client.get("/", headers={"authorization": "boom"})
            assert (await client.request("HEAD", "/", headers=ok)).status_code == 200
            bad_id = await client.get("/", params={"lastEventId": "a\0b"}, headers=ok)
            assert bad_id.status_code == 400
        async with client.stream("/", headers=ok) as stream:
            assert stream.status_code == 200
            assert (await stream.next_event()).data == "hello"


async def test_max_connections_burst_never_exceeds_limit() -> None:
    trace = Trace()
    gate = anyio.Event()
    release = anyio.Event()
    statuses: list[int] = []
    inside = most_inside = 0

    class Burst(EventStreamView):
        max_connections = 3
        ping_interval = None

        async def on_connect(self) -> None:
            # A slow on_connect (a database lookup): the whole burst arrives meanwhile.
            nonlocal inside, most_inside
            inside += 1
            most_inside = max(most_inside, inside)
            trace.changed()
            try:
                await gate.wait()
            finally:
                inside -= 1

        async def events(self) -> AsyncIterator[Any]:
            trace.streaming += 1
            trace.most_streaming = max(trace.most_streaming, trace.streaming)
            try:
                yield "hello"
                await anyio.sleep_forever()
            finally:
                trace.streaming -= 1

    async def connect(client: EventStreamClient) -> None:
        async with client.stream("/") as stream:
            statuses.append(stream.status_code)
            trace.changed()
            if stream.status_code == 200:
                assert (await stream.next_event()).data == "hello"
                await release.wait()

    async with EventStreamClient(Burst, timeout=TIMEOUT) as client:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                for _ in range(12):
                    tg.start_soon(connect, client)
                await trace.wait_for(lambda: len(statuses) == 9 and inside == 3)
                assert statuses == [503] * 9
                gate.set()
                await trace.wait_for(lambda: len(statuses) == 12 and trace.streaming == 3)
                # The refused ones are gone; one more is still refused while 3 stream.
                assert (await client.get("/")).status_code == 503
                release.set()
    assert sorted(statuses) == [200] * 3 + [503] * 9
    assert most_inside == 3
    assert trace.most_streaming == 3


async def test_max_connections_view_classes_count_separately() -> None:
    trace = Trace()
    first = limited_view(trace, 1)
    second = limited_view(trace, 1)

    class Child(first):  # type: ignore[valid-type,misc]
        pass

    app = Starlette(routes=[Route("/a", first), Route("/b", second), Route("/c", Child)])
    async with EventStreamClient(app, timeout=TIMEOUT) as client, AsyncExitStack() as open_:
        for path in ("/a", "/b", "/c"):
            stream = await open_.enter_async_context(client.stream(path))
            assert stream.status_code == 200, path
            assert (await stream.next_event()).data == "hello"
        for path in ("/a", "/b", "/c"):
            assert (await client.get(path)).status_code == 503, path
        assert trace.streaming == 3


async def test_max_connections_none_means_no_limit() -> None:
    trace = Trace()
    view = limited_view(trace, None)
    async with EventStreamClient(view, timeout=TIMEOUT) as client, AsyncExitStack() as open_:
        for _ in range(20):
            stream = await open_.enter_async_context(client.stream("/"))
            assert stream.status_code == 200
        await trace.wait_for(lambda: trace.streaming == 20)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_connections", 0),
        ("max_connections", -1),
        ("max_connections", True),
        ("max_connections", "3"),
        ("max_connections", 2.0),
        ("retry_after", 0),
        ("retry_after", -1),
        ("retry_after", None),
        ("retry_after", True),
        ("retry_after", "5"),
    ],
)
def test_max_connections_invalid_settings_raise_at_definition(name: str, value: Any) -> None:
    with pytest.raises((TypeError, ValueError), match=name):
        type("Bad", (EventStreamView,), {name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_connections", None), ("max_connections", 1), ("retry_after", 1), ("retry_after", 120)],
)
def test_max_connections_valid_settings_accepted(name: str, value: Any) -> None:
    view = type("Good", (EventStreamView,), {name: value})
    assert getattr(view, name) == value


# -- authorize_group -----------------------------------------------------------------------


AUTH = {"authorization": "Bearer ok"}


def guarded_view(
    broadcast: Broadcast, trace: Trace, authorize: Callable[..., Any], *, relay: bool
) -> type[EventStreamView]:
    """A view joining the `?g=` groups of authenticated requests, asking `authorize`.

    With `relay` it overrides events() to relay its subscription, else it streams
    the groups directly.
    """

    async def on_connect(self: EventStreamView) -> None:
        if self.request.headers.get("authorization") != AUTH["authorization"]:
            raise HTTPException(401, "log in first")
        trace.step("on_connect")

    def groups(self: EventStreamView) -> list[str]:
        return self.request.query_params.getlist("g")

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        trace.step("events")
        async for event in self.subscription:
            yield event

    async def on_disconnect(self: EventStreamView, reason: DisconnectReason) -> None:
        trace.step("on_disconnect")
        trace.reasons.append(reason)

    namespace: dict[str, Any] = {
        "broadcast": broadcast,
        "groups": groups,
        "ping_interval": None,
        "on_connect": on_connect,
        "authorize_group": authorize,
        "on_disconnect": on_disconnect,
    }
    if relay:
        namespace["events"] = events
    return type("Guarded", (EventStreamView,), namespace)


@pytest.mark.parametrize("relay", [False, True], ids=["direct", "relay"])
async def test_authorize_group_sync_denied_group_gets_403_naming_it(
    relay: bool, caplog: pytest.LogCaptureFixture
) -> None:
    broadcast = Broadcast("memory://")
    trace = Trace()
    asked: list[str] = []

    def authorize(self: EventStreamView, group: str) -> bool:
        asked.append(group)
        return not group.startswith("secret")

    app = app_for(broadcast, Route("/s", guarded_view(broadcast, trace, authorize, relay=relay)))
    with caplog.at_level(logging.INFO, logger="sseviews"):
        async with EventStreamClient(app, timeout=TIMEOUT) as client:
            earlier = await broadcast.publish("secret:plans", "hidden")
            async with client.stream(
                "/s",
                params={"g": "secret:plans"},
                headers={**AUTH, "Last-Event-ID": earlier},
            ) as stream:
                assert stream.status_code == 403
                await stream.wait_ended()
                assert "'secret:plans'" in stream.text
                assert "hidden" not in stream.text
                assert broadcast.subscriber_count == 0
            response = await client.get("/s?g=lobby&g=secret:plans&g=other", headers=AUTH)
            assert response.status_code == 403
            assert "'secret:plans'" in response.text
            assert "lobby" not in response.text
            assert broadcast.subscriber_count == 0
    assert asked == ["secret:plans", "lobby", "secret:plans"]
    # on_connect ran, events() never started, on_disconnect never ran.
    assert trace.steps == ["on_connect", "on_connect"]
    assert trace.reasons == []
    denied = [r.getMessage() for r in caplog.records if "not allowed" in r.getMessage()]
    assert len(denied) == 2
    assert all("Guarded /s" in line and "secret:plans" in line for line in denied)


@pytest.mark.parametrize("relay", [False, True], ids=["direct", "relay"])
async def test_authorize_group_async_decides_per_request(relay: bool) -> None:
    broadcast = Broadcast("memory://")
    trace = Trace()

    async def authorize(self: EventStreamView, group: str) -> bool:
        await anyio.lowlevel.checkpoint()
        user = self.request.query_params["user"]
        return group in ("lobby", f"user:{user}")

    app = app_for(broadcast, Route("/s", guarded_view(broadcast, trace, authorize, relay=relay)))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        denied = await client.get("/s?user=alice&g=lobby&g=user:bob", headers=AUTH)
        assert denied.status_code == 403
        assert "'user:bob'" in denied.text
        assert broadcast.subscriber_count == 0
        async with client.stream("/s?user=alice&g=lobby&g=user:alice", headers=AUTH) as stream:
            assert stream.status_code == 200
            await broadcast.publish("user:bob", "not for alice")
            mine = await broadcast.publish("user:alice", "for alice")
            lobby = await broadcast.publish("lobby", "for everyone")
            # Two groups: composite ids, "lobby" first by name.
            assert [(await stream.next_event()).id for _ in range(2)] == [
                f"{lobby[:8]}-0.{mine}",
                f"{lobby}.{mine}",
            ]
            assert broadcast.subscriber_count == 2
        assert broadcast.subscriber_count == 0
    expected = ["on_connect", "on_connect"] + (["events"] if relay else []) + ["on_disconnect"]
    assert trace.steps == expected
    assert trace.reasons == [DisconnectReason.CLIENT_CLOSED]


async def test_authorize_group_asked_once_per_distinct_group() -> None:
    broadcast = Broadcast("memory://")
    trace = Trace()
    asked: list[str] = []

    def authorize(self: EventStreamView, group: str) -> bool:
        asked.append(group)
        return True

    app = app_for(broadcast, Route("/s", guarded_view(broadcast, trace, authorize, relay=False)))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/s?g=a&g=b&g=a&g=b", headers=AUTH) as stream:
            assert stream.status_code == 200
    assert asked == ["a", "b"]


async def test_authorize_group_runs_after_on_connect() -> None:
    broadcast = Broadcast("memory://")
    trace = Trace()
    asked: list[str] = []

    def authorize(self: EventStreamView, group: str) -> bool:
        asked.append(group)
        return False

    app = app_for(broadcast, Route("/s", guarded_view(broadcast, trace, authorize, relay=True)))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        response = await client.get("/s?g=secret")
    # Unauthenticated: 401 from on_connect, not 403 (which would confirm the group exists).
    assert response.status_code == 401
    assert response.text == "log in first"
    assert asked == []
    assert trace.steps == []
    assert broadcast.subscriber_count == 0


@pytest.mark.parametrize(
    ("query", "detail"),
    [("g=lobby&g=a%20b", "invalid group name"), ("g=a&g=b&g=c", "too many groups")],
)
async def test_authorize_group_runs_after_group_validation(query: str, detail: str) -> None:
    broadcast = Broadcast("memory://")
    trace = Trace()
    asked: list[str] = []

    def authorize(self: EventStreamView, group: str) -> bool:
        asked.append(group)
        return False

    view = guarded_view(broadcast, trace, authorize, relay=False)
    view.max_groups = 2
    app = app_for(broadcast, Route("/s", view))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        response = await client.get(f"/s?{query}", headers=AUTH)
    assert response.status_code == 400
    assert response.text.startswith(detail)
    assert asked == []
    assert trace.steps == ["on_connect"]
    assert broadcast.subscriber_count == 0


async def test_authorize_group_head_request_for_denied_group_gets_403() -> None:
    # HEAD must answer with the status GET would get (RFC 9110 9.3.2); a 200 here
    # tells a client that may not join the group that the stream would be served.
    broadcast = Broadcast("memory://")
    trace = Trace()

    def authorize(self: EventStreamView, group: str) -> bool:
        return group != "secret"

    app = app_for(broadcast, Route("/s", guarded_view(broadcast, trace, authorize, relay=False)))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        allowed = await client.request("HEAD", "/s?g=lobby", headers=AUTH)
        denied = await client.request("HEAD", "/s?g=secret", headers=AUTH)
    assert allowed.status_code == 200
    assert denied.status_code == 403
