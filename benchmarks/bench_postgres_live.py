"""PostgreSQL as the live layer: publish-to-receive latency and publish rate, against Redis.

Two `Broadcast`s in this process stand for two processes, each with connections of
its own: A publishes, B holds one subscription to the group. For each live layer,
with the history in PostgreSQL in both cases,

* ``postgresql+asyncpg://`` -- PostgreSQL only (`PostgresBackend`, LISTEN/NOTIFY);
* ``redis://`` live with ``history="postgresql+asyncpg://"``,

it publishes ``--events`` events one after the other (each waits for the previous
one to reach B) and reports the median and p99 time from the call to `publish()`
in A to the event arriving in B's subscription, and the publishes per second.
It runs once with small events (100 bytes of data) and once with 20 KB events (over
PostgreSQL's 8,000-byte NOTIFY limit: through the payload table). Each run uses a
unique prefix; the tables are dropped afterwards.

Usage::

    python benchmarks/bench_postgres_live.py --events 2000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import asyncpg
import redis.asyncio

from sseviews import Broadcast

PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"


async def run(live: str, size: int, events: int) -> tuple[float, float, float]:
    prefix = f"bench{uuid.uuid4().hex[:10]}"
    one = Broadcast(live, history=PG, prefix=prefix)
    two = Broadcast(live, history=PG, prefix=prefix)
    latencies: list[float] = []
    data = "x" * size
    try:
        async with one, two, two.subscribe("room") as sub:
            iterator = sub.__aiter__()
            started = time.perf_counter()
            for _ in range(events):
                sent = time.perf_counter()
                await one.publish("room", data)
                await iterator.__anext__()
                latencies.append(time.perf_counter() - sent)
            elapsed = time.perf_counter() - started
    finally:
        conn = await asyncpg.connect(PG.replace("+asyncpg", ""))
        try:
            for row in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE $1", f"{prefix}%"
            ):
                await conn.execute(f'DROP TABLE "{row["tablename"]}"')
        finally:
            await conn.close()
        if live.startswith("redis"):
            client = redis.asyncio.Redis.from_url(REDIS)
            keys = [key async for key in client.scan_iter(f"{prefix}:*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    return p50, p99, events / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    print("| live layer | event data | p50 ms | p99 ms | publishes/s |")
    print("|---|---|---|---|---|")
    for size in (100, 20_000):
        for name, live in (("PostgreSQL only", PG), ("Redis + PostgreSQL history", REDIS)):
            p50, p99, rate = await run(live, size, args.events)
            print(f"| {name} | {size:,} B | {p50:.2f} | {p99:.2f} | {rate:,.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
