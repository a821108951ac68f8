from __future__ import annotations

import logging
import random
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from broadcast_helpers import YieldingStore

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
from sseviews.stores.memory import MemoryStore

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


async def test_publish_returns_epoch_seq_ids_monotonic_across_groups(
    broadcast: Broadcast,
) -> None:
    ids = [await broadcast.publish(group, "x") for group in ["a", "b", "a", "c", "b"]]
    matches = [ID.fullmatch(event_id) for event_id in ids]
    assert all(matches), ids
    assert {m.group(1) for m in matches if m} == {broadcast.epoch}
    assert [seq_of(event_id) for event_id in ids] == [1, 2, 3, 4, 5]


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
        assert broadcast.epoch == store.epoch
        async with broadcast.subscribe("a") as sub:
            event_id = await broadcast.publish("a", "x")
            (event,) = await take(sub, 1)
    assert event.id == event_id
    assert await store.head() == 1


async def test_broadcasts_side_by_side_are_independent() -> None:
    async with Broadcast() as first, Broadcast() as second:
        assert first.epoch != second.epoch
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


async def test_subscribe_replays_groups_in_publish_order_then_live(broadcast: Broadcast) -> None:
    cursor = await broadcast.publish("a", "a1")
    missed = []
    for group, data in [("b", "b1"), ("c", "c1"), ("a", "a2"), ("c", "c2"), ("b", "b2")]:
        event_id = await broadcast.publish(group, data)
        if group != "c":
            missed.append((event_id, data))
    async with broadcast.subscribe("a", "b", last_event_id=cursor) as sub:
        replayed = await take(sub, len(missed))
        assert [(e.id, e.data) for e in replayed] == missed
        live = [await broadcast.publish(g, g + "3") for g in ["c", "b", "a"]]
        events = await take(sub, 2)
        assert [(e.id, e.data) for e in events] == [(live[1], "b3"), (live[2], "a3")]
        assert await nothing_more(sub)


async def test_subscribe_replays_nothing_when_cursor_is_head(broadcast: Broadcast) -> None:
    head = await broadcast.publish("a", "1")
    async with broadcast.subscribe("a", last_event_id=head) as sub:
        assert await nothing_more(sub)
        new = await broadcast.publish("a", "2")
        assert [e.id for e in await take(sub, 1)] == [new]


async def test_subscribe_cursor_zero_replays_all_retained(broadcast: Broadcast) -> None:
    ids = [await broadcast.publish("a", str(n)) for n in range(3)]
    async with broadcast.subscribe("a", last_event_id=f"{broadcast.epoch}-0") as sub:
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
        zero = f"{broadcast.epoch}-0"
        a_ids = [await broadcast.publish("a", f"a{n}") for n in range(5)]
        b_ids = [await broadcast.publish("b", f"b{n}") for n in range(2)]
        # b was never trimmed: it still replays from the start.
        async with broadcast.subscribe("b", last_event_id=zero) as sub:
            assert [e.id for e in await take(sub, 2)] == b_ids
        # a kept its last 3: a cursor at a[1] still resumes exactly.
        async with broadcast.subscribe("a", "b", last_event_id=a_ids[1]) as sub:
            assert [e.id for e in await take(sub, 5)] == a_ids[2:] + b_ids
            assert await nothing_more(sub)
        # a[1] itself was trimmed: a cursor before it is expired.
        async with broadcast.subscribe("a", last_event_id=a_ids[0]) as sub:
            (reset,) = await take(sub, 1)
            assert reset.event == RESET_EVENT
            assert reset.json()["reason"] == "expired"


async def test_retention_by_age() -> None:
    async with Broadcast("memory://", retention=None, max_age=0.05) as broadcast:
        first = await broadcast.publish("a", "old")
        await anyio.sleep(0.12)
        second = await broadcast.publish("a", "new")
        async with broadcast.subscribe("a", last_event_id=first) as sub:
            assert [e.id for e in await take(sub, 1)] == [second]
        async with broadcast.subscribe("a", last_event_id=f"{broadcast.epoch}-0") as sub:
            (reset,) = await take(sub, 1)
        assert reset.event == RESET_EVENT
        assert reset.json()["reason"] == "expired"


async def test_expired_cursor_gets_one_reset_event_then_live_only() -> None:
    async with Broadcast("memory://", retention=2) as broadcast:
        ids = [await broadcast.publish("a", str(n)) for n in range(5)]
        async with broadcast.subscribe("a", last_event_id=ids[0]) as sub:
            (reset,) = await take(sub, 1)
            assert reset.event == RESET_EVENT == "sseviews.reset"
            assert reset.json() == {"reason": "expired", "epoch": broadcast.epoch, "head": ids[-1]}
            assert reset.id == ids[-1]
            # No partial replay of the retained ids[3:], only what comes next.
            assert await nothing_more(sub)
            live = await broadcast.publish("a", "live")
            (event,) = await take(sub, 1)
            assert (event.id, event.data) == (live, "live")


async def test_expired_cursor_in_one_group_resets_the_whole_subscription() -> None:
    async with Broadcast("memory://", retention=1) as broadcast:
        cursor = await broadcast.publish("a", "a0")
        await broadcast.publish("b", "b0")
        await broadcast.publish("b", "b1")  # trims b0, which is after the cursor
        head = await broadcast.publish("a", "a1")
        async with broadcast.subscribe("a", "b", last_event_id=cursor) as sub:
            (reset,) = await take(sub, 1)
            assert reset.event == RESET_EVENT
            assert reset.json()["head"] == head
            assert await nothing_more(sub)


async def test_unknown_epoch_gets_reset_event(broadcast: Broadcast) -> None:
    await broadcast.publish("a", "1")
    head = await broadcast.publish("b", "2")
    foreign = "00000000" if broadcast.epoch != "00000000" else "11111111"
    async with broadcast.subscribe("a", last_event_id=f"{foreign}-1") as sub:
        (reset,) = await take(sub, 1)
        assert reset.event == RESET_EVENT
        assert reset.json() == {"reason": "unknown_epoch", "epoch": broadcast.epoch, "head": head}
        assert reset.id == head
        assert await nothing_more(sub)
        live = await broadcast.publish("a", "3")
        assert [e.id for e in await take(sub, 1)] == [live]


async def test_unknown_epoch_before_any_publish_resets_to_seq_zero(broadcast: Broadcast) -> None:
    foreign = "00000000" if broadcast.epoch != "00000000" else "11111111"
    async with broadcast.subscribe("a", last_event_id=f"{foreign}-99") as sub:
        (reset,) = await take(sub, 1)
    assert reset.json()["head"] == reset.id == f"{broadcast.epoch}-0"


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
    ahead = f"{broadcast.epoch}-{seq_of(head) + 1}"
    async with broadcast.subscribe("a", last_event_id=ahead) as sub:
        (reset,) = await take(sub, 1)
        assert reset.event == RESET_EVENT
        assert reset.json() == {"reason": "ahead", "epoch": broadcast.epoch, "head": head}
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
        published: list[tuple[int, str]] = []
        stop = anyio.Event()

        async def publisher(groups: str) -> None:
            while not stop.is_set():
                group = rng.choice(groups)
                event_id = await broadcast.publish(group, group)
                if group != "c":
                    published.append((seq_of(event_id), event_id))
                if rng.random() < 0.3:
                    await anyio.lowlevel.checkpoint()

        received: list[str] = []
        last: str | None = None
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
                            last = event.id
                stop.set()
            # Drain what was published after the last reconnect.
            expected = [event_id for _, event_id in sorted(published)]
            async with broadcast.subscribe("a", "b", last_event_id=last) as sub:
                while not received or received[-1] != expected[-1]:
                    event = await anext(sub)
                    assert event.id is not None
                    received.append(event.id)
    assert reconnects == 300
    assert len(expected) > 300
    assert received == expected


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

    async def head(self) -> int:
        self.log.append(("head", []))
        return await super().head()


async def test_broadcast_subscribes_before_reading_history_and_unsubscribes_unused_groups() -> None:
    log: list[tuple[str, list[str]]] = []
    broadcast = Broadcast(SubscribingBackend(log), history=LoggingStore(log))
    async with broadcast:
        first = await broadcast.publish("a", "one")
        async with broadcast.subscribe("a", "b", last_event_id=first):
            # The backend confirmed the groups before the history's head was read.
            assert log == [("subscribe", ["a", "b"]), ("confirmed", ["a", "b"]), ("head", [])]
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
