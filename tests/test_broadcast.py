from __future__ import annotations

import logging
import random
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from support.broadcast import YieldingStore, steps
from support.redis import REDIS_URL, delete_prefix, redis_client, unique_prefix

from sseviews import (
    RESET_EVENT,
    BackendError,
    Broadcast,
    BroadcastNotConnected,
    Event,
    InvalidLastEventId,
    SlowConsumer,
    Subscription,
)
from sseviews._broadcast import MAX_GROUP_LENGTH, check_group
from sseviews.backends.memory import MemoryBackend
from sseviews.stores.base import MAX_CURSOR_GROUPS, Position, format_id, parse_cursor
from sseviews.stores.memory import MemoryStore
from sseviews.stores.redis import RedisStore

pytestmark = pytest.mark.anyio

ID = re.compile(r"([0-9a-f]{8})-([1-9][0-9]*)")


def seq_of(event_id: str) -> int:
    return int(event_id.rsplit("-", 1)[1])


async def take(subscription: Subscription, count: int, within: float = 2) -> list[Event]:
    events: list[Event] = []
    with anyio.fail_after(within):
        for _ in range(count):
            events.append(await anext(subscription))
    return events


async def nothing_more(subscription: Subscription) -> bool:
    """True when no event is waiting (after letting pending deliveries run)."""
    with anyio.move_on_after(0.05):
        await anext(subscription)
        return False
    return True


@pytest.fixture
async def broadcast() -> AsyncIterator[Broadcast]:
    async with Broadcast("memory://") as connected:
        yield connected


# -- publishing and ids ----------------------------------------------------------------


async def test_publish_returns_ids_of_each_groups_epoch_and_sequence(
    broadcast: Broadcast,
) -> None:
    ids = [await broadcast.publish(group, "x") for group in ["a", "b", "a", "c", "b", "a"]]
    matches = [ID.fullmatch(event_id) for event_id in ids]
    assert all(matches), ids
    epochs = [m.group(1) for m in matches if m]
    assert epochs[0] == epochs[2] == epochs[5]
    assert epochs[1] == epochs[4]
    assert len({epochs[0], epochs[1], epochs[3]}) == 3
    assert [seq_of(event_id) for event_id in ids] == [1, 1, 2, 1, 2, 3]
    assert await broadcast.last_id("a") == ids[5]
    assert await broadcast.last_id("b", "a", "b") == f"{ids[5]}.{ids[4]}"


async def test_last_id_of_a_new_group_is_its_epoch_at_zero(broadcast: Broadcast) -> None:
    zero = await broadcast.last_id("new")
    assert re.fullmatch(r"[0-9a-f]{8}-0", zero)
    first = await broadcast.publish("new", "x")
    assert first == f"{zero[:8]}-1"
    with pytest.raises(ValueError, match="at least one group"):
        await broadcast.last_id()


async def test_publish_carries_data_name_and_id_to_subscribers(broadcast: Broadcast) -> None:
    async with broadcast.subscribe("a") as sub:
        first = await broadcast.publish("a", {"n": 1})
        second = await broadcast.publish("a", Event("hi", event="greeting"))
        events = await take(sub, 2)
    assert [event.id for event in events] == [first, second]
    assert events[0].json() == {"n": 1}
    assert events[0].event is None
    assert (events[1].data, events[1].event) == ("hi", "greeting")


async def test_publish_event_with_id_raises_value_error(broadcast: Broadcast) -> None:
    with pytest.raises(ValueError, match="assigns event ids"):
        await broadcast.publish("a", Event("x", id="mine"))
    # Nothing was published.
    assert seq_of(await broadcast.publish("a", "y")) == 1


@pytest.mark.parametrize(
    "group",
    [
        "",
        " ",
        "a b",
        "a\tb",
        "room\n",
        "a\x00b",
        "a\x7fb",
        "zero\u200bwidth",  # a format character (Cf)
        "x" * (MAX_GROUP_LENGTH + 1),
    ],
)
async def test_publish_invalid_group_name_raises_value_error(
    broadcast: Broadcast, group: str
) -> None:
    with pytest.raises(ValueError, match="group name"):
        await broadcast.publish(group, "x")
    with pytest.raises(ValueError, match="group name"):
        async with broadcast.subscribe(group):
            pass  # pragma: no cover


@pytest.mark.parametrize("group", [None, 1, b"room", ["room"]])
async def test_publish_non_str_group_raises_type_error(broadcast: Broadcast, group: object) -> None:
    with pytest.raises(TypeError, match="must be a str"):
        await broadcast.publish(group, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a str"):
        async with broadcast.subscribe("ok", group):  # type: ignore[arg-type]
            pass  # pragma: no cover


@pytest.mark.parametrize(
    "group", ["a", "room:42", "user/7.jobs-x_y", "ünï", "x" * MAX_GROUP_LENGTH]
)
def test_check_group_accepts_valid_names(group: str) -> None:
    assert check_group(group) == group


async def test_subscribe_without_groups_raises_value_error(broadcast: Broadcast) -> None:
    with pytest.raises(ValueError, match="at least one group"):
        async with broadcast.subscribe():
            pass  # pragma: no cover


async def test_publish_and_subscribe_before_connect_raise_not_connected() -> None:
    broadcast = Broadcast("memory://")
    with pytest.raises(BroadcastNotConnected, match="async with broadcast"):
        await broadcast.publish("a", "x")
    with pytest.raises(BroadcastNotConnected):
        async with broadcast.subscribe("a"):
            pass  # pragma: no cover
    assert broadcast.subscriber_count == 0


async def test_publish_and_subscribe_after_disconnect_raise_not_connected() -> None:
    async with Broadcast("memory://") as broadcast:
        await broadcast.publish("a", "x")
    with pytest.raises(BroadcastNotConnected):
        await broadcast.publish("a", "x")
    with pytest.raises(BroadcastNotConnected):
        async with broadcast.subscribe("a"):
            pass  # pragma: no cover


def test_broadcast_unsupported_url_raises_value_error() -> None:
    with pytest.raises(ValueError, match="ftp://x"):
        Broadcast("ftp://x")


def test_broadcast_unsupported_history_raises_value_error() -> None:
    with pytest.raises(ValueError, match="unsupported history"):
        Broadcast("memory://", history="ftp://x")


@pytest.mark.parametrize("history", [123, b"memory://", ["memory://"]])
def test_broadcast_bad_history_type_raises_type_error(history: object) -> None:
    with pytest.raises(TypeError, match="history must be"):
        Broadcast("memory://", history=history)  # type: ignore[arg-type]


def test_broadcast_bad_url_type_raises_type_error() -> None:
    with pytest.raises(TypeError, match="url must be"):
        Broadcast(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", ["", None])
def test_broadcast_bad_prefix_raises_value_error(prefix: object) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Broadcast("memory://", prefix=prefix)  # type: ignore[arg-type]


def test_broadcast_bad_retention_raises() -> None:
    with pytest.raises(ValueError, match="retention"):
        Broadcast("memory://", retention=0)
    with pytest.raises(ValueError, match="bound"):
        Broadcast("memory://", retention=None)
    with pytest.raises(TypeError, match="max_age"):
        Broadcast("memory://", max_age="1")  # type: ignore[arg-type]


async def test_broadcast_accepts_backend_and_store_instances() -> None:
    store = MemoryStore(retention=5)
    async with Broadcast(MemoryBackend(), history=store) as broadcast:
        assert broadcast.store is store
        async with broadcast.subscribe("a") as sub:
            event_id = await broadcast.publish("a", "x")
            (event,) = await take(sub, 1)
    assert event.id == event_id
    assert format_id(*await store.head("a")) == event_id


async def test_broadcasts_side_by_side_are_independent() -> None:
    async with Broadcast() as first, Broadcast() as second:
        assert await first.last_id("a") != await second.last_id("a")
        async with first.subscribe("a") as sub_first, second.subscribe("a") as sub_second:
            await second.publish("a", "second")
            first_id = await first.publish("a", "first")
            assert [e.data for e in await take(sub_first, 1)] == ["first"]
            assert [e.data for e in await take(sub_second, 1)] == ["second"]
            assert await nothing_more(sub_second)
    assert seq_of(first_id) == 1


class FlakyBackend(MemoryBackend):
    """A memory backend that can refuse to connect or report itself unhealthy."""

    def __init__(self, *, refuse: bool = False) -> None:
        super().__init__()
        self.refuse = refuse
        self.up = True

    async def connect(self, dispatch: Any, on_failure: Any) -> None:
        if self.refuse:
            raise BackendError("cannot reach the backend")
        await super().connect(dispatch, on_failure)

    @property
    def healthy(self) -> bool:
        return self.up


class TrackedStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.open = False

    async def connect(self) -> None:
        self.open = True

    async def disconnect(self) -> None:
        self.open = False


async def test_connect_failure_closes_the_store_and_stays_disconnected() -> None:
    store = TrackedStore()
    broadcast = Broadcast(FlakyBackend(refuse=True), history=store)
    with pytest.raises(BackendError, match="cannot reach"):
        async with broadcast:
            pass  # pragma: no cover
    assert not store.open
    with pytest.raises(BroadcastNotConnected):
        await broadcast.publish("a", "x")


async def test_subscribe_while_backend_unhealthy_raises_backend_error() -> None:
    backend = FlakyBackend()
    async with Broadcast(backend) as broadcast:
        backend.up = False
        with pytest.raises(BackendError):
            async with broadcast.subscribe("a"):
                pass  # pragma: no cover
        assert broadcast.subscriber_count == 0
        backend.up = True
        async with broadcast.subscribe("a") as sub:
            event_id = await broadcast.publish("a", "back")
            assert [e.id for e in await take(sub, 1)] == [event_id]


# -- subscribing, replay and retention ------------------------------------------------------


async def test_subscribe_without_cursor_gets_live_events_only(broadcast: Broadcast) -> None:
    await broadcast.publish("a", "before")
    async with broadcast.subscribe("a") as sub:
        await broadcast.publish("a", "after")
        (event,) = await take(sub, 1)
        assert event.data == "after"
        assert await nothing_more(sub)


async def test_subscribe_replays_each_group_in_order_then_live(broadcast: Broadcast) -> None:
    await broadcast.publish("a", "a1")
    cursor = await broadcast.last_id("b", "a")
    assert cursor == f"{await broadcast.last_id('a')}.{await broadcast.last_id('b')}"
    for group, data in [("b", "b1"), ("c", "c1"), ("a", "a2"), ("c", "c2"), ("b", "b2")]:
        await broadcast.publish(group, data)
    async with broadcast.subscribe("b", "a", last_event_id=cursor) as sub:
        replayed = await take(sub, 3)
        # Group after group, by name; each group's events in their order.
        assert [e.data for e in replayed] == ["a2", "b1", "b2"]
        ids = [e.id or "" for e in replayed]
        assert [(i, p.seq) for i, p in steps(cursor, ids)] == [(0, 2), (1, 1), (1, 2)]
        live = [await broadcast.publish(g, g + "3") for g in ["c", "b", "a"]]
        events = await take(sub, 2)
        assert [e.data for e in events] == ["b3", "a3"]
        assert [e.id for e in events] == [
            f"{ids[-1].split('.')[0]}.{live[1]}",
            f"{live[2]}.{live[1]}",
        ]
        assert await nothing_more(sub)


async def test_subscribe_to_several_groups_without_cursor_sends_composite_ids(
    broadcast: Broadcast,
) -> None:
    before = await broadcast.publish("b", "old")
    async with broadcast.subscribe("b", "a") as sub:
        a1 = await broadcast.publish("a", "a1")
        b2 = await broadcast.publish("b", "b2")
        events = await take(sub, 2)
        assert [e.data for e in events] == ["a1", "b2"]
        assert [e.id for e in events] == [f"{a1}.{before}", f"{a1}.{b2}"]
        assert await nothing_more(sub)


async def test_subscribe_to_one_group_shares_the_published_bytes(broadcast: Broadcast) -> None:
    """The hot path: every stream of one group sends the bytes encoded once per publish."""
    async with broadcast.subscribe("a") as first, broadcast.subscribe("a") as second:
        await broadcast.publish("a", "x")
        assert first.take(1 << 20) is second.take(1 << 20)
        assert first.taken == second.taken == 1


async def test_subscribe_replays_nothing_when_cursor_is_head(broadcast: Broadcast) -> None:
    head = await broadcast.publish("a", "1")
    async with broadcast.subscribe("a", last_event_id=head) as sub:
        assert await nothing_more(sub)
        new = await broadcast.publish("a", "2")
        assert [e.id for e in await take(sub, 1)] == [new]


async def test_subscribe_cursor_zero_replays_all_retained(broadcast: Broadcast) -> None:
    zero = await broadcast.last_id("a")
    ids = [await broadcast.publish("a", str(n)) for n in range(3)]
    async with broadcast.subscribe("a", last_event_id=zero) as sub:
        assert [e.id for e in await take(sub, 3)] == ids


async def test_subscribe_same_group_twice_replays_each_event_once(broadcast: Broadcast) -> None:
    cursor = await broadcast.publish("a", "0")
    ids = [await broadcast.publish("a", str(n)) for n in range(3)]
    async with broadcast.subscribe("a", "a", last_event_id=cursor) as sub:
        assert [e.id for e in await take(sub, 3)] == ids
        live = await broadcast.publish("a", "live")
        assert [e.id for e in await take(sub, 1)] == [live]
        assert await nothing_more(sub)


async def test_retention_by_count_is_per_group() -> None:
    async with Broadcast("memory://", retention=3) as broadcast:
        zero = await broadcast.last_id("b")
        a_ids = [await broadcast.publish("a", f"a{n}") for n in range(5)]
        b_ids = [await broadcast.publish("b", f"b{n}") for n in range(2)]
        # b was never trimmed: it still replays from the start.
        async with broadcast.subscribe("b", last_event_id=zero) as sub:
            assert [e.id for e in await take(sub, 2)] == b_ids
        # a kept its last 3: a cursor at a[1] still resumes exactly.
        cursor = f"{a_ids[1]}.{zero}"
        async with broadcast.subscribe("a", "b", last_event_id=cursor) as sub:
            events = await take(sub, 5)
            assert [e.data for e in events] == ["a2", "a3", "a4", "b0", "b1"]
            assert [e.id for e in events] == [
                *(f"{a}.{zero}" for a in a_ids[2:]),
                *(f"{a_ids[-1]}.{b}" for b in b_ids),
            ]
            assert await nothing_more(sub)
        # a[1] itself was trimmed: a cursor before it is expired.
        async with broadcast.subscribe("a", last_event_id=a_ids[0]) as sub:
            (reset,) = await take(sub, 1)
            assert reset.event == RESET_EVENT
            assert reset.json()["reason"] == "expired"


async def test_retention_by_age() -> None:
    async with Broadcast("memory://", retention=None, max_age=0.3) as broadcast:
        first = await broadcast.publish("a", "old")
        await anyio.sleep(0.2)
        # Never idle for max_age, so the group (and its epoch) stays; "old" ages out.
        second = await broadcast.publish("a", "mid")
        await anyio.sleep(0.15)
        third = await broadcast.publish("a", "new")
        async with broadcast.subscribe("a", last_event_id=first) as sub:
            assert [e.id for e in await take(sub, 2)] == [second, third]
        async with broadcast.subscribe("a", last_event_id=f"{first[:8]}-0") as sub:
            (reset,) = await take(sub, 1)
        assert reset.event == RESET_EVENT
        assert reset.json()["reason"] == "expired"


async def test_expired_cursor_gets_one_reset_event_then_live_only() -> None:
    async with Broadcast("memory://", retention=2) as broadcast:
        ids = [await broadcast.publish("a", str(n)) for n in range(5)]
        async with broadcast.subscribe("a", last_event_id=ids[0]) as sub:
            (reset,) = await take(sub, 1)
            assert reset.event == RESET_EVENT == "sseviews.reset"
            assert reset.json() == {"reason": "expired", "head": ids[-1], "groups": ["a"]}
            assert reset.id == ids[-1]
            # No partial replay of the retained ids[3:], only what comes next.
            assert await nothing_more(sub)
            live = await broadcast.publish("a", "live")
            (event,) = await take(sub, 1)
            assert (event.id, event.data) == (live, "live")


async def test_expired_cursor_in_one_group_resets_only_that_group_when_reached() -> None:
    async with Broadcast("memory://", retention=1) as broadcast:
        await broadcast.publish("a", "a0")
        cursor = await broadcast.last_id("a", "b")
        await broadcast.publish("b", "b0")
        b1 = await broadcast.publish("b", "b1")  # trims b0, which is after the cursor
        a1 = await broadcast.publish("a", "a1")
        async with broadcast.subscribe("a", "b", last_event_id=cursor) as sub:
            # a replays first (groups go by name), then b's replay finds b0 gone.
            replayed, reset = await take(sub, 2)
            assert (replayed.data, replayed.id) == ("a1", f"{a1}.{cursor.split('.')[1]}")
            assert reset.event == RESET_EVENT
            # The reset covers b alone; its id is the composite of the lanes: a where
            # its replay ended, b at its head.
            assert reset.json() == {"reason": "expired", "head": f"{a1}.{b1}", "groups": ["b"]}
            assert reset.id == f"{a1}.{b1}"
            assert await nothing_more(sub)
            b2 = await broadcast.publish("b", "b2")
            assert [e.id for e in await take(sub, 1)] == [f"{a1}.{b2}"]


async def test_expired_cursor_in_the_first_group_keeps_the_replay_of_the_others() -> None:
    async with Broadcast("memory://", retention=1) as broadcast:
        cursor = await broadcast.last_id("a", "b")
        await broadcast.publish("a", "a1")
        a2 = await broadcast.publish("a", "a2")  # trims a1, which is after the cursor
        b1 = await broadcast.publish("b", "b1")
        b_start = cursor.split(".")[1]
        async with broadcast.subscribe("a", "b", last_event_id=cursor) as sub:
            # a is reached first and cannot resume: its reset, then b's exact replay.
            reset, replayed = await take(sub, 2)
            assert reset.json() == {"reason": "expired", "head": f"{a2}.{b_start}", "groups": ["a"]}
            assert reset.id == f"{a2}.{b_start}"
            assert (replayed.data, replayed.id) == ("b1", f"{a2}.{b1}")
            assert await nothing_more(sub)
            a3 = await broadcast.publish("a", "a3")
            assert [e.id for e in await take(sub, 1)] == [f"{a3}.{b1}"]


async def drop_group_memory(broadcast: Broadcast, group: str) -> None:
    store = broadcast.store
    assert isinstance(store, MemoryStore)
    del store._groups[group]


async def drop_group_redis(broadcast: Broadcast, group: str) -> None:
    store = broadcast.store
    assert isinstance(store, RedisStore)
    async with redis_client() as client:
        assert await client.delete(*store._keys(group)) == 2


@pytest.mark.parametrize("history", ["memory", "redis"])
async def test_new_epoch_of_one_group_resets_it_alone_and_the_others_resume_exactly(
    history: str, anyio_backend: str
) -> None:
    """One group of a stream lost its history (keys expired or evicted, a failover
    to a promoted replica): a browser's id resets that group, and the other groups
    resume after their own positions, with no gap and no duplicate."""
    if history == "redis" and anyio_backend != "asyncio":
        pytest.skip("redis-py runs on asyncio only")
    prefix = unique_prefix()
    if history == "memory":
        broadcast, drop = Broadcast("memory://"), drop_group_memory
    else:
        broadcast, drop = Broadcast(REDIS_URL, prefix=prefix), drop_group_redis
    try:
        async with broadcast:
            a1 = await broadcast.publish("a", "a1")
            b1 = await broadcast.publish("b", "b1")
            async with broadcast.subscribe("a", "b", last_event_id=f"{a1}.{b1}") as sub:
                a2 = await broadcast.publish("a", "a2")
                (seen,) = await take(sub, 1)
            # The browser's last id; then b goes on, and a loses its history.
            assert seen.id == f"{a2}.{b1}"
            b2 = await broadcast.publish("b", "b2")
            b3 = await broadcast.publish("b", "b3")
            await drop(broadcast, "a")
            a_new = await broadcast.publish("a", "a-new")
            assert a_new.split("-")[0] != a1.split("-")[0] and seq_of(a_new) == 1
            async with broadcast.subscribe("a", "b", last_event_id=seen.id) as sub:
                reset, *replayed = await take(sub, 3)
                assert reset.event == RESET_EVENT
                assert reset.json() == {
                    "reason": "unknown_epoch",
                    "head": f"{a_new}.{b1}",
                    "groups": ["a"],
                }
                assert reset.id == f"{a_new}.{b1}"
                assert [(e.data, e.id) for e in replayed] == [
                    ("b2", f"{a_new}.{b2}"),
                    ("b3", f"{a_new}.{b3}"),
                ]
                assert await nothing_more(sub)
                b4 = await broadcast.publish("b", "b4")
                a_next = await broadcast.publish("a", "a-next")
                assert [(e.data, e.id) for e in await take(sub, 2)] == [
                    ("b4", f"{a_new}.{b4}"),
                    ("a-next", f"{a_next}.{b4}"),
                ]
                assert await nothing_more(sub)
    finally:
        if history == "redis":
            await delete_prefix(prefix)


def foreign_epoch(*known: str) -> str:
    """An epoch none of `known` (ids or epochs) has."""
    return next(
        e for e in ("00000000", "11111111", "22222222") if not any(k[:8] == e for k in known)
    )


async def test_unknown_epoch_gets_reset_event(broadcast: Broadcast) -> None:
    head = await broadcast.publish("a", "1")
    await broadcast.publish("b", "2")
    foreign = foreign_epoch(head)
    async with broadcast.subscribe("a", last_event_id=f"{foreign}-1") as sub:
        (reset,) = await take(sub, 1)
        assert reset.event == RESET_EVENT
        assert reset.json() == {"reason": "unknown_epoch", "head": head, "groups": ["a"]}
        assert reset.id == head
        assert await nothing_more(sub)
        live = await broadcast.publish("a", "3")
        assert [e.id for e in await take(sub, 1)] == [live]


async def test_unknown_epoch_before_any_publish_resets_to_seq_zero(broadcast: Broadcast) -> None:
    zero = await broadcast.last_id("a")
    async with broadcast.subscribe("a", last_event_id=f"{foreign_epoch(zero)}-99") as sub:
        (reset,) = await take(sub, 1)
    assert reset.json()["head"] == reset.id == zero
    assert zero.endswith("-0")


async def test_id_of_the_previous_format_on_a_stream_of_several_groups_gets_reset(
    broadcast: Broadcast,
) -> None:
    """Before per-group ids, one id (`<store epoch>-<seq>`) served every stream: it
    matches no group's epoch now, so it gets the reset event, never a 400."""
    a = await broadcast.publish("a", "1")
    b = await broadcast.publish("b", "2")
    old = f"{foreign_epoch(a, b)}-2"
    for groups in (("a",), ("a", "b")):
        async with broadcast.subscribe(*groups, last_event_id=old) as sub:
            (reset,) = await take(sub, 1)
            head = a if groups == ("a",) else f"{a}.{b}"
            assert reset.json() == {
                "reason": "unknown_epoch",
                "head": head,
                "groups": list(groups),
            }
            assert reset.id == head
            assert await nothing_more(sub)


@pytest.mark.parametrize("case", ["too few", "too many", "one foreign epoch", "swapped"])
async def test_composite_id_of_the_wrong_count_or_epochs_gets_reset(
    broadcast: Broadcast, case: str
) -> None:
    a = await broadcast.publish("a", "1")
    b = await broadcast.publish("b", "2")
    c = await broadcast.publish("c", "3")
    cursor = {
        "too few": a,
        "too many": f"{a}.{b}.{c}",
        "one foreign epoch": f"{a}.{foreign_epoch(a, b, c)}-1",
        "swapped": f"{b}.{a}",
    }[case]
    # Only b's epoch is foreign in one case: a stands at its head there, and only b
    # is reset. A count that does not match resets every group.
    reset_groups = ["b"] if case == "one foreign epoch" else ["a", "b"]
    async with broadcast.subscribe("a", "b", last_event_id=cursor) as sub:
        (reset,) = await take(sub, 1)
        assert reset.json() == {
            "reason": "unknown_epoch",
            "head": f"{a}.{b}",
            "groups": reset_groups,
        }
        assert await nothing_more(sub)
        a2 = await broadcast.publish("a", "4")
        assert [e.id for e in await take(sub, 1)] == [f"{a2}.{b}"]


async def test_composite_id_position_ahead_of_its_group_gets_reset(broadcast: Broadcast) -> None:
    a = await broadcast.publish("a", "1")
    b = await broadcast.publish("b", "2")
    ahead = f"{a}.{b[:8]}-{seq_of(b) + 1}"
    async with broadcast.subscribe("a", "b", last_event_id=ahead) as sub:
        (reset,) = await take(sub, 1)
    assert reset.json() == {"reason": "ahead", "head": f"{a}.{b}", "groups": ["b"]}


async def test_subscribe_to_more_groups_than_an_id_can_carry_raises(broadcast: Broadcast) -> None:
    groups = [f"g{n}" for n in range(MAX_CURSOR_GROUPS + 1)]
    with pytest.raises(ValueError, match=f"at most {MAX_CURSOR_GROUPS} groups"):
        async with broadcast.subscribe(*groups):
            pass  # pragma: no cover
    assert broadcast.subscriber_count == 0


async def test_composite_id_of_the_most_groups_resumes_and_stays_within_its_bound(
    broadcast: Broadcast,
) -> None:
    groups = [f"g{n:03}" for n in range(MAX_CURSOR_GROUPS)]
    start = await broadcast.last_id(*groups)
    published = [await broadcast.publish(group, group) for group in groups[::51]]
    async with broadcast.subscribe(*groups, last_event_id=start) as sub:
        events = await take(sub, len(published))
    assert [e.data for e in events] == groups[::51]
    assert [(i, p.seq) for i, p in steps(start, [e.id or "" for e in events])] == [
        (i, 1) for i in range(0, MAX_CURSOR_GROUPS, 51)
    ]
    assert len(events[-1].id or "") <= 29 * MAX_CURSOR_GROUPS - 1
    assert len(parse_cursor(events[-1].id or "")) == MAX_CURSOR_GROUPS


@pytest.mark.parametrize(
    "last_event_id", ["", "hello", "42", "DEADBEEF-1", "deadbeef-01", "deadbeef-1 ", "a-b-c"]
)
async def test_malformed_last_event_id_raises_invalid(
    broadcast: Broadcast, last_event_id: str
) -> None:
    await broadcast.publish("a", "x")
    with pytest.raises(InvalidLastEventId, match="was not issued"):
        async with broadcast.subscribe("a", last_event_id=last_event_id):
            pass  # pragma: no cover
    assert broadcast.subscriber_count == 0


async def test_last_event_id_ahead_of_head_gets_reset_event(broadcast: Broadcast) -> None:
    """History lost events (a restored snapshot): a reset, never an error that
    would stop EventSource for good."""
    head = await broadcast.publish("a", "x")
    ahead = f"{head[:8]}-{seq_of(head) + 1}"
    async with broadcast.subscribe("a", last_event_id=ahead) as sub:
        (reset,) = await take(sub, 1)
        assert reset.event == RESET_EVENT
        assert reset.json() == {"reason": "ahead", "head": head, "groups": ["a"]}
        assert reset.id == head
        assert await nothing_more(sub)
        live = await broadcast.publish("a", "y")
        assert [e.id for e in await take(sub, 1)] == [live]
    assert broadcast.subscriber_count == 0


# -- gap-free resume under concurrent publishing ---------------------------------------------


@pytest.mark.parametrize("store_class", [MemoryStore, YieldingStore])
async def test_resume_is_gap_free_while_publishing_continues(
    store_class: type[MemoryStore],
) -> None:
    rng = random.Random(1234)
    store = store_class(retention=100_000)
    async with Broadcast("memory://", history=store) as broadcast:
        published = {"a": 0, "b": 0}
        stop = anyio.Event()

        async def publisher(groups: str) -> None:
            while not stop.is_set():
                group = rng.choice(groups)
                event_id = await broadcast.publish(group, group)
                if group != "c":
                    published[group] += 1
                    assert seq_of(event_id) == published[group]
                if rng.random() < 0.3:
                    await anyio.lowlevel.checkpoint()

        start = await broadcast.last_id("a", "b")
        received: list[str] = []
        data: list[str] = []
        last = start
        reconnects = 0
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for groups in ["abc", "ab", "c"]:
                    tg.start_soon(publisher, groups)
                while reconnects < 300:
                    reconnects += 1
                    async with broadcast.subscribe("a", "b", last_event_id=last) as sub:
                        for _ in range(rng.randint(0, 15)):
                            event = await anext(sub)
                            assert event.event != RESET_EVENT
                            assert event.id is not None
                            received.append(event.id)
                            data.append(event.data)
                            last = event.id
                stop.set()
            # Drain what was published after the last reconnect.
            end = await broadcast.last_id("a", "b")
            async with broadcast.subscribe("a", "b", last_event_id=last) as sub:
                while last != end:
                    event = await anext(sub)
                    assert event.id is not None
                    received.append(event.id)
                    data.append(event.data)
                    last = event.id
    assert reconnects == 300
    assert sum(published.values()) > 300
    # Each event moved its own group's position by one: no gap, no duplicate.
    moved = steps(start, received)
    assert [("a", "b")[index] for index, _ in moved] == data
    for index, group in enumerate("ab"):
        assert [p.seq for i, p in moved if i == index] == list(range(1, published[group] + 1))


# -- slow consumers and failures ----------------------------------------------------------


async def test_subscription_slow_consumer_by_events_raises(broadcast: Broadcast) -> None:
    async with broadcast.subscribe("a", max_events=5) as sub:
        for n in range(6):
            await broadcast.publish("a", str(n))
        with anyio.fail_after(1), pytest.raises(SlowConsumer):
            async for _ in sub:
                pass


async def test_subscription_at_its_bound_is_not_slow(broadcast: Broadcast) -> None:
    async with broadcast.subscribe("a", max_events=5, max_bytes=10_000) as sub:
        ids = [await broadcast.publish("a", str(n)) for n in range(5)]
        assert [e.id for e in await take(sub, 5)] == ids
        more = [await broadcast.publish("a", str(n)) for n in range(5)]
        assert [e.id for e in await take(sub, 5)] == more


async def test_subscription_slow_consumer_by_bytes_raises(broadcast: Broadcast) -> None:
    async with broadcast.subscribe("a", max_bytes=200) as sub:
        await broadcast.publish("a", "x" * 50)
        await broadcast.publish("a", "y" * 200)
        with anyio.fail_after(1), pytest.raises(SlowConsumer):
            await take(sub, 2)


async def test_subscription_slow_consumer_resumes_from_its_last_id(broadcast: Broadcast) -> None:
    async with broadcast.subscribe("a", max_events=3) as sub:
        first = await broadcast.publish("a", "0")
        (event,) = await take(sub, 1)
        assert event.id == first
        missed = [await broadcast.publish("a", str(n)) for n in range(1, 10)]
        with anyio.fail_after(1), pytest.raises(SlowConsumer):
            async for _ in sub:
                pass
    async with broadcast.subscribe("a", max_events=3, last_event_id=first) as sub:
        # The replay is not bounded by max_events.
        assert [e.id for e in await take(sub, len(missed))] == missed


async def test_subscription_replay_does_not_count_against_bound(broadcast: Broadcast) -> None:
    cursor = await broadcast.publish("a", "0")
    ids = [await broadcast.publish("a", str(n)) for n in range(50)]
    async with broadcast.subscribe("a", last_event_id=cursor, max_events=2) as sub:
        assert [e.id for e in await take(sub, 50)] == ids


def test_subscription_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="max_events"):
        Subscription(max_events=0)
    with pytest.raises(ValueError, match="max_bytes"):
        Subscription(max_bytes=0)


async def test_disconnect_ends_subscriptions_with_an_error() -> None:
    broadcast = Broadcast("memory://")
    await broadcast.connect()
    outcome: list[BaseException] = []
    subscribed = anyio.Event()

    async def consumer() -> None:
        try:
            async with broadcast.subscribe("a") as sub:
                subscribed.set()
                async for _ in sub:
                    pass
        except BroadcastNotConnected as exc:
            outcome.append(exc)

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer)
            await subscribed.wait()
            await anyio.sleep(0.01)  # the consumer waits for an event
            await broadcast.disconnect()
    assert len(outcome) == 1
    assert broadcast.subscriber_count == 0


async def test_backend_failure_ends_subscriptions_and_logs_warning(
    broadcast: Broadcast, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sseviews")
    async with broadcast.subscribe("a") as sub:
        delivered = await broadcast.publish("a", "before")
        broadcast._fail_all(BackendError("x"))
        # Events delivered before the failure are still read, then the error.
        assert [e.id for e in await take(sub, 1)] == [delivered]
        with anyio.fail_after(1), pytest.raises(BackendError, match="x"):
            await anext(sub)
    assert any(
        r.name.startswith("sseviews") and r.levelno == logging.WARNING and "failed" in r.message
        for r in caplog.records
    )
    # The layer keeps working for new subscriptions, which replay.
    after = await broadcast.publish("a", "after")
    async with broadcast.subscribe("a", last_event_id=delivered) as sub:
        assert [e.id for e in await take(sub, 1)] == [after]


async def test_subscriber_count_follows_subscriptions(broadcast: Broadcast) -> None:
    assert broadcast.subscriber_count == 0
    async with broadcast.subscribe("a", "b"), broadcast.subscribe("a"):
        assert broadcast.subscriber_count == 3
    assert broadcast.subscriber_count == 0
    assert broadcast._hub == {}


async def test_subscription_goes_on_in_a_new_epoch_of_its_group_live(broadcast: Broadcast) -> None:
    """A group whose history was lost starts a new epoch from 1 while streams are
    live: its events are new, never taken for duplicates of the old epoch's."""
    async with broadcast.subscribe("a") as one, broadcast.subscribe("a", "b") as two:
        old = await broadcast.publish("a", "old")
        b = await broadcast.last_id("b")
        assert [e.id for e in await take(one, 1)] == [old]
        assert [e.id for e in await take(two, 1)] == [f"{old}.{b}"]
        store = broadcast.store
        assert isinstance(store, MemoryStore)
        del store._groups["a"]  # as if the group expired
        new = await broadcast.publish("a", "new")
        again = await broadcast.publish("a", "again")
        assert new[:8] != old[:8]
        assert seq_of(new) == 1
        assert [e.id for e in await take(one, 2)] == [new, again]
        assert [e.id for e in await take(two, 2)] == [f"{new}.{b}", f"{again}.{b}"]
        # A replayed copy of an event already sent is still a duplicate.
        broadcast._dispatch("a", 1, f"id: {new}\ndata: copy\n\n".encode())
        assert await nothing_more(one)
        assert await nothing_more(two)


# -- the backend's subscribe/unsubscribe seam ----------------------------------------------


class SubscribingBackend(MemoryBackend):
    """Records the seam's calls; `subscribe` takes a turn, as a round trip would."""

    def __init__(self, log: list[tuple[str, list[str]]], fail: bool = False) -> None:
        super().__init__()
        self.log = log
        self.fail = fail

    async def subscribe(self, groups: Sequence[str]) -> None:
        self.log.append(("subscribe", list(groups)))
        await anyio.lowlevel.checkpoint()
        if self.fail:
            raise BackendError("refused")
        self.log.append(("confirmed", list(groups)))

    def unsubscribe(self, groups: Sequence[str]) -> None:
        self.log.append(("unsubscribe", list(groups)))


class LoggingStore(MemoryStore):
    def __init__(self, log: list[tuple[str, list[str]]]) -> None:
        super().__init__()
        self.log = log

    async def heads(self, groups: Sequence[str]) -> list[Position]:
        self.log.append(("heads", list(groups)))
        return await super().heads(groups)


async def test_broadcast_subscribes_before_reading_history_and_unsubscribes_unused_groups() -> None:
    log: list[tuple[str, list[str]]] = []
    broadcast = Broadcast(SubscribingBackend(log), history=LoggingStore(log))
    async with broadcast:
        first = await broadcast.publish("a", "one")
        async with broadcast.subscribe("a", "b", last_event_id=first):
            # The backend confirmed the groups before the history's heads were read.
            assert log == [
                ("subscribe", ["a", "b"]),
                ("confirmed", ["a", "b"]),
                ("heads", ["a", "b"]),
            ]
            async with broadcast.subscribe("a"):
                pass
            # Group a still has a subscription: nothing is unsubscribed yet.
            assert ("unsubscribe", ["a"]) not in log
        assert log[-1] == ("unsubscribe", ["a", "b"])


async def test_broadcast_subscribe_failure_raises_backend_error_and_lets_the_groups_go() -> None:
    log: list[tuple[str, list[str]]] = []
    broadcast = Broadcast(SubscribingBackend(log, fail=True))
    async with broadcast:
        with pytest.raises(BackendError, match="refused"):
            async with broadcast.subscribe("a", "b"):
                pass
        assert broadcast._hub == {}
    assert log == [("subscribe", ["a", "b"]), ("unsubscribe", ["a", "b"])]
