"""`publish(group, data, session=s)`: the event is written in the caller's transaction
and delivered only once it commits, on the machine's real PostgreSQL and Redis, and
on SQLite in one process.

Three layouts: PostgreSQL only (the `NOTIFY` is queued in the caller's transaction),
Redis live with a PostgreSQL history (the broadcast delivers after the commit), and
memory live with a SQLite history (one process, delivered after the commit).
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from support.redis import REDIS_URL, delete_prefix

from sseviews import Broadcast, Event
from sseviews.stores.base import Position, parse_id
from sseviews.stores.sqlalchemy import SQLAlchemyStore

pytestmark = pytest.mark.anyio

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
LAYOUTS = ["postgres", "redis+postgres", "memory+sqlite"]


class Rollback(Exception):
    """Raised inside a transaction to roll it back."""


def make_broadcast(layout: str, prefix: str, tmp_path: Path) -> Broadcast:
    if layout == "postgres":
        return Broadcast(PG_URL, prefix=prefix)
    if layout == "redis+postgres":
        return Broadcast(REDIS_URL, history=PG_URL, prefix=prefix)
    return Broadcast("memory://", history=f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")


@asynccontextmanager
async def connected(layout: str, prefix: str, tmp_path: Path) -> AsyncIterator[Broadcast]:
    broadcast = make_broadcast(layout, prefix, tmp_path)
    try:
        async with broadcast:
            yield broadcast
    finally:
        if layout == "redis+postgres":
            await delete_prefix(prefix)


@pytest.fixture(params=LAYOUTS)
async def broadcast(
    request: pytest.FixtureRequest, pg_prefix: str, tmp_path: Path
) -> AsyncIterator[Broadcast]:
    async with connected(request.param, pg_prefix, tmp_path) as broadcast:
        yield broadcast


def engine_of(broadcast: Broadcast) -> Any:
    store = broadcast.store
    assert isinstance(store, SQLAlchemyStore)
    return store.engine


async def nothing_within(subscription: Any, seconds: float) -> bool:
    """True if no event reaches `subscription` within `seconds`."""
    with anyio.move_on_after(seconds):
        await subscription.__anext__()
        return False
    return True


async def stored_count(broadcast: Broadcast, group: str) -> int:
    """How many events of `group` another connection sees in the history's table."""
    store = broadcast.store
    assert isinstance(store, SQLAlchemyStore)
    query = text(f"SELECT count(*) FROM {store.table_prefix}_v2_events WHERE grp = :g")
    async with store.engine.connect() as conn:
        return int((await conn.execute(query, {"g": group})).scalar_one())


async def history_of(broadcast: Broadcast, group: str) -> list[tuple[int, bytes]]:
    head = (await broadcast.store.heads([group]))[0]
    events = await broadcast.store.read(group, Position(head.epoch, 0))
    assert events is not None
    return events


# -- commit and rollback ---------------------------------------------------------------


async def test_publish_in_session_is_delivered_only_after_commit(broadcast: Broadcast) -> None:
    async with broadcast.subscribe("jobs") as subscription:
        async with AsyncSession(engine_of(broadcast)) as session, session.begin():
            event_id = await broadcast.publish("jobs", {"step": 1}, session=session)
            assert parse_id(event_id)[1] == 1
            # publish() returned, but the transaction is open: nobody sees it yet,
            # and another connection does not see it in the history either.
            assert await nothing_within(subscription, 0.3)
            assert await stored_count(broadcast, "jobs") == 0
        with anyio.fail_after(5):
            event = await subscription.__anext__()
    assert event.id == event_id
    assert event.json() == {"step": 1}
    assert [seq for seq, _ in await history_of(broadcast, "jobs")] == [1]


async def test_publish_in_session_rolled_back_is_never_delivered_and_leaves_no_gap(
    broadcast: Broadcast,
) -> None:
    first = await broadcast.publish("jobs", {"n": "first"})
    async with broadcast.subscribe("jobs", last_event_id=first) as subscription:
        with pytest.raises(Rollback):
            async with AsyncSession(engine_of(broadcast)) as session, session.begin():
                rolled_back = await broadcast.publish("jobs", {"n": "no"}, session=session)
                raise Rollback
        assert await nothing_within(subscription, 0.3)
        assert [seq for seq, _ in await history_of(broadcast, "jobs")] == [1]
        # The next event takes the id the rolled-back one had: no gap.
        async with AsyncSession(engine_of(broadcast)) as session, session.begin():
            kept = await broadcast.publish("jobs", {"n": "yes"}, session=session)
        plain = await broadcast.publish("jobs", {"n": "plain"})
        with anyio.fail_after(5):
            events = [await subscription.__anext__() for _ in range(2)]
        assert await nothing_within(subscription, 0.2)
    assert kept == rolled_back
    assert parse_id(kept) == (parse_id(first)[0], 2)
    assert [event.id for event in events] == [kept, plain]
    assert [event.json()["n"] for event in events] == ["yes", "plain"]
    assert parse_id(plain)[1] == 3
    assert [seq for seq, _ in await history_of(broadcast, "jobs")] == [1, 2, 3]


async def test_rolled_back_first_event_of_a_group_leaves_no_group(broadcast: Broadcast) -> None:
    with pytest.raises(Rollback):
        async with AsyncSession(engine_of(broadcast)) as session, session.begin():
            await broadcast.publish("fresh", {"n": "no"}, session=session)
            raise Rollback
    async with AsyncSession(engine_of(broadcast)) as session, session.begin():
        kept = await broadcast.publish("fresh", {"n": "yes"}, session=session)
    assert parse_id(kept)[1] == 1
    assert [seq for seq, _ in await history_of(broadcast, "fresh")] == [1]


async def test_publish_in_session_writes_with_the_callers_rows(broadcast: Broadcast) -> None:
    """The natural shape: the app's row and the event commit, or vanish, together."""
    engine = engine_of(broadcast)
    table = f"rows_{broadcast.live.__class__.__name__.lower()}_{random.randrange(10**9)}"
    async with engine.begin() as conn:
        await conn.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, v TEXT)"))
    try:
        async with broadcast.subscribe("rows") as subscription:
            with pytest.raises(Rollback):
                async with AsyncSession(engine) as session, session.begin():
                    await session.execute(text(f"INSERT INTO {table} VALUES (1, 'gone')"))
                    await broadcast.publish("rows", {"row": 1}, session=session)
                    raise Rollback
            async with AsyncSession(engine) as session, session.begin():
                await session.execute(text(f"INSERT INTO {table} VALUES (2, 'kept')"))
                await broadcast.publish("rows", {"row": 2}, session=session)
            with anyio.fail_after(5):
                event = await subscription.__anext__()
            assert await nothing_within(subscription, 0.2)
        async with engine.connect() as conn:
            rows = (await conn.execute(text(f"SELECT id FROM {table}"))).all()
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP TABLE {table}"))
    assert event.json() == {"row": 2}
    assert [row[0] for row in rows] == [2]


async def test_publish_in_savepoint_rolled_back_is_dropped(broadcast: Broadcast) -> None:
    async with broadcast.subscribe("jobs") as subscription:
        async with AsyncSession(engine_of(broadcast)) as session, session.begin():
            first = await broadcast.publish("jobs", {"n": 1}, session=session)
            with pytest.raises(Rollback):
                async with session.begin_nested():
                    await broadcast.publish("jobs", {"n": "savepoint"}, session=session)
                    raise Rollback
            async with session.begin_nested():
                await broadcast.publish("jobs", {"n": 2}, session=session)
        with anyio.fail_after(5):
            events = [await subscription.__anext__() for _ in range(2)]
        assert await nothing_within(subscription, 0.2)
    assert [event.json()["n"] for event in events] == [1, 2]
    assert [parse_id(event.id or "")[1] for event in events] == [1, 2]
    assert events[0].id == first


async def test_publish_in_a_session_without_a_transaction_begins_one(
    broadcast: Broadcast,
) -> None:
    async with broadcast.subscribe("jobs") as subscription:
        async with AsyncSession(engine_of(broadcast)) as session:
            assert not session.in_transaction()
            event_id = await broadcast.publish("jobs", {"auto": True}, session=session)
            assert session.in_transaction()  # SQLAlchemy's autobegin: you commit it
            assert await nothing_within(subscription, 0.3)
            await session.commit()
            with anyio.fail_after(5):
                event = await subscription.__anext__()
            # The session goes on: its next transaction publishes as the first did.
            await broadcast.publish("jobs", {"auto": "rolled back"}, session=session)
            await session.rollback()
            assert await nothing_within(subscription, 0.3)
    assert event.id == event_id


async def test_publish_with_another_engine_on_the_same_database(
    broadcast: Broadcast,
) -> None:
    engine = engine_of(broadcast)
    other = create_async_engine(engine.url)
    try:
        async with broadcast.subscribe("jobs") as subscription:
            async with AsyncSession(other) as session, session.begin():
                event_id = await broadcast.publish("jobs", {"other": True}, session=session)
            with anyio.fail_after(5):
                event = await subscription.__anext__()
    finally:
        await other.dispose()
    assert event.id == event_id


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_transaction_waits_for_a_plain_publish_to_be_delivered(
    layout: str, pg_prefix: str, tmp_path: Path
) -> None:
    """A group's lock covers a plain publish until its event is delivered, so an
    event published in a transaction meanwhile is delivered after it."""
    async with connected(layout, pg_prefix, tmp_path) as broadcast:
        live = broadcast.live
        deliver = live.deliver
        delivering = anyio.Event()

        async def slow(group: str, seq: int, wire: bytes) -> None:
            if seq == 1:
                delivering.set()
                await anyio.sleep(0.3)
            await deliver(group, seq, wire)

        live.deliver = slow  # type: ignore[method-assign]
        async with broadcast.subscribe("jobs") as subscription:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(broadcast.publish, "jobs", "plain")
                with anyio.fail_after(5):
                    await delivering.wait()
                    async with AsyncSession(engine_of(broadcast)) as session, session.begin():
                        await broadcast.publish("jobs", "in a transaction", session=session)
            with anyio.fail_after(5):
                events = await collect(subscription, 2)
    assert [event.data for event in events] == ["plain", "in a transaction"]
    assert [parse_id(event.id or "")[1] for event in events] == [1, 2]


@pytest.mark.parametrize("layout", ["redis+postgres", "memory+sqlite"])
async def test_plain_publish_is_delivered_after_committed_events_of_transactions(
    layout: str, pg_prefix: str, tmp_path: Path
) -> None:
    """The broadcast delivers a transaction's event after its commit; a plain publish
    that follows it waits for that delivery."""
    async with connected(layout, pg_prefix, tmp_path) as broadcast:
        live = broadcast.live
        deliver = live.deliver
        delivering = anyio.Event()

        async def slow(group: str, seq: int, wire: bytes) -> None:
            if seq == 1:
                delivering.set()
                await anyio.sleep(0.3)
            await deliver(group, seq, wire)

        live.deliver = slow  # type: ignore[method-assign]
        async with broadcast.subscribe("jobs") as subscription:
            async with AsyncSession(engine_of(broadcast)) as session, session.begin():
                await broadcast.publish("jobs", "in a transaction", session=session)
            with anyio.fail_after(5):
                await delivering.wait()
                await broadcast.publish("jobs", "plain")
                events = await collect(subscription, 2)
    assert [event.data for event in events] == ["in a transaction", "plain"]


# -- many writers at once ------------------------------------------------------------


async def run_writers(
    broadcast: Broadcast, groups: list[str], writers: int, rounds: int, seed: int
) -> dict[str, list[tuple[str, str]]]:
    """`writers` tasks, each running `rounds` transactions that publish one or two
    events to random groups and then commit or roll back at random, plus one task
    publishing without a transaction; return each group's committed (id, data)."""
    engine = engine_of(broadcast)
    committed: dict[str, list[tuple[str, str]]] = {group: [] for group in groups}

    async def writer(number: int) -> None:
        chance = random.Random(seed + number)
        for round_ in range(rounds):
            published: list[tuple[str, str, str]] = []
            commit = chance.random() < 0.6
            try:
                async with AsyncSession(engine) as session, session.begin():
                    # One order of groups in every transaction: two transactions
                    # taking two groups' locks in opposite orders would deadlock.
                    for group in sorted(chance.sample(groups, chance.choice([1, 2]))):
                        data = f"w{number}r{round_}{group}"
                        event_id = await broadcast.publish(group, data, session=session)
                        published.append((group, event_id, data))
                    await anyio.sleep(chance.random() * 0.005)
                    if not commit:
                        raise Rollback
            except Rollback:
                continue
            for group, event_id, data in published:
                committed[group].append((event_id, data))

    async def plain() -> None:
        chance = random.Random(seed)
        for round_ in range(rounds):
            group = chance.choice(groups)
            data = f"plain{round_}{group}"
            committed[group].append((await broadcast.publish(group, data), data))
            await anyio.sleep(chance.random() * 0.005)

    async with anyio.create_task_group() as tasks:
        for number in range(writers):
            tasks.start_soon(writer, number)
        tasks.start_soon(plain)
    for group in groups:
        committed[group].sort(key=lambda pair: parse_id(pair[0])[1])
    return committed


async def collect(subscription: Any, count: int) -> list[Event]:
    return [await subscription.__anext__() for _ in range(count)]


async def check_concurrent_writers(
    publisher: Broadcast, subscribers: list[Broadcast], writers: int, rounds: int
) -> None:
    groups = ["a", "b"]
    async with (
        publisher.subscribe(*groups[:1]) as a_here,
        publisher.subscribe(*groups[1:]) as b_here,
        subscribers[-1].subscribe(*groups[:1]) as a_there,
        subscribers[-1].subscribe(*groups[1:]) as b_there,
    ):
        with anyio.fail_after(30):
            committed = await run_writers(publisher, groups, writers, rounds, seed=7)
        for group, subscription_pair in (("a", (a_here, a_there)), ("b", (b_here, b_there))):
            expected = committed[group]
            # Ids have no gap: 1, 2, 3... in commit order.
            assert [parse_id(event_id)[1] for event_id, _ in expected] == list(
                range(1, len(expected) + 1)
            )
            for subscription in subscription_pair:
                with anyio.fail_after(10):
                    events = await collect(subscription, len(expected))
                assert [(event.id, event.data) for event in events] == expected
                # Nothing more: no rolled-back event, no duplicate.
                assert await nothing_within(subscription, 0.2)
            stored = await history_of(publisher, group)
            assert [seq for seq, _ in stored] == list(range(1, len(expected) + 1))


@pytest.mark.parametrize("layout", ["postgres", "redis+postgres"])
async def test_concurrent_transactions_deliver_exactly_the_committed_events_in_order(
    layout: str, pg_prefix: str, tmp_path: Path
) -> None:
    # Two broadcasts with connections of their own stand for two processes.
    async with (
        connected(layout, pg_prefix, tmp_path) as publisher,
        connected(layout, pg_prefix, tmp_path) as other,
    ):
        await check_concurrent_writers(publisher, [other], writers=8, rounds=12)


async def test_concurrent_transactions_on_sqlite_in_one_process(tmp_path: Path) -> None:
    async with connected("memory+sqlite", "unused", tmp_path) as broadcast:
        await check_concurrent_writers(broadcast, [broadcast], writers=8, rounds=6)


# -- the other shapes of session ---------------------------------------------------------


async def test_publish_with_a_connection_on_postgres(pg_prefix: str, tmp_path: Path) -> None:
    async with connected("postgres", pg_prefix, tmp_path) as broadcast:
        engine = engine_of(broadcast)
        async with broadcast.subscribe("jobs") as subscription:
            async with engine.begin() as conn:
                event_id = await broadcast.publish("jobs", {"conn": 1}, session=conn)
                assert await nothing_within(subscription, 0.3)
            with pytest.raises(Rollback):
                async with engine.begin() as conn:
                    await broadcast.publish("jobs", {"conn": "no"}, session=conn)
                    raise Rollback
            plain = await broadcast.publish("jobs", {"conn": 2})
            with anyio.fail_after(5):
                events = await collect(subscription, 2)
            assert await nothing_within(subscription, 0.2)
            async with engine.connect() as conn:
                with pytest.raises(ValueError, match="needs a transaction begun"):
                    await broadcast.publish("jobs", {}, session=conn)
    assert [event.id for event in events] == [event_id, plain]
    assert parse_id(plain)[1] == 2


async def test_large_event_in_a_transaction_on_postgres(pg_prefix: str, tmp_path: Path) -> None:
    async with connected("postgres", pg_prefix, tmp_path) as broadcast:
        big = "x" * 20_000  # over a NOTIFY payload: the side table, in the same transaction
        async with broadcast.subscribe("jobs") as subscription:
            with pytest.raises(Rollback):
                async with AsyncSession(engine_of(broadcast)) as session, session.begin():
                    await broadcast.publish("jobs", big + "no", session=session)
                    raise Rollback
            async with AsyncSession(engine_of(broadcast)) as session, session.begin():
                await broadcast.publish("jobs", big, session=session)
            with anyio.fail_after(5):
                event = await subscription.__anext__()
            assert await nothing_within(subscription, 0.2)
    assert event.data == big


async def test_plain_publish_inside_own_transaction_is_refused(
    broadcast: Broadcast,
) -> None:
    async with AsyncSession(engine_of(broadcast)) as session, session.begin():
        await broadcast.publish("jobs", {"n": 1}, session=session)
        with anyio.fail_after(2), pytest.raises(RuntimeError, match="pass the same session="):
            await broadcast.publish("jobs", {"n": 2})
    # Once the transaction ended, a plain publish goes through.
    with anyio.fail_after(5):
        event_id = await broadcast.publish("jobs", {"n": 3})
    assert parse_id(event_id)[1] == 2


# -- errors ----------------------------------------------------------------------------


async def test_session_on_another_database_is_refused(broadcast: Broadcast, tmp_path: Path) -> None:
    elsewhere = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'elsewhere.db'}")
    try:
        async with AsyncSession(elsewhere) as session, session.begin():
            with pytest.raises(ValueError, match="history database") as caught:
                await broadcast.publish("jobs", {}, session=session)
    finally:
        await elsewhere.dispose()
    assert "broadcast.store.engine" in str(caught.value)
    assert "elsewhere.db" in str(caught.value)


async def test_session_on_another_postgres_database_is_refused(pg_prefix: str) -> None:
    # Refused from the URL alone, before any connection to the other database.
    elsewhere = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1:5432/other")
    async with connected("postgres", pg_prefix, Path()) as broadcast:
        try:
            async with AsyncSession(elsewhere) as session:
                with pytest.raises(ValueError, match="history database") as caught:
                    await broadcast.publish("jobs", {}, session=session)
                assert not session.in_transaction()
        finally:
            await elsewhere.dispose()
    assert "127.0.0.1:5432/other" in str(caught.value)


async def test_session_without_sql_history_is_refused(prefix: str) -> None:
    engine = create_async_engine(PG_URL)
    try:
        for broadcast in (Broadcast("memory://"), Broadcast(REDIS_URL, prefix=prefix)):
            async with broadcast, AsyncSession(engine) as session:
                with pytest.raises(ValueError, match="needs a SQL history"):
                    await broadcast.publish("jobs", {}, session=session)
    finally:
        await engine.dispose()


async def test_session_of_the_wrong_type_is_refused(broadcast: Broadcast) -> None:
    with pytest.raises(TypeError, match="AsyncSession or AsyncConnection"):
        await broadcast.publish("jobs", {}, session=object())


async def test_connection_is_refused_when_delivery_follows_the_commit(
    pg_prefix: str, tmp_path: Path
) -> None:
    async with connected("redis+postgres", pg_prefix, tmp_path) as broadcast:
        async with engine_of(broadcast).begin() as conn:
            with pytest.raises(TypeError, match="needs an AsyncSession here"):
                await broadcast.publish("jobs", {}, session=conn)


async def test_failed_delivery_after_commit_is_logged_and_later_events_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with connected("memory+sqlite", "unused", tmp_path) as broadcast:
        live = broadcast.live
        deliver = live.deliver
        failures = 1

        async def flaky(group: str, seq: int, wire: bytes) -> None:
            nonlocal failures
            if failures:
                failures -= 1
                raise OSError("the live layer is down")
            await deliver(group, seq, wire)

        live.deliver = flaky  # type: ignore[method-assign]
        async with broadcast.subscribe("jobs") as subscription:
            with caplog.at_level(logging.WARNING, logger="sseviews"):
                async with AsyncSession(engine_of(broadcast)) as session, session.begin():
                    lost = await broadcast.publish("jobs", "lost live", session=session)
                async with AsyncSession(engine_of(broadcast)) as session, session.begin():
                    kept = await broadcast.publish("jobs", "kept", session=session)
                with anyio.fail_after(5):
                    event = await subscription.__anext__()
        # The first is in the history, for the streams to fill the hole from.
        assert [seq for seq, _ in await history_of(broadcast, "jobs")] == [1, 2]
    assert event.id == kept
    assert f"delivering event {lost}" in caplog.text
