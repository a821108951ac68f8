from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route
from support.apps import app_for
from support.broadcast import YieldingStore, steps

from sseviews import RESET_EVENT, BackendError, Broadcast, DisconnectReason, Event, EventStreamView
from sseviews.stores.memory import MemoryStore
from sseviews.testing import EventStream, EventStreamClient

pytestmark = pytest.mark.anyio

TIMEOUT = 3.0


class Ended:
    """The reasons streams ended with, by the `?who=` tag of their request."""

    def __init__(self) -> None:
        self.reasons: dict[str, DisconnectReason] = {}
        self._changed = anyio.Event()

    def add(self, who: str, reason: DisconnectReason) -> None:
        self.reasons[who] = reason
        self._changed.set()
        self._changed = anyio.Event()

    async def wait(self, who: str) -> DisconnectReason:
        with anyio.move_on_after(TIMEOUT):
            while who not in self.reasons:
                await self._changed.wait()
        assert who in self.reasons, f"stream {who!r} did not end within {TIMEOUT}s"
        return self.reasons[who]


def room_view(broadcast: Broadcast, ended: Ended | None = None, **settings: Any) -> type:
    """A view streaming the groups in `settings` (default ["room"]) without events()."""

    async def on_disconnect(self: EventStreamView, reason: DisconnectReason) -> None:
        if ended is not None:
            ended.add(self.request.query_params.get("who", ""), reason)

    attrs: dict[str, Any] = {
        "broadcast": broadcast,
        "groups": ["room"],
        "ping_interval": None,
        "on_disconnect": on_disconnect,
    }
    attrs.update(settings)
    return type("RoomView", (EventStreamView,), attrs)


async def read(stream: EventStream, count: int) -> list[Event]:
    return [await stream.next_event(timeout=TIMEOUT) for _ in range(count)]


async def nothing_more(stream: EventStream) -> bool:
    try:
        await stream.next_event(timeout=0.05)
    except TimeoutError:
        return True
    return False


# -- streaming groups -------------------------------------------------------------------


async def test_view_streams_group_events_without_overriding_events() -> None:
    broadcast = Broadcast("memory://")
    app = app_for(broadcast, Route("/room", room_view(broadcast)))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/room") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            ids = [await broadcast.publish("room", {"n": n}) for n in range(3)]
            await broadcast.publish("elsewhere", "not for this view")
            events = await read(stream, 3)
            assert [e.id for e in events] == ids
            assert [e.json() for e in events] == [{"n": 0}, {"n": 1}, {"n": 2}]
            assert await nothing_more(stream)
        assert broadcast.subscriber_count == 0


async def test_view_groups_sync_method_uses_path_params() -> None:
    broadcast = Broadcast("memory://")

    class RoomView(EventStreamView):
        ping_interval = None

        def groups(self) -> list[str]:
            return [f"room:{self.request.path_params['room']}"]

    RoomView.broadcast = broadcast
    app = app_for(broadcast, Route("/rooms/{room}", RoomView))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/rooms/1") as one, client.stream("/rooms/2") as two:
            id_1 = await broadcast.publish("room:1", "for one")
            id_2 = await broadcast.publish("room:2", "for two")
            assert [(e.id, e.data) for e in await read(one, 1)] == [(id_1, "for one")]
            assert [(e.id, e.data) for e in await read(two, 1)] == [(id_2, "for two")]
            assert await nothing_more(one)
            assert await nothing_more(two)


async def test_view_groups_async_method_uses_path_params() -> None:
    broadcast = Broadcast("memory://")

    class JobView(EventStreamView):
        ping_interval = None

        async def groups(self) -> list[str]:
            await anyio.lowlevel.checkpoint()
            job = self.request.path_params["job"]
            return [f"job:{job}", "jobs:all"]

    JobView.broadcast = broadcast
    app = app_for(broadcast, Route("/jobs/{job}", JobView))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/jobs/7") as stream:
            await broadcast.publish("job:8", "other job")
            mine = await broadcast.publish("job:7", "mine")
            everyone = await broadcast.publish("jobs:all", "everyone")
            # Two groups: composite ids, by group name.
            assert [e.id for e in await read(stream, 2)] == [
                f"{mine}.{everyone[:8]}-0",
                f"{mine}.{everyone}",
            ]
            assert await nothing_more(stream)


async def test_view_duplicate_groups_are_joined_once() -> None:
    broadcast = Broadcast("memory://")
    view = room_view(broadcast, groups=["a", "b", "a", "b", "a"])
    app = app_for(broadcast, Route("/s", view))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        await broadcast.publish("a", "seen before")
        cursor = await broadcast.last_id("a", "b")
        a1, b1, a2 = [await broadcast.publish(group, group) for group in ["a", "b", "a"]]
        async with client.stream("/s", headers={"Last-Event-ID": cursor}) as stream:
            assert broadcast.subscriber_count == 2
            replayed = await read(stream, 3)
            assert [e.data for e in replayed] == ["a", "a", "b"]
            assert [e.id for e in replayed] == [
                f"{a1}.{b1[:8]}-0",
                f"{a2}.{b1[:8]}-0",
                f"{a2}.{b1}",
            ]
            live = await broadcast.publish("a", "live")
            assert [e.id for e in await read(stream, 1)] == [f"{live}.{b1}"]
            assert await nothing_more(stream)


def test_view_max_groups_is_at_most_what_an_id_can_carry() -> None:
    assert type("Most", (EventStreamView,), {"max_groups": 256}).max_groups == 256
    with pytest.raises(ValueError, match="max_groups must be <= 256"):
        type("TooMany", (EventStreamView,), {"max_groups": 257})


async def test_view_of_the_most_groups_resumes_from_its_composite_id() -> None:
    broadcast = Broadcast("memory://")
    groups = [f"g{n:03}" for n in range(256)]
    view = room_view(broadcast, groups=groups, max_groups=256)
    app = app_for(broadcast, Route("/s", view))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/s") as stream:
            first = await broadcast.publish("g200", "first")
            (event,) = await read(stream, 1)
        assert event.id is not None
        assert len(event.id) > 1024  # longer than Last-Event-ID could be before
        second = await broadcast.publish("g200", "second")
        async with client.stream("/s", headers={"Last-Event-ID": event.id}) as stream:
            (replayed,) = await read(stream, 1)
            assert replayed.data == "second"
            assert replayed.id == event.id.replace(first, second)
            assert await nothing_more(stream)


async def test_view_more_groups_than_max_groups_gets_400() -> None:
    broadcast = Broadcast("memory://")
    view = room_view(broadcast, groups=lambda self: ["a", "b", "c"], max_groups=2)
    app = app_for(broadcast, Route("/s", view))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        response = await client.get("/s")
        assert response.status_code == 400
        assert "too many groups" in response.text
        assert broadcast.subscriber_count == 0
        # Exactly max_groups is fine.
        view.groups = lambda self: ["a", "b", "a"]
        async with client.stream("/s") as stream:
            assert stream.status_code == 200


async def test_view_static_groups_changed_after_a_request_are_checked_again() -> None:
    # A list set on the class is checked once and remembered; a list changed in
    # place, or replaced, is not taken for the one checked.
    broadcast = Broadcast("memory://")
    view = room_view(broadcast, groups=["a"])
    app = app_for(broadcast, Route("/s", view))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/s") as stream:
            assert broadcast.subscriber_count == 1
        view.groups.append("b")
        async with client.stream("/s") as stream:
            assert broadcast.subscriber_count == 2  # a subscriber per group
            await broadcast.publish("b", "for b")
            assert [e.data for e in await read(stream, 1)] == ["for b"]
        view.groups.append("not a name")
        for _ in range(2):
            response = await client.get("/s")
            assert response.status_code == 400
            assert response.text.startswith("invalid group name")
        view.groups = ("c",)
        async with client.stream("/s") as stream:
            await broadcast.publish("b", "not for c")
            await broadcast.publish("c", "for c")
            assert [e.data for e in await read(stream, 1)] == ["for c"]
        view.max_groups = 0
        response = await client.get("/s")
        assert response.status_code == 400
        assert "too many groups" in response.text
    assert broadcast.subscriber_count == 0


@pytest.mark.parametrize("room", ["a b", "%00", "tab%09", "x" * 250])
async def test_view_invalid_group_name_from_path_gets_400(room: str) -> None:
    broadcast = Broadcast("memory://")

    class RoomView(EventStreamView):
        def groups(self) -> list[str]:
            return [f"room:{self.request.path_params['room']}"]

    RoomView.broadcast = broadcast
    app = app_for(broadcast, Route("/rooms/{room}", RoomView))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        response = await client.get(f"/rooms/{room}")
    assert response.status_code == 400
    assert response.text.startswith("invalid group name")
    assert "Traceback" not in response.text
    assert broadcast.subscriber_count == 0


async def test_view_without_connected_broadcast_ends_at_once_and_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Not 503: EventSource would stop retrying for good. A 200 that ends at once
    # makes the browser come back after its retry delay, with its Last-Event-ID.
    # (A broadcast never connected at all is a missing lifespan: test_views_settings.py.)
    broadcast = Broadcast("memory://")
    async with broadcast:  # connected, then closed, as after the app's shutdown
        pass
    app = Starlette(routes=[Route("/room", room_view(broadcast))])
    with caplog.at_level(logging.WARNING, logger="sseviews"):
        async with EventStreamClient(app, timeout=TIMEOUT) as client:
            response = await client.get("/room")
    assert response.status_code == 200
    assert response.content == b""
    assert any("broadcast unavailable" in r.getMessage() for r in caplog.records)
    assert broadcast.subscriber_count == 0


# -- Last-Event-ID ---------------------------------------------------------------------


@pytest.mark.parametrize("via", ["header", "query"])
async def test_view_last_event_id_replays_missed_events_once(via: str) -> None:
    broadcast = Broadcast("memory://")
    app = app_for(broadcast, Route("/room", room_view(broadcast)))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/room") as stream:
            seen = [await broadcast.publish("room", f"seen {n}") for n in range(2)]
            assert [e.id for e in await read(stream, 2)] == seen
            last = stream.last_event_id
        assert last == seen[-1]
        missed = []
        for n in range(3):
            await broadcast.publish("other", "not mine")
            missed.append(await broadcast.publish("room", f"missed {n}"))
        if via == "header":
            reconnect = client.stream("/room", headers={"Last-Event-ID": last})
        else:
            reconnect = client.stream("/room", params={"lastEventId": last})
        async with reconnect as stream:
            events = await read(stream, 3)
            assert [(e.id, e.data) for e in events] == [
                (event_id, f"missed {n}") for n, event_id in enumerate(missed)
            ]
            live = await broadcast.publish("room", "live")
            assert [e.id for e in await read(stream, 1)] == [live]
            assert await nothing_more(stream)


async def test_view_expired_last_event_id_gets_reset_event() -> None:
    broadcast = Broadcast("memory://", retention=2)
    app = app_for(broadcast, Route("/room", room_view(broadcast)))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        ids = [await broadcast.publish("room", n) for n in range(5)]
        async with client.stream("/room", headers={"Last-Event-ID": ids[0]}) as stream:
            assert stream.status_code == 200
            (reset,) = await read(stream, 1)
            assert reset.event == RESET_EVENT
            assert reset.json()["reason"] == "expired"
            assert reset.id == ids[-1] == stream.last_event_id
            assert await nothing_more(stream)


@pytest.mark.parametrize(
    ("last_event_id", "message"),
    [("not-an-id", "was not issued"), ("12345", "was not issued")],
)
async def test_view_bad_last_event_id_gets_400(last_event_id: str, message: str) -> None:
    broadcast = Broadcast("memory://")
    app = app_for(broadcast, Route("/room", room_view(broadcast)))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        await broadcast.publish("room", "x")
        response = await client.get("/room", headers={"Last-Event-ID": last_event_id})
        by_query = await client.get("/room", params={"lastEventId": last_event_id})
    for refused in (response, by_query):
        assert refused.status_code == 400
        assert message in refused.text
        assert "Traceback" not in refused.text
    assert broadcast.subscriber_count == 0


async def test_view_on_connect_refusal_comes_before_last_event_id_check() -> None:
    broadcast = Broadcast("memory://")

    class PrivateRoom(EventStreamView):
        groups: ClassVar[list[str]] = ["room"]

        async def on_connect(self) -> None:
            if self.request.headers.get("authorization") != "Bearer ok":
                raise HTTPException(401, "log in first")

    PrivateRoom.broadcast = broadcast
    app = app_for(broadcast, Route("/room", PrivateRoom))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        anonymous = await client.get("/room", headers={"Last-Event-ID": "garbage"})
        signed_in = await client.get(
            "/room", headers={"Last-Event-ID": "garbage", "Authorization": "Bearer ok"}
        )
    assert anonymous.status_code == 401
    assert anonymous.text == "log in first"
    assert signed_in.status_code == 400


async def test_view_subscription_is_active_before_the_response_head() -> None:
    broadcast = Broadcast("memory://")
    app = app_for(broadcast, Route("/room", room_view(broadcast)))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        for n in range(20):
            async with client.stream("/room") as stream:
                # Published as soon as the head is seen, before any other yield.
                event_id = await broadcast.publish("room", n)
                (event,) = await read(stream, 1)
                assert (event.id, event.data) == (event_id, str(n))


async def test_view_unknown_epoch_gets_reset_event_then_live() -> None:
    broadcast = Broadcast("memory://")
    app = app_for(broadcast, Route("/room", room_view(broadcast)))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        head = await broadcast.publish("room", "x")
        foreign = "00000000" if head[:8] != "00000000" else "11111111"
        async with client.stream("/room", headers={"Last-Event-ID": f"{foreign}-1"}) as stream:
            assert stream.status_code == 200
            (reset,) = await read(stream, 1)
            assert reset.event == RESET_EVENT
            assert reset.json() == {"reason": "unknown_epoch", "head": head, "groups": ["room"]}
            live = await broadcast.publish("room", "live")
            assert [e.id for e in await read(stream, 1)] == [live]


async def test_view_groups_method_may_refuse_with_http_exception() -> None:
    broadcast = Broadcast("memory://")

    def groups(self: EventStreamView) -> list[str]:
        raise HTTPException(404, "no such room")

    app = app_for(broadcast, Route("/room", room_view(broadcast, groups=groups)))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        response = await client.get("/room")
    assert (response.status_code, response.text) == (404, "no such room")
    assert broadcast.subscriber_count == 0


@pytest.mark.parametrize("store_class", [MemoryStore, YieldingStore])
@pytest.mark.parametrize("override", [False, True])
async def test_view_reconnects_are_gap_free_while_publishing_continues(
    store_class: type[MemoryStore], override: bool
) -> None:
    rng = random.Random(99)
    broadcast = Broadcast("memory://", history=store_class(retention=100_000))
    groups = ["room"] if override else ["news", "room"]
    if override:
        view: type = type("Merging", (MergingView,), {"broadcast": broadcast})
    else:
        view = room_view(broadcast, groups=groups)
    published = {"room": 0, "news": 0, "other": 0}
    stop = anyio.Event()

    async def publisher() -> None:
        while not stop.is_set():
            group = rng.choice(["room", "news", "other"])
            await broadcast.publish(group, group)
            published[group] += 1

    app = app_for(broadcast, Route("/s", view))
    received: list[str] = []
    with anyio.fail_after(15):
        async with EventStreamClient(app, timeout=TIMEOUT) as client:
            start = last = await broadcast.last_id(*groups)
            async with anyio.create_task_group() as tg:
                tg.start_soon(publisher)
                for _ in range(60):
                    async with client.stream("/s", headers={"Last-Event-ID": last}) as stream:
                        for _ in range(rng.randint(0, 25)):
                            event = await stream.next_event(timeout=TIMEOUT)
                            if event.id is not None:
                                assert event.event != RESET_EVENT
                                received.append(event.id)
                                last = event.id
                stop.set()
            end = await broadcast.last_id(*groups)
            async with client.stream("/s", headers={"Last-Event-ID": last}) as stream:
                while last != end:
                    event = await stream.next_event(timeout=TIMEOUT)
                    if event.id is not None:
                        received.append(event.id)
                        last = event.id
    assert sum(published[group] for group in groups) > 60
    # Each event moved its group's position by one: per group, no gap and no duplicate.
    moved = steps(start, received)
    for index, group in enumerate(groups):
        assert [p.seq for i, p in moved if i == index] == list(range(1, published[group] + 1))


# -- views that override events() ------------------------------------------------------------


class MergingView(EventStreamView):
    """Interleaves its own events (no id) with its groups' events."""

    ping_interval = None
    groups: ClassVar[list[str]] = ["room"]

    async def events(self) -> AsyncIterator[Event]:
        yield Event("welcome", event="own")
        async for event in self.subscription:
            yield event
            yield Event(f"ack {event.data}", event="own")


async def test_view_events_override_merges_own_events_with_subscription() -> None:
    broadcast = Broadcast("memory://")
    view = type("Merging", (MergingView,), {"broadcast": broadcast})
    app = app_for(broadcast, Route("/room", view))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/room") as stream:
            ids = [await broadcast.publish("room", data) for data in ["a", "b"]]
            events = await read(stream, 5)
            assert [(e.event, e.data, e.id) for e in events] == [
                ("own", "welcome", None),
                (None, "a", ids[0]),
                ("own", "ack a", None),
                (None, "b", ids[1]),
                ("own", "ack b", None),
            ]
            # The browser keeps the last id across the id-less own events.
            assert stream.last_event_id == ids[1]
        missed = await broadcast.publish("room", "c")
        async with client.stream("/room", headers={"Last-Event-ID": ids[1]}) as stream:
            events = await read(stream, 3)
            assert [(e.data, e.id) for e in events] == [
                ("welcome", None),
                ("c", missed),
                ("ack c", None),
            ]
        assert broadcast.subscriber_count == 0


async def test_view_subscription_without_broadcast_raises_runtime_error() -> None:
    class Plain(EventStreamView):
        async def events(self) -> AsyncIterator[str]:
            try:
                self.subscription  # noqa: B018
            except RuntimeError as exc:
                yield str(exc)

    async with EventStreamClient(Plain, timeout=TIMEOUT) as client:
        async with client.stream("/") as stream:
            (event,) = await read(stream, 1)
    assert "needs broadcast and groups" in event.data


# -- slow consumers ---------------------------------------------------------------------


async def test_view_slow_consumer_ends_stream_while_client_stays_paused() -> None:
    broadcast = Broadcast("memory://")
    ended = Ended()
    view = room_view(broadcast, ended, max_buffer_events=10)
    app = app_for(broadcast, Route("/room", view))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/room?who=slow") as stream:
            stream.pause()
            with anyio.fail_after(1):
                for n in range(30):
                    await broadcast.publish("room", n)
            # The client never reads again: the stream still ends at once, with
            # SLOW_CONSUMER, without waiting for send_timeout (30 s) to expire.
            assert await ended.wait("slow") is DisconnectReason.SLOW_CONSUMER
            assert broadcast.subscriber_count == 0


async def test_view_slow_consumer_logs_warning_and_replays_after_reconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sseviews")
    broadcast = Broadcast("memory://")
    ended = Ended()
    view = room_view(broadcast, ended, max_buffer_events=10)
    app = app_for(broadcast, Route("/room", view))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        published = [await broadcast.publish("room", "first")]
        async with client.stream(
            "/room?who=slow", headers={"Last-Event-ID": published[0]}
        ) as stream:
            published.append(await broadcast.publish("room", "read"))
            await read(stream, 1)
            stream.pause()
            with anyio.fail_after(1):
                for n in range(30):
                    published.append(await broadcast.publish("room", n))
            assert any("slow consumer" in r.getMessage() for r in caplog.records)
            stream.resume()
            assert await ended.wait("slow") is DisconnectReason.SLOW_CONSUMER
            await stream.wait_ended()
            received = [published[1]] + [e.id async for e in stream]
            last = stream.last_event_id
        assert last == received[-1]
        assert len(received) < len(published) - 1
        async with client.stream("/room?who=again", headers={"Last-Event-ID": last}) as stream:
            missing = len(published) - 1 - len(received)
            received += [e.id for e in await read(stream, missing)]
            assert await nothing_more(stream)
    assert received == published[1:]
    slow_lines = [
        r
        for r in caplog.records
        if r.name.startswith("sseviews") and "slow consumer" in r.getMessage()
    ]
    assert len(slow_lines) == 1
    assert slow_lines[0].levelno == logging.WARNING
    assert "RoomView /room" in slow_lines[0].getMessage()


async def test_view_slow_consumer_does_not_affect_other_clients() -> None:
    broadcast = Broadcast("memory://")
    ended = Ended()
    view = room_view(broadcast, ended, max_buffer_events=10)
    app = app_for(broadcast, Route("/room", view))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/room?who=slow") as slow, client.stream("/room?who=ok") as ok:
            slow.pause()
            with anyio.fail_after(1):
                ids = [await broadcast.publish("room", n) for n in range(100)]
            assert [e.id for e in await read(ok, 100)] == ids
            assert "ok" not in ended.reasons
            live = await broadcast.publish("room", "still live")
            assert [e.id for e in await read(ok, 1)] == [live]
            assert "ok" not in ended.reasons


async def test_view_publish_never_blocks_on_a_paused_client() -> None:
    broadcast = Broadcast("memory://")
    view = room_view(broadcast, max_buffer_events=100_000, max_buffer_bytes=100_000_000)
    app = app_for(broadcast, Route("/room", view))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/room") as stream:
            stream.pause()
            with anyio.fail_after(2):
                ids = [await broadcast.publish("room", n) for n in range(2000)]
            stream.resume()
            assert [e.id for e in await read(stream, 2000)] == ids


async def test_view_events_override_slow_consumer_is_bounded_by_max_buffer_events() -> None:
    broadcast = Broadcast("memory://")
    ended = Ended()

    async def on_disconnect(self: EventStreamView, reason: DisconnectReason) -> None:
        ended.add("merging", reason)

    view = type(
        "Merging",
        (MergingView,),
        {"broadcast": broadcast, "max_buffer_events": 10, "on_disconnect": on_disconnect},
    )
    app = app_for(broadcast, Route("/room", view))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/room") as stream:
            await read(stream, 1)  # welcome
            stream.pause()
            with anyio.fail_after(1):
                for n in range(100):
                    await broadcast.publish("room", n)
            assert await ended.wait("merging") is DisconnectReason.SLOW_CONSUMER


@pytest.mark.parametrize("override", [False, True])
async def test_view_burst_of_publishes_does_not_starve_writers(override: bool) -> None:
    broadcast = Broadcast("memory://", retention=10_000)
    ended = Ended()
    if override:

        async def on_disconnect(self: EventStreamView, reason: DisconnectReason) -> None:
            ended.add(self.request.query_params.get("who", ""), reason)

        view: type = type(
            "Merging",
            (MergingView,),
            {"broadcast": broadcast, "max_buffer_events": 50, "on_disconnect": on_disconnect},
        )
    else:
        view = room_view(broadcast, ended, max_buffer_events=50)
    app = app_for(broadcast, Route("/room", view))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/room?who=reader") as reader:
            with anyio.fail_after(10):
                ids = [await broadcast.publish("room", n) for n in range(5000)]
            received = [e.id for e in await read(reader, 1 + 2 * 5000 if override else 5000)]
            assert "reader" not in ended.reasons
    group_ids = [event_id for event_id in received if event_id is not None]
    assert group_ids == ids


# -- backend failure ------------------------------------------------------------------


@pytest.mark.parametrize("override", [False, True])
async def test_view_backend_failure_ends_streams_and_client_replays(
    override: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sseviews")
    broadcast = Broadcast("memory://")
    ended = Ended()
    if override:

        async def on_disconnect(self: EventStreamView, reason: DisconnectReason) -> None:
            ended.add(self.request.query_params.get("who", ""), reason)

        view: type = type(
            "Merging", (MergingView,), {"broadcast": broadcast, "on_disconnect": on_disconnect}
        )
    else:
        view = room_view(broadcast, ended)
    app = app_for(broadcast, Route("/room", view))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/room?who=a") as first, client.stream("/room?who=b") as second:
            seen = await broadcast.publish("room", "seen")
            for stream in (first, second):
                assert (await read_until(stream, seen))[-1].id == seen
            broadcast._fail_all(BackendError("x"))
            assert await ended.wait("a") is DisconnectReason.ERROR
            assert await ended.wait("b") is DisconnectReason.ERROR
            await first.wait_ended()
            await second.wait_ended()
            assert first.last_event_id == seen
        assert broadcast.subscriber_count == 0
        missed = [await broadcast.publish("room", n) for n in range(3)]
        async with client.stream("/room?who=c", headers={"Last-Event-ID": seen}) as stream:
            events = [e for e in await read(stream, 6 if override else 3) if e.id is not None]
            assert [e.id for e in events] == missed
    assert any(
        r.levelno == logging.WARNING and "backend failed" in r.getMessage() for r in caplog.records
    )


async def test_view_backend_failure_ends_a_stream_whose_client_stopped_reading() -> None:
    broadcast = Broadcast("memory://")
    ended = Ended()
    app = app_for(broadcast, Route("/room", room_view(broadcast, ended)))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/room?who=paused") as stream:
            stream.pause()
            await broadcast.publish("room", "stuck in a blocked write")
            broadcast._fail_all(BackendError("x"))
            # Not held for the whole send_timeout (30 s) by the blocked write.
            assert await ended.wait("paused") is DisconnectReason.ERROR
        assert broadcast.subscriber_count == 0


async def read_until(stream: EventStream, event_id: str) -> list[Event]:
    events: list[Event] = []
    while not events or events[-1].id != event_id:
        events.append(await stream.next_event(timeout=TIMEOUT))
    return events
