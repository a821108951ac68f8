"""What the failover safety of the Redis store costs on publish.

Two figures, side by side in one run:

A. Redis server time per append script (``INFO commandstats``, ``usec_per_call``
   of ``evalsha``), with the server check of this release (the script reads the
   server's replication ids with ``INFO replication`` and compares them with the
   one kept in the group's hash, so that a failover starts a new epoch) and
   without it (the same script with those lines taken out). Measured on a
   ``redis-server`` of its own on a spare loopback port, so nothing else runs there.
B. Round-trip time of one ``RedisStore.append`` from Python (median of
   ``--appends`` sequential appends) on the master of a Sentinel group, alone and
   followed by ``WAIT 1 1000`` (what waiting for the replica to acknowledge each
   event would add; not used by sseviews, measured for comparison).

Usage (from the repository root)::

    PYTHONPATH=.:tests python benchmarks/bench_failover_cost.py --appends 5000 --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import redis.asyncio

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.redis_topology import RedisNode, SentinelGroup, spare_ports  # noqa: E402

from sseviews.stores import redis as redis_store  # noqa: E402
from sseviews.stores.redis import RedisStore  # noqa: E402

_CHECK = """local info = redis.pcall('INFO', 'replication')
local server, previous = nil, nil
if type(info) == 'string' then
  server = string.match(info, 'master_replid:(%x+)')
  previous = string.match(info, 'master_replid2:(%x+)')
end
"""


async def _no_deliver(seq: int, wire: bytes) -> None:
    pass


async def server_usec(url: str, node: RedisNode, appends: int, checked: bool) -> float:
    """usec_per_call of the append script over `appends` appends."""
    store = RedisStore(url, prefix=f"bench-{checked}-{time.monotonic_ns()}", retention=1000)
    if not checked:
        assert _CHECK in redis_store._APPEND
        unchecked = redis_store._APPEND.replace(_CHECK, "local server, previous = nil, nil\n")
        store._append = store._client.register_script(unchecked)
    await store.connect()
    try:
        await store.append("g", b"data: warm\n\n", _no_deliver)
        node.execute("CONFIG", "RESETSTAT")
        for n in range(appends):
            await store.append("g", b"data: %d\n\n" % n, _no_deliver)
        stats: dict[str, Any] = node.info("commandstats")
    finally:
        await store.disconnect()
    return float(stats["cmdstat_evalsha"]["usec_per_call"])


async def round_trips(url: str, appends: int, wait: bool) -> list[float]:
    store = RedisStore(url, prefix=f"bench-rt-{time.monotonic_ns()}", retention=1000)
    await store.connect()
    times = []
    try:
        for n in range(appends):
            started = time.perf_counter()
            await store.append("g", b"data: %d\n\n" % n, _no_deliver)
            if wait:
                await store._client.execute_command("WAIT", 1, 1000)
            times.append((time.perf_counter() - started) * 1e6)
    finally:
        await store.disconnect()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        node = RedisNode(Path(tmp), "bench", spare_ports(1)[0], [])
        node.start()
        group = SentinelGroup(Path(tmp) / "sentinel")
        group.directory.mkdir()
        try:
            group.start()
            url = f"redis://127.0.0.1:{node.port}/0"
            a: dict[bool, list[float]] = {True: [], False: []}
            b: dict[bool, list[float]] = {True: [], False: []}
            master_url = f"redis://127.0.0.1:{group.master().port}/0"
            for _ in range(args.runs):
                for checked in (False, True):
                    a[checked].append(asyncio.run(server_usec(url, node, args.appends, checked)))
                for wait in (False, True):
                    b[wait].append(
                        statistics.median(asyncio.run(round_trips(master_url, args.appends, wait)))
                    )
        finally:
            group.stop()
            node.kill()
    print(
        f"redis-server {node_version()}, redis-py {redis.__version__}, "
        f"{args.appends} appends x {args.runs} runs (medians)"
    )
    print("| measure | without | with | added |")
    print("|---|---:|---:|---:|")
    for label, runs in (
        ("A. server time per append script, us (server check)", a),
        ("B. append round trip p50, us (WAIT 1 after it)", b),
    ):
        wo, wi = statistics.median(runs[False]), statistics.median(runs[True])
        print(f"| {label} | {wo:.1f} | {wi:.1f} | {wi - wo:+.1f} |")
    print("raw A:", {k: [round(x, 1) for x in v] for k, v in a.items()})
    print("raw B:", {k: [round(x) for x in v] for k, v in b.items()})


def node_version() -> str:
    import subprocess

    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True)
    return out.stdout.split()[2].removeprefix("v=")


if __name__ == "__main__":
    main()
