"""Cost of presence on Redis Cluster (`ClusterPresence`) with one process in many groups.

Starts its own 3+3 cluster from redis-server (as the tests do), then with one
member in each of `--groups` groups (one group per join, as streams of one group
join):

* the time to join them all (sequentially: a first join in a group costs one SADD
  to the process's groups set plus the group's script);
* the time of one heartbeat of that process (median of 20), and of a heartbeat
  of another process with no members;
* the time for a live process's heartbeat to sweep the process once it is dead
  (every member removed, group by group, pipelined per shard).

Usage::

    python benchmarks/cluster_presence_cost.py --groups 4000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.dont_write_bytecode = True

_REPO = Path(__file__).resolve().parent.parent
for path in (_REPO, _REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import redis.asyncio  # noqa: E402
from support.redis_topology import HOST, RedisCluster  # noqa: E402

from sseviews.backends._redis_presence import ClusterPresence  # noqa: E402

TIMEOUT = 30.0


async def measure(cluster: RedisCluster, groups: int) -> None:
    client = redis.asyncio.RedisCluster(host=HOST, port=cluster.nodes[0].port, protocol=2)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    busy = ClusterPresence(client, prefix, "busy", TIMEOUT)
    idle = ClusterPresence(client, prefix, "idle", TIMEOUT)
    names = [f"room:{n}" for n in range(groups)]
    started = time.perf_counter()
    for n, group in enumerate(names):
        await busy.join(f"m{n}", [group], b'{"id":"m%d","info":{},"joined_at":1.0}' % n, True)
    joined = time.perf_counter() - started

    def median_ms(samples: list[float]) -> float:
        return statistics.median(samples) * 1000

    busy_beats, idle_beats = [], []
    for _ in range(20):
        started = time.perf_counter()
        assert await busy.beat(True)
        busy_beats.append(time.perf_counter() - started)
        started = time.perf_counter()
        await idle.beat(False)
        idle_beats.append(time.perf_counter() - started)

    # Make `busy` dead: its registration passes now.
    await client.zadd(f"{prefix}:presence-processes", {"busy": 0})
    started = time.perf_counter()
    await idle.beat(False)
    swept = time.perf_counter() - started
    left = sum([await idle.count(group) for group in names[:50]])
    await client.aclose()
    print(f"groups: {groups}")
    each = joined / groups * 1e6
    print(f"join, one member per group, sequential: {joined:.2f} s ({each:.0f} us each)")
    beat = median_ms(busy_beats)
    print(f"heartbeat of the process in {groups} groups: {beat:.2f} ms (median of 20)")
    print(f"heartbeat of a process with no member: {median_ms(idle_beats):.2f} ms (median of 20)")
    print(f"sweep of the dead process ({groups} groups, leave announced): {swept * 1000:.0f} ms")
    assert left == 0, left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=4000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        cluster = RedisCluster(Path(directory))
        cluster.start()
        try:
            asyncio.run(measure(cluster, args.groups))
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
