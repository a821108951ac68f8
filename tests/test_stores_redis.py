"""RedisStore against the real Redis on 127.0.0.1:6379, one key prefix per test."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio
from process_helpers import free_port
from redis_helpers import (
    REDIS_URL,
    RedisServer,
    delete_prefix,
    keys_under,
    redis_client,
    unique_prefix,
)

from sseviews import BackendError
from sseviews.stores.base import id_line, parse_id
from sseviews.stores.redis import RedisStore, group_key

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(prefix: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(REDIS_URL, prefix=prefix)
    with anyio.fail_after(5):
        await store.connect()
    yield store
    await store.disconnect()


async def no_deliver(seq: int, wire: bytes) -> None:
    pass


def data(text: str) -> bytes:
    return b"data: %s\n\n" % text.encode()


# -- ids and epoch -------------------------------------------------------------------


async def test_redis_store_ids_monotonic_across_groups(store: RedisStore) -> None:
    with anyio.fail_after(5):
        seqs = [await store.append(group, data(group), no_deliver) for group in "abcabca"]
    assert seqs == [1, 2, 3, 4, 5, 6, 7]


async def test_redis_store_ids_unique_across_two_instances(prefix: str) -> None:
    first = RedisStore(REDIS_URL, prefix=prefix, publish=True)
    second = RedisStore(REDIS_URL, prefix=prefix, publish=True)
    seqs: list[int] = []

    async def append(store: RedisStore, group: str) -> None:
        seqs.append(await store.append(group, data(group), no_deliver))

    with anyio.fail_after(10):
        await first.connect()
        await second.connect()
        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(append, (first, second)[i % 2], f"g{i % 3}")
        assert sorted(seqs) == list(range(1, 101))
        assert await first.head() == await second.head() == 100
        await first.disconnect()
        await second.disconnect()


async def test_redis_store_epoch_shared_by_two_instances(prefix: str) -> None:
    first = RedisStore(REDIS_URL, prefix=prefix)
    second = RedisStore(REDIS_URL, prefix=prefix)
    other = RedisStore(REDIS_URL, prefix=unique_prefix())
    try:
        with anyio.fail_after(5):
            await first.connect()
            await second.connect()
            await other.connect()
            assert first.epoch == second.epoch
            assert first.epoch != other.epoch
            seq = await second.append("a", data("x"), no_deliver)
            events = await first.read(["a"], 0)
        assert events == [(seq, id_line(first.epoch, seq) + data("x"))]
        assert parse_id(f"{first.epoch}-{seq}") == (first.epoch, seq)
    finally:
        await first.disconnect()
        await second.disconnect()
        await other.disconnect()
        await delete_prefix(other.prefix)


async def test_redis_store_append_delivers_stored_wire(store: RedisStore) -> None:
    delivered: list[tuple[int, bytes]] = []

    async def deliver(seq: int, wire: bytes) -> None:
        delivered.append((seq, wire))

    with anyio.fail_after(5):
        seq = await store.append("a", b"event: hi\ndata: 1\n\n", deliver)
        stored = await store.read(["a"], 0)
    wire = b"id: %s-1\nevent: hi\ndata: 1\n\n" % store.epoch.encode()
    assert delivered == [(seq, wire)]
    assert stored == [(1, wire)]


async def test_redis_store_append_delivers_in_seq_order_when_concurrent(
    store: RedisStore,
) -> None:
    delivered: list[int] = []

    async def deliver(seq: int, wire: bytes) -> None:
        # A slow deliver for odd seqs, so later appends would overtake if they could.
        await anyio.sleep(0.005 if seq % 2 else 0)
        delivered.append(seq)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(store.append, f"g{i % 4}", data(str(i)), deliver)
    assert delivered == list(range(1, 31))


async def test_redis_store_head(store: RedisStore) -> None:
    with anyio.fail_after(5):
        assert await store.head() == 0
        await store.append("a", data("1"), no_deliver)
        await store.append("b", data("2"), no_deliver)
        assert await store.head() == 2


async def test_redis_store_lost_epoch_starts_a_new_history(store: RedisStore, prefix: str) -> None:
    with anyio.fail_after(5):
        await store.append("a", data("1"), no_deliver)
        old_epoch = store.epoch
        async with redis_client() as client:
            await client.delete(f"{prefix}:epoch", f"{prefix}:seq")
        # A cursor of the old epoch cannot be resumed any more.
        assert await store.read(["a"], 0) is None
        assert store.epoch != old_epoch
        # The new epoch's seqs start above those this store saw.
        assert await store.head() == 1


# -- reading after a cursor ----------------------------------------------------------


async def test_redis_store_read_returns_later_events_of_groups_in_seq_order(
    store: RedisStore,
) -> None:
    with anyio.fail_after(5):
        for i, group in enumerate("abcbacab", start=1):
            await store.append(group, data(f"{group}{i}"), no_deliver)
        events = await store.read(["b", "a"], 3)
        assert await store.read(["a", "b"], 8) == []
        assert await store.read(["c"], 0) == [
            (3, id_line(store.epoch, 3) + data("c3")),
            (6, id_line(store.epoch, 6) + data("c6")),
        ]
        assert await store.read([], 0) == []
        assert await store.read(["a", "a"], 6) == [(7, id_line(store.epoch, 7) + data("a7"))]
    assert events == [
        (seq, id_line(store.epoch, seq) + data(name))
        for seq, name in [(4, "b4"), (5, "a5"), (7, "a7"), (8, "b8")]
    ]


# -- retention -----------------------------------------------------------------------


async def test_redis_store_count_retention_expires_older_cursors(prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix=prefix, retention=3)
    with anyio.fail_after(5):
        await store.connect()
        # a gets seqs 1, 2, 4, 6, 8 and keeps 4, 6, 8; b gets 3, 5, 7 and keeps them.
        for group in "aabababa":
            await store.append(group, data(group), no_deliver)
        async with redis_client() as client:
            assert await client.xlen(group_key(prefix, "g", "a")) == 3
            assert await client.hget(group_key(prefix, "m", "a"), "trim") == b"2"
        assert await store.read(["a"], 0) is None
        assert await store.read(["a"], 1) is None
        # Nothing after seq 2 was trimmed: that cursor still replays.
        assert [seq for seq, _ in await store.read(["a"], 2) or []] == [4, 6, 8]
        assert [seq for seq, _ in await store.read(["b"], 0) or []] == [3, 5, 7]
        # All or nothing: a trimmed group expires the cursor for every group.
        assert await store.read(["a", "b"], 1) is None
        assert [seq for seq, _ in await store.read(["a", "b"], 2) or []] == [3, 4, 5, 6, 7, 8]
        await store.disconnect()


async def test_redis_store_age_retention_expires_old_events(prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix=prefix, retention=None, max_age=0.3)
    with anyio.fail_after(5):
        await store.connect()
        await store.append("a", data("1"), no_deliver)
        await store.append("b", data("2"), no_deliver)
        await anyio.sleep(0.5)
        await store.append("b", data("3"), no_deliver)
        # Idle for max_age, a and b expired as a whole (a TTL); b started again.
        async with redis_client() as client:
            assert await client.exists(group_key(prefix, "g", "a")) == 0
            assert await client.exists(group_key(prefix, "m", "a")) == 0
            assert await client.xlen(group_key(prefix, "g", "b")) == 1
            assert await client.hgetall(group_key(prefix, "m", "b")) == {b"last": b"3"}
        assert await store.read(["a"], 0) is None
        assert await store.read(["b"], 0) is None
        assert await store.read(["a", "b"], 1) is None
        assert await store.read(["b"], 2) == [(3, id_line(store.epoch, 3) + data("3"))]
        await store.disconnect()


async def test_redis_store_count_and_age_retention_combined(prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix=prefix, retention=2, max_age=0.3)
    with anyio.fail_after(5):
        await store.connect()
        for i in range(4):
            await store.append("a", data(str(i)), no_deliver)
        async with redis_client() as client:
            assert await client.hget(group_key(prefix, "m", "a"), "trim") == b"2"
            await anyio.sleep(0.5)
            await store.append("a", data("4"), no_deliver)
            # The group expired as a whole (TTL max_age); its new event starts again.
            assert await client.hget(group_key(prefix, "m", "a"), "trim") is None
            assert await client.xlen(group_key(prefix, "g", "a")) == 1
        assert await store.read(["a"], 3) is None
        assert [seq for seq, _ in await store.read(["a"], 4) or []] == [5]
        await store.disconnect()


async def test_redis_store_keys_all_carry_the_prefix(prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix=prefix, retention=1)
    with anyio.fail_after(5):
        await store.connect()
        await store.append("room:1", data("1"), no_deliver)
        await store.append("room:1", data("2"), no_deliver)
        await store.disconnect()
        keys = await keys_under(prefix)
    names = ("clock", "epoch", "g:{room%3A1}", "m:{room%3A1}", "seq", "server", "start")
    assert keys == [f"{prefix}:{name}".encode() for name in names]


# -- clients and errors --------------------------------------------------------------


async def test_redis_store_accepts_a_client_and_leaves_it_open(prefix: str) -> None:
    async with redis_client() as client:
        store = RedisStore(client, prefix=prefix)
        with anyio.fail_after(5):
            await store.connect()
            await store.append("a", data("1"), no_deliver)
            await store.disconnect()
            assert await client.get(f"{prefix}:seq") == b"1"


async def test_redis_store_unreachable_raises_backend_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", prefix=unique_prefix())
    with caplog.at_level(logging.WARNING, logger="sseviews.redis"):
        with anyio.fail_after(5), pytest.raises(BackendError, match=r"127\.0\.0\.1"):
            await store.connect()
    assert any(record.levelno == logging.WARNING for record in caplog.records)


@pytest.mark.slow
async def test_redis_store_lost_server_raises_backend_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = RedisServer(free_port())
    try:
        server.start()
        store = RedisStore(server.url, prefix=unique_prefix())
        with anyio.fail_after(10):
            await store.connect()
            assert await store.append("a", data("1"), no_deliver) == 1
            server.kill()
            with caplog.at_level(logging.WARNING, logger="sseviews.redis"):
                with pytest.raises(BackendError, match="storing an event"):
                    await store.append("a", data("2"), no_deliver)
                with pytest.raises(BackendError, match="reading history"):
                    await store.read(["a"], 0)
                with pytest.raises(BackendError, match="reading the cursor"):
                    await store.head()
            await store.disconnect()
        assert len(caplog.records) == 3
    finally:
        server.kill()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retention": 0}, "retention"),
        ({"retention": 1.5}, "retention"),
        ({"max_age": 0}, "max_age"),
        ({"max_age": float("nan")}, "max_age"),
        ({"prefix": ""}, "prefix"),
    ],
)
def test_redis_store_rejects_bad_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisStore(REDIS_URL, **kwargs)  # type: ignore[arg-type]


def test_redis_store_rejects_a_url_of_another_scheme() -> None:
    with pytest.raises(ValueError, match="redis://"):
        RedisStore("memory://")
    with pytest.raises(TypeError, match=r"redis\.asyncio\.Redis"):
        RedisStore(6379)  # type: ignore[arg-type]


async def test_redis_store_rejects_a_decoding_client() -> None:
    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisStore(client)
    finally:
        await client.aclose()
