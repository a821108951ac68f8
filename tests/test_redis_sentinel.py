"""Redis Sentinel: `redis+sentinel://` URLs, and streams that follow a failover.

Runs against a real `SentinelGroup` (a master, a replica and 3 sentinels, see
`tests/support/redis_topology.py`), and against plain `redis-server` pairs for the
epoch rule, per group (a promoted replica starts a new epoch for each group the
old master wrote; a restarted master keeps its groups' epochs). The failover tests run the app of
`tests/apps/multiprocess_app.py` in two uvicorn processes with subscribers on
both, SIGKILL the master while events are being published, and check the
guarantee: every event whose publish() returned an id reaches each subscriber
exactly once, in id order, or that subscriber gets `sseviews.reset` after its
last event before the gap; and no id is ever issued twice with different data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest
import redis
from support.broadcast import Recorder, data, no_deliver
from support.failover import (
    FAILOVER_TIMEOUT,
    FailoverDrill,
    Subscriber,
    conflicting_ids,
    judge,
    poll_until,
    position_of,
)
from support.redis import unique_prefix
from support.redis_topology import RedisNode, SentinelGroup, spare_ports
from support.servers import ServerProcess, start_app_servers

from sseviews.backends.redis import RedisBackend
from sseviews.stores.base import Position
from sseviews.stores.redis import RedisStore

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

TIMEOUT = 5.0
HTTP_TIMEOUT = httpx.Timeout(TIMEOUT, read=30.0)


# -- one process: the store and the backend follow the master ---------------------------


async def test_sentinel_store_and_backend_publish_and_receive(
    sentinel_group: SentinelGroup,
) -> None:
    prefix = unique_prefix()
    store = RedisStore(sentinel_group.url(), prefix=prefix, publish=True)
    backend = RedisBackend(sentinel_group.url(), prefix=prefix)
    assert "Sentinel service 'sseviews'" in backend._where
    recorder = Recorder()
    await store.connect()
    try:
        await backend.connect(recorder.dispatch, recorder.on_failure)
        try:
            # A process receives the groups its streams use: subscribe first.
            await backend.subscribe(["g"])
            seqs = [await store.append("g", data(f"e{n}"), no_deliver) for n in range(3)]
            with anyio.fail_after(FAILOVER_TIMEOUT):
                await recorder.wait_until(lambda: len(recorder.events) == 3)
            assert [seq for _, seq, _ in recorder.events] == [p.seq for p in seqs]
            assert [wire.split(b"\n", 1)[0] for _, _, wire in recorder.events] == [
                f"id: {p.epoch}-{p.seq}".encode() for p in seqs
            ]
            # The events are on the master the sentinels name.
            master = sentinel_group.master()
            assert master.execute("XLEN", f"{prefix}:g:{{g}}") == 3
        finally:
            await backend.disconnect()
    finally:
        await store.disconnect()


async def test_sentinel_backend_resubscribes_to_the_new_master_after_a_failover(
    sentinel_group: SentinelGroup,
) -> None:
    prefix = unique_prefix()
    store = RedisStore(sentinel_group.url(), prefix=prefix, publish=True)
    backend = RedisBackend(sentinel_group.url(), prefix=prefix)
    backend.max_retry_delay = 0.5
    recorder = Recorder()
    await store.connect()
    try:
        await backend.connect(recorder.dispatch, recorder.on_failure)
        try:
            await backend.subscribe(["g"])
            before = await store.append("g", data("before"), no_deliver)
            with anyio.fail_after(FAILOVER_TIMEOUT):
                await recorder.wait_until(lambda: len(recorder.events) == 1)
            old = await anyio.to_thread.run_sync(sentinel_group.kill_master)
            # The subscription ends: subscribers are told, and resume later.
            with anyio.fail_after(FAILOVER_TIMEOUT):
                await recorder.wait_until(lambda: len(recorder.failures) == 1)
            new = await anyio.to_thread.run_sync(
                sentinel_group.wait_for_failover, old, FAILOVER_TIMEOUT
            )
            await poll_until(lambda: backend.healthy)
            # The store's next append goes to the new master, and the backend,
            # subscribed there now, receives it.
            with anyio.fail_after(FAILOVER_TIMEOUT):
                while True:
                    try:
                        seq = await store.append("g", data("after"), no_deliver)
                        break
                    except Exception:
                        await anyio.sleep(0.1)
            with anyio.fail_after(FAILOVER_TIMEOUT):
                await recorder.wait_until(lambda: len(recorder.events) == 2)
            # The new master is a promoted replica: the group's new epoch, from 1.
            assert seq.epoch != before.epoch
            assert recorder.events[-1][1] == seq.seq == 1
            assert recorder.events[-1][2].startswith(f"id: {seq.epoch}-1\n".encode())
            assert b"after" in recorder.events[-1][2]
            channels = new.execute("PUBSUB", "CHANNELS", f"{prefix}:*")
            assert channels == [f"{prefix}:live:{{g}}"]  # the group's channel, resubscribed
        finally:
            await backend.disconnect()
    finally:
        await store.disconnect()


# -- the epoch: a promoted replica starts a new one, a restarted master keeps it -----------


async def test_redis_store_on_a_promoted_replica_starts_a_new_epoch_per_group(
    tmp_path: Path,
) -> None:
    master_port, replica_port = spare_ports(2)
    master = RedisNode(tmp_path, "master", master_port, [])
    replica = RedisNode(tmp_path, "replica", replica_port, [])
    master.start()
    try:
        replica.start("--replicaof", "127.0.0.1", str(master_port))
        prefix = unique_prefix()
        first = RedisStore(f"redis://127.0.0.1:{master_port}/0", prefix=prefix)
        with anyio.fail_after(TIMEOUT):
            await first.connect()
            old = {
                g: [await first.append(g, data(f"e{n}"), no_deliver) for n in range(3)]
                for g in "gh"
            }
            await first.disconnect()
        assert old["g"][-1].epoch != old["h"][-1].epoch  # each group its own epoch
        # The replication id is kept in each group's own hash: no key is shared.
        replid = master.info("replication")["master_replid"]
        assert master.execute("HGET", f"{prefix}:m:{{g}}", "srv") == replid
        assert sorted(master.execute("KEYS", f"{prefix}:*")) == sorted(
            f"{prefix}:{kind}:{{{g}}}" for kind in "gm" for g in "gh"
        )
        assert master.wait_replicated() == 1
        # A failover as Sentinel runs it: the replica, fully in sync, becomes a master.
        replica.execute("REPLICAOF", "NO", "ONE")
        assert replica.info("replication")["master_replid2"] == replid
        # A process that never saw the old master (no seq of its own) appends there.
        second = RedisStore(f"redis://127.0.0.1:{replica_port}/0", prefix=prefix)
        with anyio.fail_after(TIMEOUT):
            await second.connect()
            after_g = await second.append("g", data("after"), no_deliver)
            # h's head, read on the new master, is a new epoch too: it was the old
            # master's, whose newest events may not have been replicated.
            after_h = await second.head("h")
            # A group first used on the new master starts an epoch of its own, from 1.
            fresh = await second.append("k", data("new"), no_deliver)
            await second.disconnect()
        assert after_g.epoch not in (old["g"][-1].epoch, old["h"][-1].epoch)
        assert after_g.seq == 1  # the group's new epoch, from 1: no id is issued again
        assert after_h.epoch != old["h"][-1].epoch and after_h.seq == 0
        assert fresh.seq == 1
        new_replid = replica.info("replication")["master_replid"]
        for g in "ghk":
            assert replica.execute("HGET", f"{prefix}:m:{{{g}}}", "srv") == new_replid
        # A later process on the same server keeps every group's epoch: no promotion since.
        third = RedisStore(f"redis://127.0.0.1:{replica_port}/0", prefix=prefix)
        with anyio.fail_after(TIMEOUT):
            await third.connect()
            again = {g: await third.append(g, data("again"), no_deliver) for g in "ghk"}
            await third.disconnect()
        assert again["g"] == Position(after_g.epoch, 2)
        assert again["h"] == Position(after_h.epoch, 1)
        assert again["k"] == Position(fresh.epoch, 2)
    finally:
        replica.kill()
        master.kill()


async def test_redis_store_after_two_failovers_renews_a_group_untouched_in_between(
    tmp_path: Path,
) -> None:
    a_port, b_port = spare_ports(2)
    a = RedisNode(tmp_path, "a", a_port, [])
    b = RedisNode(tmp_path, "b", b_port, [])
    a.start()
    try:
        b.start("--replicaof", "127.0.0.1", str(a_port))
        prefix = unique_prefix()
        store = RedisStore(f"redis://127.0.0.1:{a_port}/0", prefix=prefix)
        with anyio.fail_after(TIMEOUT):
            await store.connect()
            before = await store.append("h", data("on a"), no_deliver)
            await store.disconnect()
        assert a.wait_replicated() == 1
        # b is promoted, and a follows it; h is not used on b.
        b.execute("REPLICAOF", "NO", "ONE")
        a.execute("REPLICAOF", "127.0.0.1", str(b_port))

        def a_in_sync() -> bool:
            return a.info("replication").get("master_link_status") == "up"

        await poll_until(a_in_sync)
        assert b.wait_replicated() == 1
        # a is promoted back: its previous id is b's, and h's `srv` is a's first id.
        a.execute("REPLICAOF", "NO", "ONE")
        store = RedisStore(f"redis://127.0.0.1:{a_port}/0", prefix=prefix)
        with anyio.fail_after(TIMEOUT):
            await store.connect()
            after = await store.append("h", data("on a again"), no_deliver)
            await store.disconnect()
        assert after.epoch != before.epoch
        assert after.seq == 1
    finally:
        b.kill()
        a.kill()


async def test_redis_store_on_a_restarted_master_keeps_its_groups_epochs(
    tmp_path: Path,
) -> None:
    (port,) = spare_ports(1)
    node = RedisNode(tmp_path, "durable", port, ["appendonly yes", "appendfsync always"])
    node.start()
    try:
        prefix = unique_prefix()
        url = f"redis://127.0.0.1:{port}/0"
        before_store = RedisStore(url, prefix=prefix)
        with anyio.fail_after(TIMEOUT):
            await before_store.connect()
            before = {g: await before_store.append(g, data("before"), no_deliver) for g in "gh"}
            await before_store.disconnect()
        replid = node.info("replication")["master_replid"]
        with suppress(redis.ConnectionError):
            node.execute("SHUTDOWN")
        node.kill()
        node.start()
        # A new replication id, but no promotion: nothing was lost, ids go on.
        assert node.info("replication")["master_replid"] != replid
        after_store = RedisStore(url, prefix=prefix)
        with anyio.fail_after(TIMEOUT):
            await after_store.connect()
            after = {g: await after_store.append(g, data("after"), no_deliver) for g in "gh"}
            await after_store.disconnect()
        for g in "gh":
            assert after[g] == Position(before[g].epoch, before[g].seq + 1)
    finally:
        node.kill()


# -- two uvicorn processes: the failover guarantee ---------------------------------------


@pytest.fixture
def sentinel_servers(
    tmp_path: Path, sentinel_group: SentinelGroup
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Processes A and B of the multi-process app, on the Sentinel group."""
    a, b = start_app_servers(tmp_path, unique_prefix(), url=sentinel_group.url())
    try:
        yield a, b
    finally:
        a.kill()
        b.kill()


@pytest.mark.parametrize("lagging", [False, True], ids=["replica-in-sync", "replica-lagging"])
async def test_sentinel_failover_keeps_the_guarantee_for_subscribers_on_two_processes(
    sentinel_servers: tuple[ServerProcess, ServerProcess],
    sentinel_group: SentinelGroup,
    http: httpx.AsyncClient,
    lagging: bool,
) -> None:
    """SIGKILL the master while events are published through A; after the kill they
    are published through B (which never published before, as a load balancer may
    do). With `lagging`, the replica stopped receiving writes 0.3 s before the
    kill, so the failover loses the newest events for certain."""
    a, b = sentinel_servers
    rooms = ("one", "two")
    subscribers = [Subscriber(server, room) for server in (a, b) for room in rooms]
    drill = FailoverDrill(http, (a, b), rooms, subscribers, TIMEOUT)

    async def fail_over(drill: FailoverDrill) -> None:
        if lagging:
            replica = await anyio.to_thread.run_sync(sentinel_group.detach_replica)
            count = len(drill.published)
            await drill.published_at_least(count + 30)
            drill.stats["published_while_lagging"] = len(drill.published) - count
            drill.killed_at = len(drill.published)
        started = time.monotonic()
        old: RedisNode = await anyio.to_thread.run_sync(sentinel_group.kill_master)
        drill.via = b
        if lagging:
            await anyio.to_thread.run_sync(sentinel_group.reattach_replica, replica, old)
        await anyio.to_thread.run_sync(sentinel_group.wait_for_failover, old, FAILOVER_TIMEOUT)
        drill.stats["failover_s"] = round(time.monotonic() - started, 2)

    await drill.run(fail_over)
    published = drill.published
    outcomes = [judge(subscriber, published) for subscriber in subscribers]
    conflicts = conflicting_ids(published, subscribers)
    report = {
        "published": len(published),
        "failed_publishes": drill.failed,
        "killed_after": drill.killed_at,
        **drill.stats,
        "epochs": sorted({position_of(p.id)[0] for p in published}),
        "conflicting_ids": conflicts[:10],
        "conflicting_count": len(conflicts),
        "subscribers": [
            {
                "name": o.name,
                "returned": o.returned,
                "received": o.received,
                "resets": o.resets,
                "missed_with_reset": o.missed_with_reset,
                "missed_silently": len(o.missed_silently),
                "duplicates": len(o.duplicates),
                "out_of_order": len(o.out_of_order),
                "connects": s.connects,
                "refused": s.refused,
            }
            for o, s in zip(outcomes, subscribers, strict=True)
        ],
    }
    print("FAILOVER REPORT", json.dumps(report))
    assert not conflicts, report
    for outcome in outcomes:
        assert not outcome.missed_silently, (outcome.name, outcome.missed_silently[:10], report)
        assert not outcome.duplicates, (outcome.name, outcome.duplicates[:10], report)
        assert not outcome.out_of_order, (outcome.name, outcome.out_of_order[:10], report)
    # The streams did end at the failover, and every subscriber resumed.
    for subscriber in subscribers:
        assert subscriber.connects >= 2, report
