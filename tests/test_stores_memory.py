from __future__ import annotations

import re

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.broadcast import no_deliver

from sseviews import InvalidLastEventId
from sseviews.stores.base import (
    MAX_CURSOR_GROUPS,
    Position,
    Sweeper,
    check_retention,
    format_cursor,
    format_id,
    id_line,
    parse_cursor,
    parse_id,
)
from sseviews.stores.memory import MemoryStore

pytestmark = pytest.mark.anyio

EPOCH = re.compile(r"[0-9a-f]{8}")


async def append(store: MemoryStore, group: str, data: str = "x") -> int:
    position = await store.append(group, f"data: {data}\n\n".encode(), no_deliver)
    return position.seq


def seqs(rows: list[tuple[int, bytes]] | None) -> list[int] | None:
    return None if rows is None else [seq for seq, _ in rows]


async def read(store: MemoryStore, group: str, after: int) -> list[tuple[int, bytes]] | None:
    """Read `group` after `after` in its current epoch."""
    epoch = (await store.head(group)).epoch
    return await store.read(group, Position(epoch, after))


# -- ids ----------------------------------------------------------------------------


def test_ids_format_and_parse_round_trip() -> None:
    assert format_id("0a1b2c3d", 42) == "0a1b2c3d-42"
    assert parse_id("0a1b2c3d-42") == ("0a1b2c3d", 42)
    assert parse_id("0a1b2c3d-0") == ("0a1b2c3d", 0)
    assert id_line("0a1b2c3d", 7) == b"id: 0a1b2c3d-7\n"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "42",
        "abc",
        "0a1b2c3d",
        "0a1b2c3d-",
        "0a1b2c3d-01",
        "0a1b2c3d--1",
        "0A1B2C3D-1",
        "0a1b2c3-1",
        "0a1b2c3d0-1",
        "0a1b2c3d-1 ",
        " 0a1b2c3d-1",
        "0a1b2c3d-1x",
        "0a1b2c3d-12345678901234567890",
        "0a1b2c3d-\u0661",  # an Arabic-Indic digit is not an ASCII digit
    ],
)
def test_ids_parse_rejects_foreign_ids(value: str) -> None:
    with pytest.raises(InvalidLastEventId, match="was not issued by this server"):
        parse_id(value)


def test_ids_composite_cursor_round_trips_in_order() -> None:
    positions = [Position("0a1b2c3d", 42), Position("ffffffff", 0), Position("00000000", 7)]
    value = format_cursor(positions)
    assert value == "0a1b2c3d-42.ffffffff-0.00000000-7"
    assert parse_cursor(value) == positions
    # An id of one group is a cursor of one position: the previous format parses too.
    assert parse_cursor("0a1b2c3d-42") == [Position("0a1b2c3d", 42)]


@pytest.mark.parametrize(
    "value",
    ["", ".", "0a1b2c3d-1.", ".0a1b2c3d-1", "0a1b2c3d-1..0a1b2c3d-2", "0a1b2c3d-1,0a1b2c3d-2"],
)
def test_ids_parse_cursor_rejects_malformed_composites(value: str) -> None:
    with pytest.raises(InvalidLastEventId, match="was not issued by this server"):
        parse_cursor(value)


def test_ids_length_bound_is_28_chars_per_group_and_29_per_composite_part() -> None:
    longest = Position("ffffffff", 10**19 - 1)
    assert len(format_id(*longest)) == 28
    widest = format_cursor([longest] * MAX_CURSOR_GROUPS)
    assert len(widest) == 29 * MAX_CURSOR_GROUPS - 1
    assert len(parse_cursor(widest)) == MAX_CURSOR_GROUPS
    with pytest.raises(InvalidLastEventId):
        parse_cursor(format_cursor([longest] * (MAX_CURSOR_GROUPS + 1)))


# -- MemoryStore: ids and delivery ----------------------------------------------------------


async def test_memory_store_each_group_has_its_own_epoch_and_sequence() -> None:
    store = MemoryStore()
    await store.connect()
    head_a = await store.head("a")
    assert EPOCH.fullmatch(head_a.epoch)
    assert head_a.seq == 0
    assert [await append(store, group) for group in ["a", "b", "a", "c", "a"]] == [1, 1, 2, 1, 3]
    assert await store.head("a") == Position(head_a.epoch, 3)
    epochs = {(await store.head(group)).epoch for group in "abc"}
    assert len(epochs) == 3  # random, one per group
    await store.disconnect()


async def test_memory_store_head_of_a_new_group_makes_its_epoch_once() -> None:
    store = MemoryStore()
    first = await store.head("new")
    assert first == await store.head("new")
    position = await store.append("new", b"data: x\n\n", no_deliver)
    assert position == Position(first.epoch, 1)


async def test_memory_store_each_store_has_its_own_epochs() -> None:
    first, second = MemoryStore(), MemoryStore()
    assert (await first.head("a")).epoch != (await second.head("a")).epoch
    await append(first, "a")
    await append(first, "a")
    assert await append(second, "a") == 1


async def test_memory_store_keeps_wire_prefixed_with_its_id() -> None:
    store = MemoryStore()
    delivered: list[tuple[int, bytes]] = []

    async def deliver(seq: int, wire: bytes) -> None:
        delivered.append((seq, wire))

    position = await store.append("a", b"event: e\ndata: 1\n\n", deliver)
    expected = f"id: {position.epoch}-1\n".encode() + b"event: e\ndata: 1\n\n"
    assert delivered == [(1, expected)]
    assert await store.read("a", Position(position.epoch, 0)) == [(1, expected)]


async def test_memory_store_appends_deliver_in_seq_order_one_at_a_time() -> None:
    store = MemoryStore()
    order: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    inside = 0
    overlapped = False

    async def publisher(group: str) -> None:
        async def deliver(seq: int, wire: bytes) -> None:
            nonlocal inside, overlapped
            inside += 1
            overlapped = overlapped or inside > 1
            await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()
            order[group].append(seq)
            inside -= 1

        for _ in range(20):
            await store.append(group, b"data: x\n\n", deliver)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for group in ["a", "b", "c"]:
                tg.start_soon(publisher, group)
    assert not overlapped
    assert order == {group: list(range(1, 21)) for group in "abc"}


async def test_memory_store_concurrent_appends_to_one_group_get_consecutive_seqs() -> None:
    store = MemoryStore(retention=1000)
    got: list[int] = []

    async def publisher() -> None:
        for _ in range(25):
            got.append(await append(store, "g"))
            await anyio.lowlevel.checkpoint()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(publisher)
    assert sorted(got) == list(range(1, 101))
    assert seqs(await read(store, "g", 0)) == list(range(1, 101))


async def test_memory_store_failed_deliver_does_not_wedge_the_store() -> None:
    store = MemoryStore()

    async def broken(seq: int, wire: bytes) -> None:
        raise RuntimeError("down")

    with pytest.raises(RuntimeError, match="down"):
        await store.append("a", b"data: x\n\n", broken)
    with anyio.fail_after(1):
        seq = await append(store, "a")
    assert (await store.head("a")).seq == seq == 2


async def test_memory_store_swept_group_starts_a_new_epoch() -> None:
    store = MemoryStore(idle_expiry=0.05)
    old = await store.append("a", b"data: x\n\n", no_deliver)
    await anyio.sleep(0.1)
    assert store.sweep() == 1
    new = await store.head("a")
    assert new.epoch != old.epoch
    assert new.seq == 0
    # A cursor of the old epoch cannot be resumed: its events are gone.
    assert await store.read("a", old) is None
    assert await store.read_page("a", old, 1, 100) is None


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_memory_store_connect_sweeps_idle_groups_in_the_background() -> None:
    store = MemoryStore(idle_expiry=0.05)
    await store.connect()
    try:
        old = await store.append("a", b"data: x\n\n", no_deliver)
        with anyio.fail_after(5):
            for _ in range(200):
                await anyio.sleep(0.02)
                if (await store.head("a")).epoch != old.epoch:
                    break
            else:
                pytest.fail("the idle group was never swept")
    finally:
        with anyio.fail_after(5):
            await store.disconnect()


# -- MemoryStore: reading and retention ----------------------------------------------------


async def test_memory_store_read_is_per_group_in_seq_order() -> None:
    store = MemoryStore()
    for group in ["a", "b", "c", "a", "b", "c", "b"]:
        await append(store, group)
    assert seqs(await read(store, "a", 0)) == [1, 2]
    assert seqs(await read(store, "b", 1)) == [2, 3]
    assert seqs(await read(store, "c", 2)) == []
    assert await read(store, "never-published", 0) == []


async def test_memory_store_read_of_another_epoch_or_ahead_is_none() -> None:
    store = MemoryStore()
    position = await store.append("a", b"data: x\n\n", no_deliver)
    foreign = "00000000" if position.epoch != "00000000" else "11111111"
    assert await store.read("a", Position(foreign, 0)) is None
    assert await store.read("a", Position(position.epoch, 2)) is None
    assert await store.read("a", Position(position.epoch, 1)) == []


async def test_memory_store_retention_by_count_is_per_group() -> None:
    store = MemoryStore(retention=2)
    for group in ["a", "a", "a", "b"]:  # seqs 1, 2, 3 in a; 1 in b
        await append(store, group)
    assert await read(store, "a", 0) is None  # 1 was trimmed
    assert seqs(await read(store, "a", 1)) == [2, 3]
    assert seqs(await read(store, "b", 0)) == [1]  # b is untouched by a's trimming


async def test_memory_store_retention_by_age() -> None:
    store = MemoryStore(retention=None, max_age=0.05)
    await append(store, "a")  # a 1
    await append(store, "b")  # b 1
    await anyio.sleep(0.12)
    await append(store, "a")  # a 2: trims 1 from a
    assert await read(store, "a", 0) is None
    assert seqs(await read(store, "a", 1)) == [2]
    # b was not appended to, but reading it applies the age bound too.
    assert await read(store, "b", 0) is None
    assert await read(store, "b", 1) == []


async def test_memory_store_count_and_age_together() -> None:
    store = MemoryStore(retention=3, max_age=60)
    for _ in range(5):
        await append(store, "a")
    assert await read(store, "a", 1) is None
    assert seqs(await read(store, "a", 2)) == [3, 4, 5]


@pytest.mark.parametrize(
    ("retention", "max_age", "error"),
    [
        (0, None, ValueError),
        (-1, None, ValueError),
        (None, None, ValueError),
        (None, 0, ValueError),
        (None, -1.0, ValueError),
        (1.5, None, TypeError),
        (True, None, TypeError),
        ("10", None, TypeError),
        (None, "1", TypeError),
        (None, True, TypeError),
    ],
)
def test_memory_store_rejects_bad_retention(
    retention: object, max_age: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        check_retention(retention, max_age)  # type: ignore[arg-type]
    with pytest.raises(error):
        MemoryStore(retention=retention, max_age=max_age)  # type: ignore[arg-type]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    retention=st.integers(min_value=1, max_value=4),
    appends=st.lists(st.sampled_from("abc"), max_size=25),
    wanted=st.sampled_from("abc"),
    cursor=st.integers(min_value=0, max_value=26),
)
async def test_memory_store_read_matches_a_model(
    retention: int, appends: list[str], wanted: str, cursor: int
) -> None:
    store = MemoryStore(retention=retention)
    for group in appends:
        await append(store, group)
    count = appends.count(wanted)
    cursor = min(cursor, count)
    kept = set(range(1, count + 1)[-retention:])
    after = list(range(cursor + 1, count + 1))
    expected = None if any(seq not in kept for seq in after) else after
    assert seqs(await read(store, wanted, cursor)) == expected


async def test_sweeper_stop_waits_for_a_sweep_under_way_instead_of_cancelling_it() -> None:
    # A store closes its connections once stop() returns: a sweep cut off in the
    # middle of a query would then wait forever on a closed connection (seen as a
    # hung event loop after a SQL store test). stop() lets it finish, and returns.
    started = anyio.Event()
    finished: list[bool] = []

    async def sweep() -> None:
        started.set()
        await anyio.sleep(0.3)
        finished.append(True)

    sweeper = Sweeper(sweep, 0.01)
    sweeper.start("test sweeper")
    with anyio.fail_after(5):
        await started.wait()
        await sweeper.stop()
    assert finished == [True]


async def test_sweeper_stop_while_waiting_for_the_next_sweep_returns_at_once() -> None:
    sweeps: list[bool] = []

    async def sweep() -> None:
        sweeps.append(True)

    sweeper = Sweeper(sweep, 60)
    sweeper.start("test sweeper")
    await anyio.sleep(0.05)
    with anyio.fail_after(1):
        await sweeper.stop()
    assert sweeps == []
