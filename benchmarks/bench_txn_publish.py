"""Transactional publish: the rate of `publish(..., session=s)` against plain `publish()`.

Two `Broadcast`s in this process stand for two processes, each with connections of
its own: A publishes, B holds one subscription per group and counts arrivals. For
each layout, with the history in PostgreSQL,

* ``postgresql+asyncpg://`` -- PostgreSQL only (the NOTIFY is queued in the
  transaction, PostgreSQL delivers it at commit);
* ``redis://`` live with ``history="postgresql+asyncpg://"`` (the broadcast
  delivers after the commit),

``--publishers`` tasks (each with a group of its own) publish ``--events`` events
in all, in four ways, side by side in one run:

* ``plain``: ``await a.publish(group, data)``;
* ``session``: the same in a transaction of its own,
  ``async with AsyncSession(engine) as s, s.begin(): await a.publish(..., session=s)``;
* ``row, then plain``: a transaction that inserts a row of the app's, then a
  plain publish after it commits (what an app did before `session=`);
* ``row + event``: the row and the event in one transaction.

It reports events per second, from the first publish to the last event's arrival
in B: the median of ``--runs`` runs (the ways take turns within each run, so a
noisy moment of the machine hits them alike), and the spread (min to max).
Each run uses a unique prefix; its tables are dropped afterwards.

Usage::

    python benchmarks/bench_txn_publish.py --events 500 --runs 3 --publishers 4
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import redis.asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from sseviews import Broadcast

PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"
WAYS = ("plain", "session", "row, then plain", "row + event")
DATA = "x" * 100


async def drop(prefix: str, live: str) -> None:
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


def publisher(
    way: str, a: Broadcast, engine: AsyncEngine, rows: str
) -> Callable[[str], Awaitable[None]]:
    insert = text(f"INSERT INTO {rows} (data) VALUES (:data)")

    async def plain(group: str) -> None:
        await a.publish(group, DATA)

    async def session(group: str) -> None:
        async with AsyncSession(engine) as s, s.begin():
            await a.publish(group, DATA, session=s)

    async def row_then_plain(group: str) -> None:
        async with AsyncSession(engine) as s, s.begin():
            await s.execute(insert, {"data": DATA})
        await a.publish(group, DATA)

    async def row_and_event(group: str) -> None:
        async with AsyncSession(engine) as s, s.begin():
            await s.execute(insert, {"data": DATA})
            await a.publish(group, DATA, session=s)

    return {
        "plain": plain,
        "session": session,
        "row, then plain": row_then_plain,
        "row + event": row_and_event,
    }[way]


async def rate(
    way: str,
    a: Broadcast,
    b: Broadcast,
    engine: AsyncEngine,
    rows: str,
    events: int,
    publishers: int,
) -> float:
    """Events per second for one way: from the first publish to the last arrival in B."""
    tag = uuid.uuid4().hex[:6]
    groups = [f"{tag}-{number}" for number in range(publishers)]
    publish = publisher(way, a, engine, rows)
    each = events // publishers
    arrived = asyncio.Event()
    remaining = each * publishers

    async def count(group: str, ready: asyncio.Event) -> None:
        nonlocal remaining
        async with b.subscribe(group) as subscription:
            ready.set()
            async for _ in subscription:
                remaining -= 1
                if not remaining:
                    arrived.set()

    async def publish_all(group: str) -> None:
        for _ in range(each):
            await publish(group)

    readies = [asyncio.Event() for _ in groups]
    counters = [asyncio.create_task(count(g, r)) for g, r in zip(groups, readies, strict=True)]
    try:
        for ready in readies:
            await ready.wait()
        started = time.perf_counter()
        await asyncio.gather(*(publish_all(group) for group in groups))
        async with asyncio.timeout(60):
            await arrived.wait()
        return each * publishers / (time.perf_counter() - started)
    finally:
        for counter in counters:
            counter.cancel()
        await asyncio.gather(*counters, return_exceptions=True)


async def run(live: str, events: int, publishers: int) -> dict[str, float]:
    prefix = f"bench{uuid.uuid4().hex[:10]}"
    rows = f"{prefix}_rows"
    a = Broadcast(live, history=PG, prefix=prefix)
    b = Broadcast(live, history=PG, prefix=prefix)
    engine = create_async_engine(PG)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"CREATE TABLE {rows} (id bigserial PRIMARY KEY, data text)"))
        async with a, b:
            return {way: await rate(way, a, b, engine, rows, events, publishers) for way in WAYS}
    finally:
        await engine.dispose()
        await drop(prefix, live)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--publishers", type=int, default=4)
    args = parser.parse_args()
    print(
        f"{args.events} events, {args.publishers} publishers (a group each), "
        f"median of {args.runs} runs (min-max), events/s"
    )
    print("| layout | " + " | ".join(WAYS) + " |")
    print("|---|" + "---|" * len(WAYS))
    for name, live in (("PostgreSQL only", PG), ("Redis + PostgreSQL history", REDIS)):
        runs = [await run(live, args.events, args.publishers) for _ in range(args.runs)]
        cells = []
        for way in WAYS:
            rates = [each[way] for each in runs]
            cells.append(f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    asyncio.run(main())
