"""The history under failure and attack: restored snapshots, eviction, idle groups, key layout.

Each Redis fault runs against a `redis-server` of the test's own (its own port and
directory), so it can be restarted from a snapshot or given a tiny `maxmemory`.
"""

from __future__ import annotations

import gc
import itertools
import logging
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
import redis.asyncio
from support.broadcast import no_deliver
from support.processes import free_port
from support.redis import REDIS_URL, RedisServer, delete_prefix, keys_under, unique_prefix

from sseviews import RESET_EVENT, BackendError, Broadcast, Event, Subscription
from sseviews.stores.base import Position, id_line
from sseviews.stores.memory import MemoryStore
from sseviews.stores.redis import RedisStore, group_key

pytestmark = pytest.mark.anyio

TIMEOUT = 20


@contextmanager
def own_redis(directory: Path, *options: str) -> Iterator[RedisServer]:
    """A `redis-server` of the test's own, its snapshots (only when the test asks:
    SAVE) in `directory/dump.rdb`."""
    server = RedisServer(free_port(), "--dir", str(directory), "--dbfilename", "dump.rdb", *options)
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def take(subscription: Subscription, count: int) -> list[Event]:
    events: list[Event] = []
    with anyio.fail_after(5):
        async for event in subscription:
            events.append(event)
            if len(events) == count:
                break
    return events


async def eventually(check: Callable[[], Awaitable[bool]], *, every: float = 0.05) -> None:
    """Poll `check` until it is true (callers bound the wait)."""
    while True:
        if await check():
            return
        await anyio.sleep(every)


# -- ids are never reused ----------------------------------------------------------------------


@pytest.mark.slow
async def test_history_redis_restored_snapshot_starts_a_new_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with own_redis(tmp_path) as server, anyio.fail_after(TIMEOUT):
        async with Broadcast(server.url, prefix=unique_prefix()) as broadcast:
            issued = [await broadcast.publish("room", n) for n in range(50)]
            async with redis.asyncio.Redis.from_url(server.url) as client:
                await client.save()  # the snapshot a restart will load
            issued += [await broadcast.publish("room", n) for n in range(50, 70)]
            old_epoch = issued[0][:8]
            assert issued[-1] == f"{old_epoch}-70"

            server.kill()
            server.start()  # loads dump.rdb: the counter is back at 50
            with caplog.at_level(logging.WARNING, logger="sseviews.redis"):
                while True:
                    try:
                        after = await broadcast.publish("room", "after restore")
                        break
                    except BackendError:
                        await anyio.sleep(0.1)
            # The group's counter went back below 70: a new epoch for it, from 1.
            new_epoch = after[:8]
            assert new_epoch != old_epoch
            assert after == f"{new_epoch}-1"
            assert after not in issued
            assert any("started a new epoch" in r.getMessage() for r in caplog.records)
            more = [await broadcast.publish("room", n) for n in range(20)]
            assert not set(more) & set(issued)

            async def healthy() -> bool:
                return broadcast.live.healthy

            await eventually(healthy)
            # A client resuming from an id of the old history gets the reset event,
            # never new events under reused ids.
            for old in (issued[59], issued[10]):
                async with broadcast.subscribe("room", last_event_id=old) as sub:
                    (reset,) = await take(sub, 1)
                    assert reset.event == RESET_EVENT
                    assert reset.json() == {
                        "reason": "unknown_epoch",
                        "head": more[-1],
                        "groups": ["room"],
                    }
    print(f"\nFIGURE snapshot restore: last id before {issued[-1]}, first after {after}")


async def test_history_redis_cursor_below_what_this_process_saw_renews_the_epoch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    prefix = unique_prefix()
    try:
        store = RedisStore(REDIS_URL, prefix=prefix)
        with anyio.fail_after(TIMEOUT):
            await store.connect()
            for _ in range(5):
                old = await store.append("a", b"data: x\n\n", no_deliver)
            other = await store.append("b", b"data: b\n\n", no_deliver)
            async with redis.asyncio.Redis.from_url(REDIS_URL) as client:
                # A failover to a lagging replica: a's counter is back at 2.
                await client.hset(group_key(prefix, "m", "a"), "last", 2)
            with caplog.at_level(logging.WARNING, logger="sseviews.redis"):
                new = await store.head("a")
            assert any("started a new epoch" in r.getMessage() for r in caplog.records)
            assert new.epoch != old.epoch
            assert new.seq == 0
            # The events kept are the old epoch's: none is replayed under the new one.
            assert await store.read("a", Position(old.epoch, 2)) is None
            assert await store.append("a", b"data: y\n\n", no_deliver) == Position(new.epoch, 1)
            assert await store.read("a", new) == [(1, id_line(new.epoch, 1) + b"data: y\n\n")]
            # Another group is untouched.
            assert await store.head("b") == other
            await store.disconnect()
    finally:
        await delete_prefix(prefix)


# -- no silent gap after eviction -----------------------------------------------------------


@pytest.mark.slow
async def test_history_redis_evicted_group_gets_reset_and_policy_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = ("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
    with own_redis(tmp_path, *options) as server, anyio.fail_after(TIMEOUT):
        with caplog.at_level(logging.WARNING, logger="sseviews.redis"):
            broadcast = Broadcast(server.url, prefix="app")
            await broadcast.connect()
        try:
            assert any("maxmemory-policy allkeys-lru" in r.getMessage() for r in caplog.records), (
                caplog.text
            )
            ids = [await broadcast.publish("victim", n) for n in range(100)]
            async with redis.asyncio.Redis.from_url(server.url) as client:
                # Another app fills the memory until Redis evicts the group.
                filler = 0
                while await client.exists(group_key("app", "g", "victim")):
                    await client.set(f"other:{filler}", b"x" * 4096)
                    filler += 1
            async with broadcast.subscribe("victim", last_event_id=ids[9]) as sub:
                (first,) = await take(sub, 1)
            assert first.event == RESET_EVENT, first
        finally:
            await broadcast.disconnect()


async def test_history_redis_missing_group_stream_gets_reset() -> None:
    prefix = unique_prefix()
    try:
        async with Broadcast(REDIS_URL, prefix=prefix) as broadcast:
            with anyio.fail_after(TIMEOUT):
                ids = [await broadcast.publish("room", n) for n in range(10)]
                async with redis.asyncio.Redis.from_url(REDIS_URL) as client:
                    # Shorter than its marks say: the newest events are gone.
                    await client.xtrim(group_key(prefix, "g", "room"), maxlen=3)
                    await client.xdel(group_key(prefix, "g", "room"), ids[-1].split("-")[1])
                async with broadcast.subscribe("room", last_event_id=ids[5]) as sub:
                    (reset,) = await take(sub, 1)
                assert (reset.event, reset.json()["reason"]) == (RESET_EVENT, "expired")
                async with redis.asyncio.Redis.from_url(REDIS_URL) as client:
                    await client.delete(group_key(prefix, "g", "room"))  # the key is missing
                async with broadcast.subscribe("room", last_event_id=ids[5]) as sub:
                    (reset,) = await take(sub, 1)
                assert reset.event == RESET_EVENT
    finally:
        await delete_prefix(prefix)


# -- idle groups expire ---------------------------------------------------------------------


@pytest.mark.slow
async def test_history_memory_idle_groups_expire() -> None:
    gc.collect()
    tracemalloc.start()
    try:
        async with Broadcast("memory://", max_age=1) as broadcast:
            store = broadcast.store
            assert isinstance(store, MemoryStore)
            before = tracemalloc.get_traced_memory()[0]
            first = await broadcast.publish("g0", "x")
            for n in range(1, 20_000):
                await broadcast.publish(f"g{n}", "x")
            full = tracemalloc.get_traced_memory()[1]  # the peak
            assert first.endswith("-1")

            async def empty() -> bool:
                return not store._groups

            with anyio.fail_after(5):
                await eventually(empty)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            # A client resuming into an expired group gets the reset event: the group
            # went with its epoch, and starts a new one.
            async with broadcast.subscribe("g0", last_event_id=first) as sub:
                (reset,) = await take(sub, 1)
            assert (reset.event, reset.json()["reason"]) == (RESET_EVENT, "unknown_epoch")
            assert reset.id == f"{reset.id[:8]}-0" != f"{first[:8]}-0"
    finally:
        tracemalloc.stop()
    assert after - before < (full - before) / 100
    print(
        f"\nFIGURE memory store, 20,000 groups published once, max_age=1: "
        f"+{(full - before) / 2**20:.1f} MiB held, +{(after - before) / 2**20:.2f} MiB "
        "after expiry"
    )


async def test_history_memory_idle_expiry_applies_without_max_age() -> None:
    store = MemoryStore(idle_expiry=0.2)
    await store.connect()
    try:
        old = await store.append("a", b"data: x\n\n", no_deliver)

        async def empty() -> bool:
            return not store._groups

        with anyio.fail_after(5):
            await eventually(empty)
        assert await store.read("a", Position(old.epoch, 0)) is None
        assert await store.read("a", old) is None
        assert (await store.head("a")).epoch != old.epoch
    finally:
        await store.disconnect()
    assert store._sweeper is None


@pytest.mark.slow
async def test_history_redis_idle_groups_expire() -> None:
    prefix = unique_prefix()
    try:
        async with Broadcast(REDIS_URL, prefix=prefix, max_age=1) as broadcast:
            with anyio.fail_after(60):
                first = await broadcast.publish("g0", "x")

                async def publish_range(start: int) -> None:
                    for n in range(start, 20_000, 50):
                        await broadcast.publish(f"g{n}", "x")

                async with anyio.create_task_group() as group:
                    for start in range(1, 51):
                        group.start_soon(publish_range, start)
                published = len(await keys_under(prefix))
                # Two keys per group (fewer once some expired), and nothing else.
                assert 0 < published <= 40_000
                assert (await broadcast.store.head("g19999")).seq == 1

                async def expired() -> bool:
                    return len(await keys_under(prefix)) <= 1

                await eventually(expired, every=0.2)
                left = await keys_under(prefix)
                async with broadcast.subscribe("g0", last_event_id=first) as sub:
                    (reset,) = await take(sub, 1)
            assert (reset.event, reset.json()["reason"]) == (RESET_EVENT, "unknown_epoch")
            # What is left: at most the hash of g19999, made by the head read above.
            assert left in ([], [group_key(prefix, "m", "g19999").encode()])
    finally:
        await delete_prefix(prefix)
    print(
        f"\nFIGURE Redis, 20,000 groups published once, max_age=1: {published} keys "
        "when the last was published, none after expiry"
    )


# -- keys never collide ---------------------------------------------------------------------


def _all_keys(prefix: str, group: str) -> list[str]:
    return [group_key(prefix, "g", group), group_key(prefix, "m", group)]


def test_history_redis_keys_are_unique_for_every_prefix_and_group() -> None:
    alphabet = ["a", ":", "g", "{", "}", "%"]
    names = ["".join(p) for n in range(1, 4) for p in itertools.product(alphabet, repeat=n)]
    owner: dict[str, tuple[str, str]] = {}
    for prefix in names:
        for group in names:
            for key in _all_keys(prefix, group):
                kind_of_key = (prefix, group if key.endswith("}") else "")
                assert owner.setdefault(key, kind_of_key) == kind_of_key, key


async def test_history_redis_nested_prefixes_do_not_share_events() -> None:
    """Group `t:g:secret` under prefix P and group `secret` under prefix `P:g:t`
    shared one key in earlier releases: a client of one app replayed the other's events."""
    outer = unique_prefix()
    inner = f"{outer}:g:t"
    first = RedisStore(REDIS_URL, prefix=outer)
    second = RedisStore(REDIS_URL, prefix=inner)
    try:
        with anyio.fail_after(TIMEOUT):
            await first.connect()
            await second.connect()
            secret = await first.append("t:g:secret", b"data: outer secret\n\n", no_deliver)
            mine = await second.append("secret", b"data: inner\n\n", no_deliver)
            # The inner app's client asks for everything in its "secret" group.
            replay = await second.read("secret", Position(mine.epoch, 0))
            assert replay == [(1, id_line(mine.epoch, 1) + b"data: inner\n\n")]
            assert await first.read("t:g:secret", Position(secret.epoch, 0)) == [
                (1, id_line(secret.epoch, 1) + b"data: outer secret\n\n")
            ]
            outer_key = group_key(outer, "g", "t:g:secret")
            inner_key = group_key(inner, "g", "secret")
            assert outer_key != inner_key
            async with redis.asyncio.Redis.from_url(REDIS_URL) as client:
                assert await client.xlen(outer_key) == await client.xlen(inner_key) == 1
    finally:
        await first.disconnect()
        await second.disconnect()
        await delete_prefix(outer)
    print(f"\nFIGURE prefixes: {outer_key!r} != {inner_key!r}")
