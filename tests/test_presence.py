"""Presence in one process: the view hook, the memory backend, limits, ephemeral events."""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from support.apps import member_view, room_app
from support.inprocess import serve_in_process
from support.raw import RawEventStream, raw_head

import sseviews
from sseviews import (
    JOIN_EVENT,
    LEAVE_EVENT,
    Broadcast,
    BroadcastNotConnected,
    Event,
    EventStreamView,
    PresenceEntry,
)
from sseviews._broadcast import Attachment, Delivery, Subscription, _Lane
from sseviews.backends.base import EPHEMERAL_SEQ, Dispatch, LiveBackend, OnFailure
from sseviews.stores.base import Page, id_line
from sseviews.testing import EventStream, EventStreamClient

pytestmark = pytest.mark.anyio

TIMEOUT = 3.0
# The longest a stream stays listed once its client has closed the connection
# (docs/presence.md): the server hears the close, the stream leaves its groups'
# presence, and its `sseviews.leave` reaches the others.
LEAVE_BOUND = 1.0


async def users(broadcast: Broadcast, group: str = "room:a") -> list[str]:
    return [entry.info["user"] for entry in await broadcast.presence(group)]


async def next_raw_named(stream: RawEventStream, name: str, seen: int) -> tuple[Event, int]:
    """The next event named `name` after the first `seen` of a raw stream, and its count."""
    while True:
        events = await stream.read_events(seen + 1)
        if len(events) <= seen:
            raise EOFError(f"the stream ended before a {name!r} event")
        seen += 1
        if events[seen - 1].event == name:
            return events[seen - 1], seen


async def next_named(stream: EventStream, name: str) -> Event:
    with anyio.fail_after(TIMEOUT):
        while True:
            event = await stream.next_event()
            if event.event == name:
                return event


async def test_presence_default_hook_tracks_nothing() -> None:
    broadcast = Broadcast()

    class Plain(EventStreamView):
        ping_interval = None

    Plain.broadcast = broadcast
    Plain.groups = ["room:a"]
    async with EventStreamClient(room_app(broadcast, Plain)) as client:
        async with client.stream("/room/a") as stream:
            assert stream.status_code == 200
            assert await broadcast.presence("room:a") == []
            assert await broadcast.presence_count("room:a") == 0


async def test_presence_lists_a_stream_while_it_is_open() -> None:
    broadcast = Broadcast()
    async with EventStreamClient(room_app(broadcast, member_view(broadcast))) as client:
        async with client.stream("/room/a?user=alice") as alice:
            assert alice.status_code == 200
            (entry,) = await broadcast.presence("room:a")
            assert entry.info == {"user": "alice"}
            assert isinstance(entry.id, str) and entry.id
            assert entry.joined_at > 0
            async with client.stream("/room/a?user=bob"):
                assert await users(broadcast) == ["alice", "bob"]
                assert await broadcast.presence_count("room:a") == 2
                assert await broadcast.presence_count("room:b") == 0
            assert await users(broadcast) == ["alice"]
        assert await broadcast.presence("room:a") == []
        assert await broadcast.presence_count("room:a") == 0


async def test_presence_hook_may_be_async_and_return_none() -> None:
    broadcast = Broadcast()

    async def presence_info(self: EventStreamView) -> dict[str, Any] | None:
        await anyio.lowlevel.checkpoint()
        user = self.request.query_params.get("user")
        return {"user": user, "async": True} if user else None

    view = member_view(broadcast, presence_info=presence_info)
    async with EventStreamClient(room_app(broadcast, view)) as client:
        async with client.stream("/room/a?user=ann"), client.stream("/room/a"):
            entries = await broadcast.presence("room:a")
            assert [entry.info for entry in entries] == [{"user": "ann", "async": True}]


async def test_presence_lists_every_group_of_the_stream() -> None:
    broadcast = Broadcast()
    view = member_view(broadcast, groups=["room:a", "room:b", "room:a"])
    async with EventStreamClient(room_app(broadcast, view)) as client:
        async with client.stream("/room/x?user=cy"):
            assert await users(broadcast, "room:a") == ["cy"]
            assert await users(broadcast, "room:b") == ["cy"]
            first, second = await broadcast.presence("room:a"), await broadcast.presence("room:b")
            assert first[0].id == second[0].id
        assert await broadcast.presence_count("room:a") == 0
        assert await broadcast.presence_count("room:b") == 0


async def test_presence_connection_ids_are_unique() -> None:
    broadcast = Broadcast()
    async with EventStreamClient(room_app(broadcast, member_view(broadcast))) as client:
        async with client.stream("/room/a?user=d"), client.stream("/room/a?user=d"):
            entries = await broadcast.presence("room:a")
            assert len(entries) == 2
            assert entries[0].id != entries[1].id
            assert [entry.info for entry in entries] == [{"user": "d"}, {"user": "d"}]


async def test_presence_announce_sends_join_and_leave_in_order_without_ids() -> None:
    broadcast = Broadcast()
    view = member_view(broadcast, announce_presence=True)
    async with EventStreamClient(room_app(broadcast, view)) as client:
        async with client.stream("/room/a?user=alice") as alice:
            own = await next_named(alice, JOIN_EVENT)
            assert own.id is None
            assert json.loads(own.data)["info"] == {"user": "alice"}
            first = await broadcast.publish("room:a", {"n": 1})
            async with client.stream("/room/a?user=bob"):
                await broadcast.publish("room:a", {"n": 2})
            with anyio.fail_after(TIMEOUT):
                events = [await alice.next_event() for _ in range(4)]
            assert await users(broadcast) == ["alice"]
            assert [(event.event, event.id) for event in events] == [
                (None, first),
                (JOIN_EVENT, None),
                (None, events[2].id),
                (LEAVE_EVENT, None),
            ]
            joined = json.loads(events[1].data)
            assert joined["info"] == {"user": "bob"}
            assert json.loads(events[3].data) == joined
            # Join and leave never move the cursor: it is the last published id.
            assert alice.last_event_id == events[2].id


async def test_presence_join_and_leave_are_not_replayed() -> None:
    broadcast = Broadcast()
    view = member_view(broadcast, announce_presence=True)
    async with EventStreamClient(room_app(broadcast, view)) as client:
        first = await broadcast.publish("room:a", "one")
        async with client.stream("/room/a?user=bob") as bob:
            await next_named(bob, JOIN_EVENT)
        await broadcast.publish("room:a", "two")
        async with client.stream("/room/a", headers={"last-event-id": first}) as late:
            with anyio.fail_after(TIMEOUT):
                replayed = await late.next_event()
            assert (replayed.event, replayed.data) == (None, "two")
            await broadcast.publish("room:a", "three")
            with anyio.fail_after(TIMEOUT):
                live = await late.next_event()
            assert live.data == "three"


async def test_presence_without_announce_sends_no_join_event() -> None:
    broadcast = Broadcast()
    async with EventStreamClient(room_app(broadcast, member_view(broadcast))) as client:
        async with client.stream("/room/a?user=a") as first:
            async with client.stream("/room/a?user=b"):
                pass
            await broadcast.publish("room:a", "only")
            with anyio.fail_after(TIMEOUT):
                event = await first.next_event()
            assert (event.event, event.data) == (None, "only")


async def test_presence_oversized_info_is_refused_with_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broadcast = Broadcast()
    view = member_view(broadcast, presence_info_max_bytes=64)
    async with EventStreamClient(room_app(broadcast, view)) as client:
        with caplog.at_level(logging.ERROR, logger="sseviews"):
            async with client.stream("/room/a?user=" + "x" * 100) as stream:
                await stream.wait_ended()
        assert stream.status_code == 500
        assert "x" * 100 not in stream.text
        assert "more than the 64 allowed" in caplog.text
        assert "refused with 500" in caplog.text
        assert await broadcast.presence_count("room:a") == 0
        assert broadcast.subscriber_count == 0
        async with client.stream("/room/a?user=" + "x" * 40) as fits:
            assert fits.status_code == 200
            assert await users(broadcast) == ["x" * 40]


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ({"when": object()}, "JSON-serialisable"),
        (["alice"], "must return a mapping"),
        ({"nan": float("nan")}, "JSON-serialisable"),
    ],
)
async def test_presence_bad_info_is_refused_with_500(
    caplog: pytest.LogCaptureFixture, info: Any, message: str
) -> None:
    broadcast = Broadcast()
    view = member_view(broadcast, presence_info=lambda self: info)
    async with EventStreamClient(room_app(broadcast, view)) as client:
        with caplog.at_level(logging.ERROR, logger="sseviews"):
            async with client.stream("/room/a") as stream:
                await stream.wait_ended()
        assert stream.status_code == 500
        assert message in caplog.text
        assert await broadcast.presence_count("room:a") == 0


async def test_presence_is_capped_by_limit() -> None:
    broadcast = Broadcast()
    async with EventStreamClient(room_app(broadcast, member_view(broadcast))) as client:
        async with (
            client.stream("/room/a?user=1"),
            client.stream("/room/a?user=2"),
            client.stream("/room/a?user=3"),
        ):
            assert len(await broadcast.presence("room:a", limit=2)) == 2
            assert len(await broadcast.presence("room:a")) == 3
            assert await broadcast.presence_count("room:a") == 3
            for bad in (0, -1, True, 1.5):
                with pytest.raises(ValueError, match="limit must be an int"):
                    await broadcast.presence("room:a", limit=bad)


async def test_presence_checks_group_and_connection() -> None:
    broadcast = Broadcast()
    with pytest.raises(BroadcastNotConnected):
        await broadcast.presence("room:a")
    with pytest.raises(BroadcastNotConnected):
        await broadcast.presence_count("room:a")
    async with broadcast:
        with pytest.raises(ValueError, match="whitespace"):
            await broadcast.presence("room a")
        with pytest.raises(TypeError):
            await broadcast.presence_count(3)  # type: ignore[arg-type]


def test_presence_settings_are_checked() -> None:
    with pytest.raises(TypeError, match="announce_presence must be a bool"):
        type("Bad", (EventStreamView,), {"announce_presence": "yes"})
    with pytest.raises(ValueError, match="presence_info_max_bytes must be >= 1"):
        type("Bad", (EventStreamView,), {"presence_info_max_bytes": 0})


class NoPresenceBackend(LiveBackend):
    """A live backend of a third party that knows nothing of presence."""

    def __init__(self) -> None:
        self.dispatch: Dispatch | None = None

    async def connect(self, dispatch: Dispatch, on_failure: OnFailure) -> None:
        self.dispatch = dispatch

    async def disconnect(self) -> None:
        self.dispatch = None

    async def deliver(self, group: str, seq: int, wire: bytes) -> None:
        if self.dispatch is not None:
            self.dispatch(group, seq, wire)


async def test_presence_on_a_backend_without_presence_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broadcast = Broadcast(NoPresenceBackend())
    async with EventStreamClient(room_app(broadcast, member_view(broadcast))) as client:
        with caplog.at_level(logging.ERROR, logger="sseviews"):
            async with client.stream("/room/a?user=z") as stream:
                await stream.wait_ended()
        assert stream.status_code == 500
        assert "does not track presence" in caplog.text
        assert broadcast.subscriber_count == 0
        async with client.stream("/room/a") as anonymous:
            assert anonymous.status_code == 200


async def test_publish_ephemeral_is_live_only() -> None:
    broadcast = Broadcast()

    class Room(EventStreamView):
        ping_interval = None

    Room.broadcast = broadcast
    Room.groups = ["room:a"]
    async with EventStreamClient(room_app(broadcast, Room)) as client:
        first = await broadcast.publish("room:a", "stored")
        async with client.stream("/room/a") as stream:
            await broadcast.publish_ephemeral("room:a", Event("typing", event="typing"))
            await broadcast.publish_ephemeral("room:a", {"plain": True})
            with anyio.fail_after(TIMEOUT):
                typing, plain = await stream.next_event(), await stream.next_event()
            assert (typing.event, typing.data, typing.id) == ("typing", "typing", None)
            assert (plain.event, plain.json(), plain.id) == (None, {"plain": True}, None)
        async with client.stream("/room/a", headers={"last-event-id": first}) as late:
            second = await broadcast.publish("room:a", "next")
            with anyio.fail_after(TIMEOUT):
                event = await late.next_event()
            assert (event.id, event.data) == (second, "next")
        with pytest.raises(ValueError, match="carries no id"):
            await broadcast.publish_ephemeral("room:a", Event("x", id="1"))


def _wire(data: str) -> bytes:
    return Event(data).encode()


def _stored(seq: int, data: str) -> bytes:
    return id_line("0badcafe", seq) + _wire(data)


def test_subscription_keeps_ephemeral_events_held_during_replay() -> None:
    subscription = Subscription()
    subscription.offer(Delivery("g", 4, _stored(4, "four")))  # covered by the replay
    subscription.offer(Delivery("g", EPHEMERAL_SEQ, _wire("joined")))
    subscription.offer(Delivery("g", 6, _stored(6, "six")))
    lane = _Lane("g", b"0badcafe", 5)  # the head when it attached
    lane.seq = lane.cursor = 3  # the client's position: 4 and 5 are replayed
    subscription._start(Attachment([lane]))
    assert subscription.pending_history
    subscription._queue_page(lane, Page([(4, _stored(4, "four")), (5, _stored(5, "five"))], 5))
    assert not subscription.pending_history
    assert subscription.take(1 << 20) == _stored(4, "four") + _stored(5, "five")
    assert subscription.take(1 << 20) == _wire("joined") + _stored(6, "six")
    # An ephemeral event after live ones is neither a duplicate nor a new floor.
    subscription.offer(Delivery("g", EPHEMERAL_SEQ, _wire("left")))
    subscription.offer(Delivery("g", 6, _stored(6, "six again")))
    subscription.offer(Delivery("g", 7, _stored(7, "seven")))
    assert subscription.take(1 << 20) == _wire("left") + _stored(7, "seven")


def test_presence_entry_equality_and_dict() -> None:
    entry = PresenceEntry("a-1", {"user": "u"}, 1.5)
    assert entry == PresenceEntry("a-1", {"user": "u"}, 1.5)
    assert entry != PresenceEntry("a-2", {"user": "u"}, 1.5)
    assert entry.as_dict() == {"id": "a-1", "info": {"user": "u"}, "joined_at": 1.5}
    assert "a-1" in repr(entry)
    assert {"JOIN_EVENT", "LEAVE_EVENT", "PresenceEntry"} <= set(sseviews.__all__)


@pytest.mark.slow
async def test_presence_leaves_within_the_bound_once_the_client_closes_under_uvicorn() -> None:
    broadcast = Broadcast()
    view = member_view(broadcast, announce_presence=True)
    async with serve_in_process(room_app(broadcast, view)) as server:
        with anyio.fail_after(TIMEOUT):
            watcher = await RawEventStream.open(server.port, "/room/a")
        seen = 0
        try:
            for number in range(20):  # every close, not one lucky one
                user = f"user{number}"
                with anyio.fail_after(TIMEOUT):
                    member = await RawEventStream.open(server.port, f"/room/a?user={user}")
                    await next_raw_named(member, JOIN_EVENT, 0)  # read all it was sent
                    joined, seen = await next_raw_named(watcher, JOIN_EVENT, seen)
                assert await users(broadcast) == [user]
                member.close()  # a FIN, as a browser closing the stream sends
                with anyio.fail_after(LEAVE_BOUND):
                    left, seen = await next_raw_named(watcher, LEAVE_EVENT, seen)
                assert left.data == joined.data
                assert await broadcast.presence_count("room:a") == 0
        finally:
            watcher.close()


@pytest.mark.slow
async def test_presence_never_lists_a_head_request_under_uvicorn() -> None:
    # HEAD answers with the stream's status and opens no stream: a page asks it why its
    # stream failed without being listed, even while the connection stays open.
    broadcast = Broadcast()
    view = member_view(broadcast, announce_presence=True)
    async with serve_in_process(room_app(broadcast, view)) as server:
        with anyio.fail_after(TIMEOUT):
            watcher = await RawEventStream.open(server.port, "/room/a")
            status, sock = await raw_head(server.port, "/room/a?user=zed")
        try:
            assert status == 200
            assert await broadcast.presence_count("room:a") == 0
            marker = await broadcast.publish("room:a", "after the HEAD")
            with anyio.fail_after(TIMEOUT):
                events = await watcher.read_events(1)
            # No join came before the group's next event.
            assert [(event.event, event.id) for event in events] == [(None, marker)]
            assert await broadcast.presence_count("room:a") == 0
        finally:
            sock.close()
            watcher.close()
