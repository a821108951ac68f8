"""RedisStore against the real Redis on 127.0.0.1:6379, one key prefix per test."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import pytest
import redis.asyncio
import redis.exceptions
from support.broadcast import data, no_deliver
from support.processes import free_port
from support.redis import (
    REDIS_URL,
    RedisServer,
    delete_prefix,
    keys_under,
    redis_client,
    unique_prefix,
)
from support.redis_topology import spare_ports

from sseviews import BackendError
from sseviews.stores.base import Page, Position, id_line
from sseviews.stores.redis import RedisStore, group_key

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(prefix: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(REDIS_URL, prefix=prefix)
    with anyio.fail_after(5):
        await store.connect()
    yield store
    await store.disconnect()


# -- ids and epochs ------------------------------------------------------------------


async def append(store: RedisStore, group: str, text: str = "x") -> int:
    return (await store.append(group, data(text), no_deliver)).seq


async def read(store: RedisStore, group: str, after: int) -> list[tuple[int, bytes]] | None:
    """Read `group` after `after` in its current epoch."""
    return await store.read(group, Position((await store.head(group)).epoch, after))


async def test_redis_store_each_group_has_its_own_epoch_and_sequence(store: RedisStore) -> None:
    with anyio.fail_after(5):
        seqs = [await append(store, group) for group in "abcabca"]
        heads = {group: await store.head(group) for group in "abc"}
    assert seqs == [1, 1, 1, 2, 2, 2, 3]
    assert [heads[group].seq for group in "abc"] == [3, 2, 2]
    assert len({head.epoch for head in heads.values()}) == 3


async def test_redis_store_head_of_a_new_group_makes_its_epoch_with_the_idle_expiry(
    prefix: str,
) -> None:
    store = RedisStore(REDIS_URL, prefix=prefix, idle_expiry=60)
    with anyio.fail_after(5):
        await store.connect()
        head = await store.head("new")
        assert head.seq == 0
        assert await store.head("new") == head
        async with redis_client() as client:
            meta = group_key(prefix, "m", "new")
            replid = (await client.info("replication"))["master_replid"].encode()
            assert await client.hgetall(meta) == {
                b"epoch": head.epoch.encode(),
                b"last": b"0",
                b"srv": replid,  # the replication id of the master that wrote it
            }
            assert 0 < await client.pttl(meta) <= 60_000
        assert await store.append("new", data("x"), no_deliver) == Position(head.epoch, 1)
        await store.disconnect()


async def test_redis_store_heads_of_several_groups_in_one_round_trip(store: RedisStore) -> None:
    with anyio.fail_after(5):
        a = [await store.append("a", data("x"), no_deliver) for _ in range(2)][-1]
        b = await store.append("b", data("y"), no_deliver)
        heads = await store.heads(["b", "new", "a"])
        assert heads[0] == b
        assert heads[2] == a
        assert heads[1].seq == 0
        assert await store.head("new") == heads[1]  # made once, by heads()
        assert await store.heads(["a"]) == [a]


async def test_redis_store_concurrent_appends_to_one_group_from_two_instances_are_consecutive(
    prefix: str,
) -> None:
    first = RedisStore(REDIS_URL, prefix=prefix, publish=True)
    second = RedisStore(REDIS_URL, prefix=prefix, publish=True)
    positions: list[Position] = []

    async def publish(store: RedisStore, group: str) -> None:
        positions.append(await store.append(group, data(group), no_deliver))

    with anyio.fail_after(10):
        await first.connect()
        await second.connect()
        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(publish, (first, second)[i % 2], f"g{i % 3}")
        for group, count in (("g0", 34), ("g1", 33), ("g2", 33)):
            head = await first.head(group)
            assert head == await second.head(group)
            assert head.seq == count
            mine = sorted(p.seq for p in positions if p.epoch == head.epoch)
            assert mine == list(range(1, count + 1))
        assert len(positions) == 100
        await first.disconnect()
        await second.disconnect()


async def test_redis_store_epochs_shared_by_two_instances(prefix: str) -> None:
    first = RedisStore(REDIS_URL, prefix=prefix)
    second = RedisStore(REDIS_URL, prefix=prefix)
    other = RedisStore(REDIS_URL, prefix=unique_prefix())
    try:
        with anyio.fail_after(5):
            await first.connect()
            await second.connect()
            await other.connect()
            assert await first.head("a") == await second.head("a")
            assert (await first.head("a")).epoch != (await other.head("a")).epoch
            position = await second.append("a", data("x"), no_deliver)
            events = await first.read("a", Position(position.epoch, 0))
        assert events == [(1, id_line(position.epoch, 1) + data("x"))]
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
        position = await store.append("a", b"event: hi\ndata: 1\n\n", deliver)
        stored = await store.read("a", Position(position.epoch, 0))
    wire = b"id: %s-1\nevent: hi\ndata: 1\n\n" % position.epoch.encode()
    assert delivered == [(1, wire)]
    assert stored == [(1, wire)]


async def test_redis_store_append_delivers_in_seq_order_when_concurrent(
    store: RedisStore,
) -> None:
    delivered: dict[str, list[int]] = {f"g{i}": [] for i in range(4)}

    def deliver_to(group: str) -> Callable[[int, bytes], Awaitable[None]]:
        async def deliver(seq: int, wire: bytes) -> None:
            # A slow deliver for odd seqs, so later appends would overtake if they could.
            await anyio.sleep(0.005 if seq % 2 else 0)
            delivered[group].append(seq)

        return deliver

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(32):
                group = f"g{i % 4}"
                tg.start_soon(store.append, group, data(str(i)), deliver_to(group))
    assert delivered == {group: list(range(1, 9)) for group in delivered}


async def test_redis_store_lost_group_keys_start_a_new_epoch(
    store: RedisStore, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(5):
        old = await store.append("a", data("1"), no_deliver)
        async with redis_client() as client:
            await client.delete(group_key(prefix, "m", "a"))
        # A cursor of the old epoch cannot be resumed any more.
        with caplog.at_level(logging.INFO, logger="sseviews.redis"):
            assert await store.read("a", old) is None
        # Seen a moment ago, its keys could not have expired: they were lost.
        (record,) = caplog.records
        assert record.levelno == logging.WARNING
        assert "had no keys any more (lost" in record.getMessage()
        new = await store.head("a")
        assert new.epoch != old.epoch
        assert new.seq == 0
        # What was left of the old epoch (its stream) is gone with it.
        assert await store.append("a", data("2"), no_deliver) == Position(new.epoch, 1)
        assert await store.read("a", Position(new.epoch, 0)) == [
            (1, id_line(new.epoch, 1) + data("2"))
        ]


async def test_redis_store_counter_below_a_seen_seq_starts_a_new_epoch_and_warns(
    store: RedisStore, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(5):
        for _ in range(5):
            old = await store.append("a", data("x"), no_deliver)
        async with redis_client() as client:
            # As if restored from a snapshot taken 3 events earlier.
            await client.hset(group_key(prefix, "m", "a"), "last", "2")
            await client.xtrim(group_key(prefix, "g", "a"), minid="3-0")
        with caplog.at_level(logging.WARNING, logger="sseviews.redis"):
            new = await store.append("a", data("y"), no_deliver)
    assert new.epoch != old.epoch
    assert new.seq == 1
    assert any("started a new epoch" in r.getMessage() for r in caplog.records)
    assert await store.read("a", Position(old.epoch, 2)) is None


async def test_redis_store_keys_of_the_previous_format_are_replaced_by_a_new_epoch(
    store: RedisStore, prefix: str
) -> None:
    """Before per-group ids, a group's hash had no epoch and its stream held seqs of
    the store-wide counter: the group starts a new epoch, and none of it is replayed."""
    meta, stream = group_key(prefix, "m", "a"), group_key(prefix, "g", "a")
    async with redis_client() as client:
        await client.set(f"{prefix}:epoch", "0badcafe")
        await client.set(f"{prefix}:seq", 42)
        await client.xadd(stream, {"w": b"id: 0badcafe-42\ndata: old\n\n", "t": 0}, id="42-0")
        await client.hset(meta, mapping={"last": 42, "trim": 40})
    with anyio.fail_after(5):
        assert await store.read("a", Position("0badcafe", 41)) is None
        head = await store.head("a")
        assert head.seq == 0
        assert head.epoch != "0badcafe"
        assert await store.append("a", data("new"), no_deliver) == Position(head.epoch, 1)
        assert await read(store, "a", 0) == [(1, id_line(head.epoch, 1) + data("new"))]
    async with redis_client() as client:
        replid = (await client.info("replication"))["master_replid"].encode()
        assert await client.hgetall(meta) == {
            b"epoch": head.epoch.encode(),
            b"last": b"1",
            b"srv": replid,
        }
        # The store-wide keys are not read, and not touched.
        assert await client.get(f"{prefix}:seq") == b"42"


# -- reading after a cursor ----------------------------------------------------------


async def test_redis_store_read_returns_later_events_of_its_group_in_seq_order(
    store: RedisStore,
) -> None:
    with anyio.fail_after(5):
        for i, group in enumerate("abcbacab", start=1):
            await store.append(group, data(f"{group}{i}"), no_deliver)
        epoch = {group: (await store.head(group)).epoch for group in "abc"}
        events = await read(store, "b", 1)
        assert await read(store, "a", 3) == []
        assert await read(store, "c", 0) == [
            (1, id_line(epoch["c"], 1) + data("c3")),
            (2, id_line(epoch["c"], 2) + data("c6")),
        ]
        assert await read(store, "never", 0) == []
        # Ahead of the group, or of another epoch: cannot be resumed.
        assert await read(store, "a", 4) is None
        foreign = "00000000" if epoch["a"] != "00000000" else "11111111"
        assert await store.read("a", Position(foreign, 0)) is None
        page = await store.read_page("a", Position(epoch["a"], 0), 2, 1)
    assert events == [
        (2, id_line(epoch["b"], 2) + data("b4")),
        (3, id_line(epoch["b"], 3) + data("b8")),
    ]
    assert page == Page([(1, id_line(epoch["a"], 1) + data("a1"))], 1)


# -- retention -----------------------------------------------------------------------


async def test_redis_store_count_retention_expires_older_cursors(prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix=prefix, retention=3)
    with anyio.fail_after(5):
        await store.connect()
        # a gets seqs 1..5 and keeps 3, 4, 5; b gets 1..3 and keeps them.
        for group in "aabababa":
            await store.append(group, data(group), no_deliver)
        async with redis_client() as client:
            assert await client.xlen(group_key(prefix, "g", "a")) == 3
            assert await client.hget(group_key(prefix, "m", "a"), "trim") == b"2"
        assert await read(store, "a", 0) is None
        assert await read(store, "a", 1) is None
        # Nothing after seq 2 was trimmed: that cursor still replays.
        assert [seq for seq, _ in await read(store, "a", 2) or []] == [3, 4, 5]
        assert [seq for seq, _ in await read(store, "b", 0) or []] == [1, 2, 3]
        await store.disconnect()


async def test_redis_store_age_retention_expires_old_events(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore(REDIS_URL, prefix=prefix, retention=None, max_age=0.3)
    with anyio.fail_after(5):
        await store.connect()
        old_a = await store.append("a", data("1"), no_deliver)
        old_b = await store.append("b", data("2"), no_deliver)
        await anyio.sleep(0.5)
        with caplog.at_level(logging.INFO, logger="sseviews.redis"):
            new_b = await store.append("b", data("3"), no_deliver)
        # Idle for longer than its time to live: expired, which is no warning.
        assert [(r.levelno, "(expired)" in r.getMessage()) for r in caplog.records] == [
            (logging.INFO, True)
        ]
        # Idle for max_age, a and b expired as a whole (a TTL); b started a new epoch.
        async with redis_client() as client:
            assert await client.exists(group_key(prefix, "g", "a")) == 0
            assert await client.exists(group_key(prefix, "m", "a")) == 0
            assert await client.xlen(group_key(prefix, "g", "b")) == 1
            meta = await client.hgetall(group_key(prefix, "m", "b"))
            replid = (await client.info("replication"))["master_replid"].encode()
            assert meta == {b"epoch": new_b.epoch.encode(), b"last": b"1", b"srv": replid}
        assert new_b == Position(new_b.epoch, 1)
        assert new_b.epoch != old_b.epoch
        assert await store.read("a", Position(old_a.epoch, 0)) is None
        assert await store.read("b", Position(old_b.epoch, 1)) is None
        assert await read(store, "b", 0) == [(1, id_line(new_b.epoch, 1) + data("3"))]
        await store.disconnect()


async def test_redis_store_age_bound_applies_on_read_without_an_append(prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix=prefix, retention=None, max_age=0.4, idle_expiry=None)
    with anyio.fail_after(5):
        await store.connect()
        first = await store.append("a", data("1"), no_deliver)
        await anyio.sleep(0.25)
        await store.append("a", data("2"), no_deliver)
        await anyio.sleep(0.25)
        # 1 is older than max_age, not trimmed yet (no append since): expired all the same.
        assert await store.read("a", Position(first.epoch, 0)) is None
        assert [seq for seq, _ in await store.read("a", first) or []] == [2]
        await store.disconnect()


async def test_redis_store_count_and_age_retention_combined(prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix=prefix, retention=2, max_age=0.3)
    with anyio.fail_after(5):
        await store.connect()
        for i in range(4):
            old = await store.append("a", data(str(i)), no_deliver)
        async with redis_client() as client:
            assert await client.hget(group_key(prefix, "m", "a"), "trim") == b"2"
            await anyio.sleep(0.5)
            new = await store.append("a", data("4"), no_deliver)
            # The group expired as a whole (TTL max_age); its new event starts a new epoch.
            assert await client.hget(group_key(prefix, "m", "a"), "trim") is None
            assert await client.xlen(group_key(prefix, "g", "a")) == 1
        assert new.epoch != old.epoch
        assert await store.read("a", old) is None
        assert [seq for seq, _ in await store.read("a", Position(new.epoch, 0)) or []] == [1]
        await store.disconnect()


async def test_redis_store_keys_all_carry_the_prefix_and_the_group_hash_tag(prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix=prefix, retention=1)
    with anyio.fail_after(5):
        await store.connect()
        await store.append("room:1", data("1"), no_deliver)
        await store.append("room:1", data("2"), no_deliver)
        await store.head("room:2")
        await store.disconnect()
        keys = await keys_under(prefix)
    names = ("g:{room%3A1}", "m:{room%3A1}", "m:{room%3A2}")
    assert keys == [f"{prefix}:{name}".encode() for name in names]
    # No key shared by groups: each group's keys share its hash tag, one slot.
    assert [key.decode().split(":", 2)[2][1:-1] for key in keys] == [
        "room%3A1",
        "room%3A1",
        "room%3A2",
    ]


async def test_redis_store_publishes_each_event_on_its_group_channel_with_its_id(
    prefix: str,
) -> None:
    """With `publish=True` the append script publishes `seq\\0wire` (the wire with its
    `id:` line, as `RedisBackend` and `Broadcast._dispatch` read it) on the group's
    own channel, whose hash tag is the one of the group's keys."""
    store = RedisStore(REDIS_URL, prefix=prefix, publish=True)
    channels = [group_key(prefix, "live", group) for group in ("room:1", "room:2")]
    assert channels[0] == f"{prefix}:live:{{room%3A1}}"
    assert channels[0].split(":", 2)[2] == group_key(prefix, "m", "room:1").split(":", 2)[2]
    received: list[tuple[bytes, bytes]] = []
    async with redis_client() as client:
        pubsub = client.pubsub()
        with anyio.fail_after(10):
            await pubsub.subscribe(*channels)
            await store.connect()
            one = await store.append("room:1", data("one"), no_deliver)
            two = await store.append("room:2", data("two"), no_deliver)
            again = await store.append("room:1", data("again"), no_deliver)
            while len(received) < 3:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    received.append((message["channel"], message["data"]))
            await store.disconnect()
            await pubsub.aclose()
    first, second = (channel.encode() for channel in channels)
    assert received == [
        (first, b"1\x00" + id_line(one.epoch, 1) + data("one")),
        (second, b"1\x00" + id_line(two.epoch, 1) + data("two")),
        (first, b"2\x00" + id_line(again.epoch, 2) + data("again")),
    ]


@pytest.mark.slow
async def test_redis_store_runs_on_a_cluster_node_where_scripts_touch_one_slot(
    tmp_path: Path,
) -> None:
    """On a node with `--cluster-enabled yes`, a script whose keys span two hash slots
    is refused: every script of the store touches one group's slot only.

    `connect()` refuses a plain `redis://` URL on a cluster node (a plain client
    reaches only that node's slots), so the scripts run here without it: this
    node holds every slot."""
    # The cluster bus port must be free too: its default, port + 10000, may be
    # taken or above 65535 for a random port.
    port, bus_port = spare_ports(2)
    server = RedisServer(
        port,
        "--cluster-enabled",
        "yes",
        "--cluster-port",
        str(bus_port),
        "--cluster-config-file",
        str(tmp_path / "nodes.conf"),
        "--dir",
        str(tmp_path),
    )
    try:
        server.start()
        async with redis_client(server.url) as client:
            await client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            with anyio.fail_after(10):
                while True:
                    if b"cluster_state:ok" in await client.execute_command("CLUSTER", "INFO"):
                        break
                    await anyio.sleep(0.05)
            # The check itself: two keys of two slots in one script are refused.
            with pytest.raises(redis.exceptions.ResponseError, match="same slot"):
                await client.eval("return 1", 2, "{a}x", "{b}x")
        refused = RedisStore(server.url, prefix="c")
        with anyio.fail_after(10), pytest.raises(BackendError, match=r"redis\+cluster://"):
            await refused.connect()
        store = RedisStore(server.url, prefix="c", retention=2, max_age=60, publish=True)
        with anyio.fail_after(10):
            positions = [await store.append(group, data(group), no_deliver) for group in "abcab"]
            assert [p.seq for p in positions] == [1, 1, 1, 2, 2]
            head = await store.head("a")
            assert await store.read("a", Position(head.epoch, 0)) == [
                (1, id_line(head.epoch, 1) + data("a")),
                (2, id_line(head.epoch, 2) + data("a")),
            ]
            assert await store.read_page("b", Position(positions[1].epoch, 1), 2, 100) == Page(
                [(2, id_line(positions[1].epoch, 2) + data("b"))], 2
            )
            await store.disconnect()
    finally:
        server.kill()


# -- clients and errors --------------------------------------------------------------


async def test_redis_store_accepts_a_client_and_leaves_it_open(prefix: str) -> None:
    async with redis_client() as client:
        store = RedisStore(client, prefix=prefix)
        with anyio.fail_after(5):
            await store.connect()
            await store.append("a", data("1"), no_deliver)
            await store.disconnect()
            assert await client.hget(group_key(prefix, "m", "a"), "last") == b"1"


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
            assert (await store.append("a", data("1"), no_deliver)).seq == 1
            server.kill()
            with caplog.at_level(logging.WARNING, logger="sseviews.redis"):
                with pytest.raises(BackendError, match="storing an event"):
                    await store.append("a", data("2"), no_deliver)
                with pytest.raises(BackendError, match="reading history"):
                    await store.read("a", Position("00000000", 0))
                with pytest.raises(BackendError, match="reading the head"):
                    await store.head("a")
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
        ({"prefix": "app{1}"}, "prefix"),
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
