"""Live events that arrive out of id order (issue #18 §4).

When one system assigns the ids (a SQL history shared by processes) and another
delivers them (Redis), event N+2 may reach a process before N+1. A subscription
that receives a stored event beyond the next one it expects reads the hole from
the history, then goes on live, dropping the late copies as duplicates.

The live backend here is one the test controls (it delivers a window of events
shuffled, or drops some); the history stores are real.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from support.broadcast import steps

from sseviews import RESET_EVENT, Broadcast, Event, EventStreamView, SlowConsumer, Subscription
from sseviews.backends.base import EPHEMERAL_SEQ
from sseviews.backends.memory import MemoryBackend
from sseviews.stores.base import HistoryStore, Page, Position, parse_id
from sseviews.stores.memory import MemoryStore
from sseviews.stores.sqlalchemy import SQLAlchemyStore
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio

TIMEOUT = 3.0


class ShufflingBackend(MemoryBackend):
    """Delivers stored events in this process, `window` at a time, each window in a
    random order (as two processes publishing to one group may), and never delivers
    the seqs in `lost` (a publisher that died between storing and delivering).
    Ephemeral events go at once."""

    def __init__(self, window: int, seed: int, lost: set[int] | None = None) -> None:
        super().__init__()
        self.window = window
        self.random = random.Random(seed)
        self.lost = lost or set()
        self.held: list[tuple[str, int, bytes]] = []
        self.reordered = 0

    async def deliver(self, group: str, seq: int, wire: bytes) -> None:
        if seq == EPHEMERAL_SEQ:
            await super().deliver(group, seq, wire)
            return
        if seq not in self.lost:
            self.held.append((group, seq, wire))
        if len(self.held) >= self.window:
            await self.flush()

    async def flush(self) -> None:
        held, self.held = self.held, []
        shuffled = held[:]
        self.random.shuffle(shuffled)
        self.reordered += sum(a != b for a, b in zip(held, shuffled, strict=True))
        for group, seq, wire in shuffled:
            await super().deliver(group, seq, wire)


def sqlite_store(tmp_path: Path, **kwargs: Any) -> SQLAlchemyStore:
    return SQLAlchemyStore(f"sqlite+aiosqlite:///{tmp_path}/history.db", **kwargs)


def memory_store(tmp_path: Path, **kwargs: Any) -> MemoryStore:
    return MemoryStore(**kwargs)


STORES = [pytest.param(memory_store, id="memory"), pytest.param(sqlite_store, id="sqlite")]
StoreFactory = Callable[..., HistoryStore]


async def take(subscription: Subscription, count: int) -> list[Event]:
    with anyio.fail_after(TIMEOUT):
        return [await anext(subscription) for _ in range(count)]


async def nothing_more(subscription: Subscription) -> bool:
    with anyio.move_on_after(0.05):
        await anext(subscription)
        return False
    return True


@pytest.mark.parametrize("make_store", STORES)
@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "last-event-id"])
async def test_order_one_group_gets_every_event_once_in_order(
    tmp_path: Path, make_store: StoreFactory, resume: bool
) -> None:
    live = ShufflingBackend(window=7, seed=1)
    async with Broadcast(live, history=make_store(tmp_path)) as broadcast:
        start = await broadcast.publish("g", "before")
        await live.flush()
        async with broadcast.subscribe(
            "g", last_event_id=start if resume else None
        ) as subscription:
            # A fresh stream's position is its first event: one delivered alone.
            anchor = await broadcast.publish("g", "anchor")
            await live.flush()
            assert [event.id for event in await take(subscription, 1)] == [anchor]
            ids = [await broadcast.publish("g", str(n)) for n in range(200)]
            await live.flush()
            events = await take(subscription, len(ids))
            assert [event.id for event in events] == ids
            assert [event.data for event in events] == [str(n) for n in range(200)]
            assert await nothing_more(subscription)
        assert live.reordered > 100  # the events did arrive out of order


@pytest.mark.parametrize("make_store", STORES)
async def test_order_several_groups_get_every_event_once_in_order(
    tmp_path: Path, make_store: StoreFactory
) -> None:
    live = ShufflingBackend(window=9, seed=2)
    async with Broadcast(live, history=make_store(tmp_path)) as broadcast:
        start = await broadcast.last_id("a", "b", "c")
        async with broadcast.subscribe("a", "b", "c", last_event_id=start) as subscription:
            rng = random.Random(3)
            published: dict[str, list[str]] = {"a": [], "b": [], "c": []}
            for n in range(240):
                group = rng.choice("abc")
                published[group].append(await broadcast.publish(group, f"{group}{n}"))
            await live.flush()
            events = await take(subscription, 240)
            assert await nothing_more(subscription)
        # Every composite id moves one group one seq on: nothing lost, nothing twice.
        moved = steps(start, [event.id or "" for event in events])
        for index, group in enumerate("abc"):
            seqs = [position.seq for moved_index, position in moved if moved_index == index]
            assert seqs == [parse_id(event_id)[1] for event_id in published[group]]
        assert live.reordered > 100


@pytest.mark.parametrize("make_store", STORES)
@pytest.mark.parametrize("groups", [["g"], ["g", "other"]], ids=["one", "several"])
async def test_order_events_never_delivered_are_read_from_the_history(
    tmp_path: Path, make_store: StoreFactory, groups: list[str]
) -> None:
    # Seqs 3, 4 and 9 are stored but never delivered live (their publisher died in
    # between): the next event delivered shows the hole, and the history fills it.
    live = ShufflingBackend(window=1, seed=0, lost={3, 4, 9})
    async with Broadcast(live, history=make_store(tmp_path)) as broadcast:
        start = await broadcast.last_id(*groups)
        async with broadcast.subscribe(*groups, last_event_id=start) as subscription:
            ids = [await broadcast.publish("g", str(n)) for n in range(1, 11)]
            events = await take(subscription, 10)
            assert [event.data for event in events] == [str(n) for n in range(1, 11)]
            if len(groups) == 1:
                assert [event.id for event in events] == ids
            else:
                steps(start, [event.id or "" for event in events])
            assert await nothing_more(subscription)


async def test_order_ephemeral_events_are_no_hole_and_are_kept_while_one_is_read(
    tmp_path: Path,
) -> None:
    live = ShufflingBackend(window=1, seed=0, lost={2})
    async with Broadcast(live, history=sqlite_store(tmp_path)) as broadcast:
        first = await broadcast.publish("g", "1")
        async with broadcast.subscribe("g", last_event_id=first) as subscription:
            await broadcast.publish_ephemeral("g", "typing")  # seq 0: not a hole
            await broadcast.publish("g", "2")  # stored, never delivered
            three = await broadcast.publish("g", "3")  # shows the hole
            await broadcast.publish_ephemeral("g", "typing again")  # held meanwhile
            events = await take(subscription, 4)
            assert [event.data for event in events] == ["typing", "2", "3", "typing again"]
            assert events[2].id == three
            assert await nothing_more(subscription)


async def test_order_new_epoch_is_no_hole(tmp_path: Path) -> None:
    store = MemoryStore()
    async with Broadcast(ShufflingBackend(window=1, seed=0), history=store) as broadcast:
        first = await broadcast.publish("g", "1")
        await broadcast.publish("g", "2")
        async with broadcast.subscribe("g", last_event_id=first) as subscription:
            assert [event.data for event in await take(subscription, 1)] == ["2"]
            # The history restarts: seq 5 of a new epoch goes on, no read of a hole.
            store._groups["g"].epoch = "0badcafe"
            store._groups["g"].seq = 4
            fresh = await broadcast.publish("g", "new epoch")
            assert fresh == "0badcafe-5"
            (event,) = await take(subscription, 1)
            assert (event.id, event.data) == (fresh, "new epoch")
            assert await nothing_more(subscription)


@pytest.mark.parametrize("groups", [["g"], ["g", "other"]], ids=["one", "several"])
async def test_order_hole_trimmed_from_history_gets_the_reset_event(
    tmp_path: Path, groups: list[str]
) -> None:
    live = ShufflingBackend(window=1, seed=0, lost={2})
    store = sqlite_store(tmp_path, retention=3)
    async with Broadcast(live, history=store) as broadcast:
        start = await broadcast.last_id(*groups)
        await broadcast.publish("g", "1")
        async with broadcast.subscribe(*groups, last_event_id=start) as subscription:
            assert [event.data for event in await take(subscription, 1)] == ["1"]
            live.window = 10  # held until flushed: seq 2 is trimmed before 3 arrives
            for n in range(3, 8):
                await broadcast.publish("g", str(n))
            await live.flush()
            (reset,) = await take(subscription, 1)
            assert reset.event == RESET_EVENT
            head = await broadcast.last_id(*groups)
            assert reset.json() == {"reason": "expired", "head": head, "groups": ["g"]}
            assert reset.id == head
            # Then live from the head.
            live.window = 1
            await broadcast.publish("g", "8")
            assert [event.data for event in await take(subscription, 1)] == ["8"]
            assert await nothing_more(subscription)


class LaggingStore(MemoryStore):
    """A memory store whose reads do not show the seqs in `hidden` (an event still
    being stored by another process, or one the store lost)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: set[int] = set()
        self.reads = 0

    async def read_page(
        self, group: str, after: Position, upto: int, limit_bytes: int
    ) -> Page | None:
        self.reads += 1
        page = await super().read_page(group, after, upto, limit_bytes)
        if page is None:
            return None
        return Page([event for event in page.events if event[0] not in self.hidden], page.end)


async def test_order_hole_not_in_history_yet_is_read_again() -> None:
    store = LaggingStore()
    live = ShufflingBackend(window=1, seed=0, lost={2})
    async with Broadcast(live, history=store) as broadcast:
        first = await broadcast.publish("g", "1")
        async with broadcast.subscribe("g", last_event_id=first) as subscription:
            store.hidden = {2}
            await broadcast.publish("g", "2")
            await broadcast.publish("g", "3")
            got: list[Event] = []

            async def read_two() -> None:
                got.extend(await take(subscription, 2))

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(read_two)
                await anyio.sleep(0.03)  # a read or two without it, then it is there
                store.hidden = set()
            assert [event.data for event in got] == ["2", "3"]
            assert store.reads >= 2


async def test_order_hole_never_in_history_gets_the_reset_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = LaggingStore()
    live = ShufflingBackend(window=1, seed=0, lost={2})
    async with Broadcast(live, history=store) as broadcast:
        first = await broadcast.publish("g", "1")
        async with broadcast.subscribe("g", last_event_id=first) as subscription:
            store.hidden = {2}
            await broadcast.publish("g", "2")
            await broadcast.publish("g", "3")
            with caplog.at_level(logging.WARNING, "sseviews"):
                (reset,) = await take(subscription, 1)
            assert reset.event == RESET_EVENT
            assert reset.json()["reason"] == "expired"
            assert "lacks events after seq 1 up to 2" in caplog.text
            four = await broadcast.publish("g", "4")
            assert [event.id for event in await take(subscription, 1)] == [four]


async def test_order_events_held_while_a_hole_is_read_count_against_the_limit(
    tmp_path: Path,
) -> None:
    live = ShufflingBackend(window=1, seed=0, lost={2})
    async with Broadcast(live, history=MemoryStore()) as broadcast:
        first = await broadcast.publish("g", "1")
        async with broadcast.subscribe("g", last_event_id=first, max_events=5) as subscription:
            for n in range(2, 10):  # the hole at 2 is not read: nobody iterates
                await broadcast.publish("g", str(n))
            with anyio.fail_after(TIMEOUT), pytest.raises(SlowConsumer):
                async for _ in subscription:
                    pass


async def test_order_view_sending_from_its_subscription_reads_the_hole(tmp_path: Path) -> None:
    live = ShufflingBackend(window=6, seed=4)
    broadcast = Broadcast(live, history=sqlite_store(tmp_path))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with broadcast:
            yield

    class Room(EventStreamView):
        groups = ("room",)
        ping_interval = None

    Room.broadcast = broadcast
    app = Starlette(routes=[Route("/room", Room)], lifespan=lifespan)
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        start = await broadcast.last_id("room")
        async with client.stream("/room", headers={"Last-Event-ID": start}) as stream:
            ids = [await broadcast.publish("room", n) for n in range(60)]
            await live.flush()
            got = [(await stream.next_event(timeout=TIMEOUT)).id for _ in ids]
            assert got == ids
    assert live.reordered > 30


class SlowStore(MemoryStore):
    """A memory store whose page reads take a while, and are counted."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def read_page(
        self, group: str, after: Position, upto: int, limit_bytes: int
    ) -> Page | None:
        self.reads += 1
        await anyio.sleep(0.02)
        return await super().read_page(group, after, upto, limit_bytes)


async def test_order_streams_that_see_one_hole_read_it_once() -> None:
    store = SlowStore()
    live = ShufflingBackend(window=1, seed=0, lost={2})
    async with Broadcast(live, history=store) as broadcast:
        first = await broadcast.publish("g", "1")
        results: list[list[str]] = []

        async def stream(ready: anyio.Event) -> None:
            async with broadcast.subscribe("g", last_event_id=first) as subscription:
                ready.set()
                results.append([event.data for event in await take(subscription, 2)])

        async with anyio.create_task_group() as tasks:
            for _ in range(20):
                ready = anyio.Event()
                tasks.start_soon(stream, ready)
                await ready.wait()
            await broadcast.publish("g", "2")
            await broadcast.publish("g", "3")
    assert results == [["2", "3"]] * 20
    assert store.reads == 1
