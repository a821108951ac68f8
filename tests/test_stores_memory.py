from __future__ import annotations

import re

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sseviews import InvalidLastEventId
from sseviews.stores.base import check_retention, format_id, id_line, parse_id
from sseviews.stores.memory import MemoryStore

pytestmark = pytest.mark.anyio

EPOCH = re.compile(r"[0-9a-f]{8}")


async def no_deliver(seq: int, wire: bytes) -> None:
    return None


async def append(store: MemoryStore, group: str, data: str = "x") -> int:
    return await store.append(group, f"data: {data}\n\n".encode(), no_deliver)


def seqs(rows: list[tuple[int, bytes]] | None) -> list[int] | None:
    return None if rows is None else [seq for seq, _ in rows]


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


# -- MemoryStore: ids and delivery ----------------------------------------------------------


async def test_memory_store_seq_is_one_cursor_across_groups() -> None:
    store = MemoryStore()
    await store.connect()
    assert EPOCH.fullmatch(store.epoch)
    assert await store.head() == 0
    assert [await append(store, group) for group in ["a", "b", "a", "c"]] == [1, 2, 3, 4]
    assert await store.head() == 4


async def test_memory_store_each_store_has_its_own_epoch_and_cursor() -> None:
    first, second = MemoryStore(), MemoryStore()
    assert first.epoch != second.epoch
    await append(first, "a")
    await append(first, "a")
    assert await append(second, "a") == 1


async def test_memory_store_keeps_wire_prefixed_with_its_id() -> None:
    store = MemoryStore()
    delivered: list[tuple[int, bytes]] = []

    async def deliver(seq: int, wire: bytes) -> None:
        delivered.append((seq, wire))

    seq = await store.append("a", b"event: e\ndata: 1\n\n", deliver)
    expected = f"id: {store.epoch}-1\n".encode() + b"event: e\ndata: 1\n\n"
    assert delivered == [(seq, expected)]
    assert await store.read(["a"], 0) == [(1, expected)]


async def test_memory_store_appends_deliver_in_seq_order_one_at_a_time() -> None:
    store = MemoryStore()
    order: list[int] = []
    inside = 0
    overlapped = False

    async def deliver(seq: int, wire: bytes) -> None:
        nonlocal inside, overlapped
        inside += 1
        overlapped = overlapped or inside > 1
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        order.append(seq)
        inside -= 1

    async def publisher(group: str) -> None:
        for _ in range(20):
            await store.append(group, b"data: x\n\n", deliver)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for group in ["a", "b", "c"]:
                tg.start_soon(publisher, group)
    assert not overlapped
    assert order == list(range(1, 61))


async def test_memory_store_failed_deliver_does_not_wedge_the_store() -> None:
    store = MemoryStore()

    async def broken(seq: int, wire: bytes) -> None:
        raise RuntimeError("down")

    with pytest.raises(RuntimeError, match="down"):
        await store.append("a", b"data: x\n\n", broken)
    with anyio.fail_after(1):
        seq = await append(store, "a")
    assert await store.head() == seq


# -- MemoryStore: reading and retention ----------------------------------------------------


async def test_memory_store_read_merges_groups_in_seq_order() -> None:
    store = MemoryStore()
    for group in ["a", "b", "c", "a", "b", "c", "b"]:
        await append(store, group)
    assert seqs(await store.read(["a", "b"], 0)) == [1, 2, 4, 5, 7]
    assert seqs(await store.read(["b", "a"], 2)) == [4, 5, 7]
    assert seqs(await store.read(["c"], 3)) == [6]
    assert await store.read(["a", "b", "c"], 7) == []
    assert await store.read(["never-published"], 0) == []


async def test_memory_store_retention_by_count_is_per_group() -> None:
    store = MemoryStore(retention=2)
    for group in ["a", "a", "a", "b"]:  # seqs 1, 2, 3 in a; 4 in b
        await append(store, group)
    assert await store.read(["a"], 0) is None  # 1 was trimmed
    assert seqs(await store.read(["a"], 1)) == [2, 3]
    assert seqs(await store.read(["b"], 0)) == [4]  # b is untouched by a's trimming
    assert seqs(await store.read(["a", "b"], 1)) == [2, 3, 4]
    # All or nothing: one expired group expires the whole cursor.
    assert await store.read(["a", "b"], 0) is None


async def test_memory_store_retention_by_age() -> None:
    store = MemoryStore(retention=None, max_age=0.05)
    await append(store, "a")  # 1
    await append(store, "b")  # 2
    await anyio.sleep(0.12)
    await append(store, "a")  # 3: trims 1 from a
    assert await store.read(["a"], 0) is None
    assert seqs(await store.read(["a"], 1)) == [3]
    # b was not appended to, but reading it applies the age bound too.
    assert await store.read(["b"], 0) is None
    assert await store.read(["b"], 2) == []


async def test_memory_store_count_and_age_together() -> None:
    store = MemoryStore(retention=3, max_age=60)
    for _ in range(5):
        await append(store, "a")
    assert await store.read(["a"], 1) is None
    assert seqs(await store.read(["a"], 2)) == [3, 4, 5]


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
    wanted=st.sets(st.sampled_from("abc"), min_size=1),
    cursor=st.integers(min_value=0, max_value=26),
)
async def test_memory_store_read_matches_a_model(
    retention: int, appends: list[str], wanted: set[str], cursor: int
) -> None:
    store = MemoryStore(retention=retention)
    for group in appends:
        await append(store, group)
    cursor = min(cursor, len(appends))
    published = list(enumerate(appends, start=1))
    kept = {seq for group in "abc" for seq in [s for s, g in published if g == group][-retention:]}
    after = [(seq, group) for seq, group in published if group in wanted and seq > cursor]
    expected = None if any(seq not in kept for seq, _ in after) else [seq for seq, _ in after]
    assert seqs(await store.read(sorted(wanted), cursor)) == expected
