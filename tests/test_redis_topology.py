"""The test scaffolding of `tests/support/redis_topology.py` works against real servers.

A Sentinel group reports its master and promotes the replica when the master is
SIGKILLed; a Redis Cluster takes writes in every slot range, and keeps taking them
after a master is SIGKILLed and its replica took over.
"""

from __future__ import annotations

import functools
import itertools
import time

import pytest
from redis.cluster import RedisCluster as ClusterClient
from redis.crc import key_slot
from redis.exceptions import MovedError
from support.redis_topology import HOST, RedisCluster, SentinelGroup

pytestmark = pytest.mark.slow


@functools.cache
def _key_of_every_slot() -> dict[int, str]:
    keys: dict[int, str] = {}
    for n in itertools.count():
        keys.setdefault(key_slot(b"k%d" % n), f"k{n}")
        if len(keys) == 16384:
            return keys
    raise AssertionError("unreachable")


def key_in_slot_range(first: int, last: int) -> str:
    """A key whose hash slot lies in [first, last] (the first and the last slot included)."""
    return _key_of_every_slot()[(first + last) // 2 if first != last else first]


def test_sentinel_group_reports_its_master_and_replica(sentinel_group: SentinelGroup) -> None:
    master = sentinel_group.master()
    replica = sentinel_group.replica()
    assert master is not replica
    assert set(sentinel_group.master_addresses()) == {master.address}
    assert len(sentinel_group.master_addresses()) == 3
    assert master.info("replication")["role"] == "master"
    assert replica.info("replication")["role"] == "slave"
    # A write on the master reaches the replica.
    master.execute("SET", "topology-probe", "1")
    assert master.wait_replicated() == 1
    assert replica.execute("GET", "topology-probe") == "1"
    url = sentinel_group.url()
    assert url.startswith("redis+sentinel://") and url.endswith(f"/{sentinel_group.service}/0")


def test_sentinel_group_failover_promotes_the_replica(sentinel_group: SentinelGroup) -> None:
    replica = sentinel_group.replica()
    master = sentinel_group.master()
    master.execute("SET", "before-failover", "kept")
    assert master.wait_replicated() == 1
    started = time.monotonic()
    killed = sentinel_group.kill_master()
    assert killed is master and not master.running
    promoted = sentinel_group.wait_for_failover(killed, seconds=25)
    took = time.monotonic() - started
    assert promoted is replica
    assert promoted.info("replication")["role"] == "master"
    assert promoted.execute("GET", "before-failover") == "kept"
    assert took < 25, took
    # heal() brings the old master back as a replica of the new one.
    sentinel_group.heal()
    assert sentinel_group.master() is replica
    assert sentinel_group.replica() is master
    assert master.info("replication")["role"] == "slave"


def _write_everywhere(cluster: RedisCluster, client: ClusterClient, tag: str) -> int:
    """Write one key into every master's slot ranges; return how many were written."""
    written = 0
    for master in cluster.masters():
        for first, last in cluster.slot_ranges(master):
            for slot_range in ((first, first), (last, last), (first, last)):
                key = f"{tag}:{key_in_slot_range(*slot_range)}"
                client.set(key, tag)
                assert client.get(key) == tag.encode()
                written += 1
    return written


def test_redis_cluster_takes_writes_in_every_slot_range(redis_cluster: RedisCluster) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3
    ranges = sorted(r for master in masters for r in redis_cluster.slot_ranges(master))
    # The masters' ranges cover every slot exactly once.
    covered = [slot for first, last in ranges for slot in range(first, last + 1)]
    assert covered == list(range(16384))
    for master in masters:
        assert redis_cluster.replica_of(master).info("replication")["role"] == "slave"
    with ClusterClient(host=HOST, port=masters[0].port, protocol=2) as client:
        assert _write_everywhere(redis_cluster, client, "every-range") >= 9
    # A plain client on one node is redirected for keys of other slots.
    other = key_in_slot_range(*redis_cluster.slot_ranges(masters[1])[0])
    with pytest.raises(MovedError) as moved:
        masters[0].execute("SET", other, "x")
    assert moved.value.port == masters[1].port


def test_redis_cluster_survives_a_master_kill(redis_cluster: RedisCluster) -> None:
    victim = redis_cluster.masters()[1]
    replica = redis_cluster.replica_of(victim)
    ranges = redis_cluster.slot_ranges(victim)
    key = key_in_slot_range(*ranges[0])
    with ClusterClient(host=HOST, port=redis_cluster.masters()[0].port, protocol=2) as client:
        client.set(key, "before")
        assert victim.wait_replicated(probe=f"{{{key}}}:probe") == 1
        started = time.monotonic()
        redis_cluster.kill_master(victim)
        redis_cluster.wait_for_failover(victim, replica, seconds=25)
        took = time.monotonic() - started
        assert redis_cluster.slot_ranges(replica) == ranges
        assert replica in redis_cluster.masters() and victim not in redis_cluster.masters()
        # The client follows the new slot owner, and every range takes writes again.
        assert client.get(key) == b"before"
        assert _write_everywhere(redis_cluster, client, "after-kill") >= 9
    assert took < 25, took
    redis_cluster.heal()
    assert redis_cluster.replica_of(replica) is victim
