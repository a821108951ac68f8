from __future__ import annotations

import logging
import os
import random
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from support.postgres import PG_URL

from sseviews import BackendError, BroadcastNotConnected
from sseviews.stores.base import Position, id_line
from sseviews.stores.sqlalchemy import SQLAlchemyStore

pytestmark = pytest.mark.anyio

TABLES = ("v2_events", "v2_groups")


@dataclass
class Database:
    """One isolated history location: a SQLite file, or a table prefix in PostgreSQL."""

    kind: str
    tmp_path: Path
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:12]}")
    created: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.created.append(self.prefix)

    @property
    def url(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite+aiosqlite:///{self.tmp_path / self.prefix}.db"
        return PG_URL

    def store(self, **kwargs: Any) -> SQLAlchemyStore:
        return SQLAlchemyStore(self.url, table_prefix=self.prefix, **kwargs)

    def other(self) -> Database:
        """Return a fresh, empty location that is cleaned up with this one."""
        fresh = Database(self.kind, self.tmp_path, created=self.created)
        return fresh


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(request.param, tmp_path)
    yield db
    if db.kind == "postgresql":
        await drop_tables(db.created)


async def drop_tables(prefixes: list[str]) -> None:
    engine = create_async_engine(PG_URL)
    try:
        with anyio.fail_after(10):
            async with engine.begin() as conn:
                for prefix in prefixes:
                    for table in TABLES:
                        await conn.execute(text(f'DROP TABLE IF EXISTS "{prefix}_{table}"'))
    finally:
        await engine.dispose()


@asynccontextmanager
async def connected(store: SQLAlchemyStore) -> AsyncIterator[SQLAlchemyStore]:
    with anyio.fail_after(10):
        await store.connect()
    try:
        yield store
    finally:
        with anyio.fail_after(10):
            await store.disconnect()


class Recorder:
    """A `deliver` callback that records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bytes]] = []

    async def __call__(self, seq: int, wire: bytes) -> None:
        self.calls.append((seq, wire))

    @property
    def seqs(self) -> list[int]:
        return [seq for seq, _ in self.calls]


async def publish(store: SQLAlchemyStore, group: str, data: str) -> int:
    return (await publish_at(store, group, data)).seq


async def publish_at(store: SQLAlchemyStore, group: str, data: str) -> Position:
    with anyio.fail_after(10):
        return await store.append(group, f"data: {data}\n\n".encode(), Recorder())


def wire(epoch: str, seq: int, data: str) -> bytes:
    return id_line(epoch, seq) + f"data: {data}\n\n".encode()


async def read(store: SQLAlchemyStore, group: str, after: int) -> list[tuple[int, bytes]] | None:
    """Read `group` after `after` in its current epoch."""
    with anyio.fail_after(10):
        return await store.read(group, Position((await store.head(group)).epoch, after))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def pg_tables() -> AsyncIterator[list[str]]:
    prefixes: list[str] = []
    yield prefixes
    await drop_tables(prefixes)


async def test_store_each_group_has_its_own_epoch_and_sequence(database: Database) -> None:
    async with connected(database.store()) as store:
        deliver = Recorder()
        positions = []
        for group in ["a", "b", "a", "c", "b"]:
            with anyio.fail_after(10):
                positions.append(await store.append(group, b"data: x\n\n", deliver))
        assert [p.seq for p in positions] == [1, 1, 2, 1, 2]
        epochs = {group: (await store.head(group)).epoch for group in "abc"}
        assert len(set(epochs.values())) == 3
        assert positions[0].epoch == positions[2].epoch == epochs["a"]
        assert deliver.calls == [(p.seq, wire(p.epoch, p.seq, "x")) for p in positions]
        assert deliver.calls[0][1].startswith(f"id: {epochs['a']}-1\n".encode())


async def test_store_head_counts_issued_seqs(database: Database) -> None:
    async with connected(database.store(retention=1)) as store:
        with anyio.fail_after(10):
            empty = await store.head("a")
            assert empty.seq == 0
            assert await store.head("a") == empty  # made once
        for _ in range(3):
            await publish(store, "a", "x")
        with anyio.fail_after(10):
            # Trimming keeps one row, the head still counts every seq issued.
            assert await store.head("a") == Position(empty.epoch, 3)


async def test_store_heads_of_several_groups(database: Database) -> None:
    async with connected(database.store()) as store:
        await publish(store, "a", "x")
        a = await publish_at(store, "a", "x")
        b = await publish_at(store, "b", "y")
        with anyio.fail_after(10):
            heads = await store.heads(["b", "new", "a"])
            assert heads[0] == b
            assert heads[2] == a
            assert heads[1].seq == 0
            assert await store.head("new") == heads[1]  # made once, by heads()


async def test_store_epochs_persist_across_reconnect(database: Database) -> None:
    async with connected(database.store()) as first:
        one = await publish_at(first, "a", "one")
        assert one.seq == 1
    async with connected(database.store()) as second:
        with anyio.fail_after(10):
            assert await second.head("a") == one
            assert await second.read("a", Position(one.epoch, 0)) == [
                (1, wire(one.epoch, 1, "one"))
            ]
        assert await publish_at(second, "a", "two") == Position(one.epoch, 2)
    async with connected(database.other().store()) as fresh:
        with anyio.fail_after(10):
            head = await fresh.head("a")
        assert head.epoch != one.epoch
        assert head.seq == 0


async def test_store_read_returns_later_events_of_its_group(database: Database) -> None:
    async with connected(database.store()) as store:
        published: dict[str, list[tuple[Position, str]]] = {"a": [], "b": [], "c": []}
        for i in range(12):
            group = "abc"[i % 3]
            published[group].append((await publish_at(store, group, f"{group}{i}"), f"{group}{i}"))
        epoch = published["c"][0][0].epoch
        with anyio.fail_after(10):
            got = await store.read("c", Position(epoch, 1))
            nothing = await store.read("c", Position(epoch, 4))
            ahead = await store.read("c", Position(epoch, 5))
            foreign = "00000000" if epoch != "00000000" else "11111111"
            other_epoch = await store.read("c", Position(foreign, 0))
            unknown = await read(store, "nope", 0)
        assert got == [(p.seq, wire(p.epoch, p.seq, d)) for p, d in published["c"][1:]]
        assert [seq for seq, _ in got or []] == [2, 3, 4]
        assert nothing == []
        assert ahead is None
        assert other_epoch is None
        assert unknown == []


async def test_store_keeps_wire_bytes_exactly(database: Database) -> None:
    payload = bytes(range(256)) * 40 + b"\x00\n\r"
    async with connected(database.store()) as store:
        with anyio.fail_after(10):
            position = await store.append("bin", payload, Recorder())
            assert await store.read("bin", Position(position.epoch, 0)) == [
                (1, id_line(position.epoch, 1) + payload)
            ]


async def test_store_count_retention_trims_each_group(database: Database) -> None:
    async with connected(database.store(retention=3)) as store:
        a = [await publish_at(store, "a", f"a{i}") for i in range(5)]
        b = [await publish_at(store, "b", f"b{i}") for i in range(2)]
        with anyio.fail_after(10):
            # a 1 and a 2 were trimmed: a cursor before either is expired.
            assert await read(store, "a", 0) is None
            assert await read(store, "a", 1) is None
            assert await read(store, "a", 2) == [
                (p.seq, wire(p.epoch, p.seq, f"a{i}")) for i, p in enumerate(a) if i >= 2
            ]
            # b was never trimmed, so it still replays from the start.
            assert await read(store, "b", 0) == [
                (p.seq, wire(p.epoch, p.seq, f"b{i}")) for i, p in enumerate(b)
            ]


async def test_store_count_retention_survives_reconnect(database: Database) -> None:
    async with connected(database.store(retention=2)) as store:
        for i in range(4):
            last = await publish_at(store, "a", f"a{i}")
    async with connected(database.store(retention=2)) as store:
        with anyio.fail_after(10):
            assert await read(store, "a", 1) is None
            assert await read(store, "a", 2) == [
                (3, wire(last.epoch, 3, "a2")),
                (4, wire(last.epoch, 4, "a3")),
            ]


async def test_store_age_retention_expires_old_events(database: Database) -> None:
    async with connected(database.store(retention=None, max_age=0.5)) as store:
        old_a = await publish_at(store, "a", "old-a")
        first_b = await publish_at(store, "b", "first-b")
        await anyio.sleep(0.3)
        second_b = await publish_at(store, "b", "second-b")
        await anyio.sleep(0.3)
        with anyio.fail_after(10):
            # Expired but not deleted yet: nothing was appended to a since.
            assert await store.read("a", Position(old_a.epoch, 0)) is None
            assert await store.read("b", Position(first_b.epoch, 0)) is None
            assert await store.read("b", first_b) == [(2, wire(second_b.epoch, 2, "second-b"))]
        third_b = await publish_at(store, "b", "third-b")
        with anyio.fail_after(10):
            # That append deleted b's expired row and marked it trimmed.
            assert await store.read("b", Position(first_b.epoch, 0)) is None
            assert await store.read("b", first_b) == [
                (2, wire(second_b.epoch, 2, "second-b")),
                (3, wire(third_b.epoch, 3, "third-b")),
            ]


async def test_store_deliver_in_seq_order_under_concurrency(database: Database) -> None:
    # Two stores (as two processes would) share one history.
    count = 2
    stores = [database.store() for _ in range(count)]
    delivered: dict[str, list[int]] = {"g0": [], "g1": [], "g2": []}
    returned: list[Position] = []

    def deliver_to(group: str) -> Any:
        async def deliver(seq: int, wire: bytes) -> None:
            await anyio.sleep(random.random() / 200)
            delivered[group].append(seq)

        return deliver

    async def one(store: SQLAlchemyStore, i: int) -> None:
        group = f"g{i % 3}"
        returned.append(await store.append(group, b"data: x\n\n", deliver_to(group)))

    async with AsyncExitStack() as stack:
        for store in stores:
            await stack.enter_async_context(connected(store))
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(60):
                    tg.start_soon(one, stores[i % count], i)
    # Per group: consecutive seqs, delivered in seq order, one epoch.
    assert delivered == {group: list(range(1, 21)) for group in delivered}
    assert sorted(p.seq for p in returned) == sorted(list(range(1, 21)) * 3)
    assert len({p.epoch for p in returned}) == 3


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_store_append_holds_the_lock_until_deliver_returns(
    kind: str, tmp_path: Path, pg_tables: list[str]
) -> None:
    db = Database(kind, tmp_path)
    pg_tables.append(db.prefix)
    # Two stores on one database, as two processes: SQLite's own write lock ends at
    # commit, the history's lock file goes on until the delivery returns.
    first, second = db.store(), db.store()
    events: list[str] = []
    started, release = anyio.Event(), anyio.Event()

    async def slow(seq: int, wire: bytes) -> None:
        events.append(f"deliver {seq} start")
        started.set()
        await release.wait()
        events.append(f"deliver {seq} end")

    async def fast(seq: int, wire: bytes) -> None:
        events.append(f"deliver {seq}")

    async with connected(first), connected(second):
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first.append, "a", b"data: 1\n\n", slow)
                await started.wait()
                tg.start_soon(second.append, "a", b"data: 2\n\n", fast)
                # The second append waits on the first's lock (advisory or file).
                await anyio.sleep(0.3)
                assert events == ["deliver 1 start"]
                release.set()
    assert events == ["deliver 1 start", "deliver 1 end", "deliver 2"]


async def test_store_sqlite_append_cancelled_waiting_for_the_lock_file_leaves_it_free(
    tmp_path: Path,
) -> None:
    db = Database("sqlite", tmp_path)
    first, second = db.store(), db.store()
    started, release = anyio.Event(), anyio.Event()
    delivered: list[int] = []

    async def slow(seq: int, wire: bytes) -> None:
        started.set()
        await release.wait()
        delivered.append(seq)

    async def fast(seq: int, wire: bytes) -> None:
        delivered.append(seq)

    async with connected(first), connected(second):
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first.append, "a", b"data: 1\n\n", slow)
                await started.wait()

                async def release_later() -> None:
                    await anyio.sleep(0.5)
                    release.set()

                tg.start_soon(release_later)
                # Cancelled while another holds the lock: it ends once the lock is
                # taken (the other's append is over), and gives it back.
                with anyio.move_on_after(0.2) as waiting:
                    await second.append("a", b"data: 2\n\n", fast)
                assert waiting.cancelled_caught
            # The cancelled wait gave the lock back: both stores append again.
            await second.append("a", b"data: 2\n\n", fast)
            await first.append("a", b"data: 3\n\n", fast)
    assert delivered == [1, 2, 3]
    assert (tmp_path / f"{db.prefix}.db-sseviews.lock").exists()


async def test_store_sqlite_disconnect_during_an_append_frees_the_lock_file_after_it(
    tmp_path: Path,
) -> None:
    db = Database("sqlite", tmp_path)
    # An engine of the test's own: the store's disconnect() leaves it (and the
    # append's connection) alone, and closes only the lock file.
    engine = create_async_engine(db.url)
    first, second = SQLAlchemyStore(engine, table_prefix=db.prefix), db.store()
    started, release = anyio.Event(), anyio.Event()
    delivered: list[int] = []

    async def slow(seq: int, wire: bytes) -> None:
        started.set()
        await release.wait()
        delivered.append(seq)

    async def fast(seq: int, wire: bytes) -> None:
        delivered.append(seq)

    async with connected(second):
        with anyio.fail_after(20):
            await first.connect()
            async with anyio.create_task_group() as tg:
                tg.start_soon(first.append, "a", b"data: 1\n\n", slow)
                await started.wait()
                await first.disconnect()  # while the append holds the lock
                # Still held until the delivery returns.
                assert second._file_lock is not None
                assert not second._file_lock.try_acquire()
                release.set()
            # The append gave the lock back through its own descriptor, then closed it.
            await second.append("a", b"data: 2\n\n", fast)
    await engine.dispose()
    assert delivered == [1, 2]


async def connect_together(stores: list[SQLAlchemyStore]) -> None:
    """Connect every store at once; they must agree on every group's epoch. All are
    disconnected."""
    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for store in stores:
                    tg.start_soon(store.connect)
            heads: list[Position] = []

            async def head(store: SQLAlchemyStore) -> None:
                heads.append(await store.head("a"))

            async with anyio.create_task_group() as tg:
                for store in stores:
                    tg.start_soon(head, store)
        assert len(set(heads)) == 1
    finally:
        with anyio.fail_after(10):
            for store in stores:
                await store.disconnect()


async def test_store_concurrent_connect_agrees_on_epoch(database: Database) -> None:
    await connect_together([database.store() for _ in range(4)])


@pytest.mark.slow
async def test_store_sqlite_new_file_many_stores_connect_together(tmp_path: Path) -> None:
    # SQLite refuses the switch to WAL at once, without its busy wait, while another
    # connection opens the same new file: a new file, many times, shows it.
    for round_ in range(30):
        url = f"sqlite+aiosqlite:///{tmp_path}/new{round_}.db"
        await connect_together([SQLAlchemyStore(url, retention=10) for _ in range(8)])


async def test_store_postgres_appends_to_two_groups_do_not_wait_for_each_other(
    pg_tables: list[str],
) -> None:
    db = Database("postgresql", Path())
    pg_tables.append(db.prefix)
    first, second = db.store(), db.store()
    started, release = anyio.Event(), anyio.Event()

    async def hold(seq: int, wire: bytes) -> None:
        started.set()
        await release.wait()

    async with connected(first), connected(second):
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first.append, "a", b"data: 1\n\n", hold)
                await started.wait()
                # a's lock (its advisory lock and row) is held: b goes on regardless.
                assert (await second.append("b", b"data: 2\n\n", Recorder())).seq == 1
                assert (await first.append("b", b"data: 3\n\n", Recorder())).seq == 2
                release.set()


async def test_store_unreachable_postgres_raises_backend_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = SQLAlchemyStore(f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/test")
    with anyio.fail_after(10), pytest.raises(BackendError, match="could not connect"):
        await store.connect()
    await store.disconnect()
    assert any(
        r.name == "sseviews.sqlalchemy" and r.levelno == logging.WARNING for r in caplog.records
    )


async def test_store_unreachable_sqlite_raises_backend_error(tmp_path: Path) -> None:
    store = SQLAlchemyStore(f"sqlite+aiosqlite:///{tmp_path}/missing/dir/events.db")
    with anyio.fail_after(10), pytest.raises(BackendError, match="could not connect"):
        await store.connect()
    await store.disconnect()
    # aiosqlite stops the worker thread of a failed connection without waiting for it;
    # if the event loop closed first, that thread would fail.
    for _ in range(200):
        if not any("_connection_worker_thread" in t.name for t in threading.enumerate()):
            break
        await anyio.sleep(0.01)
    else:
        pytest.fail("aiosqlite's worker thread did not stop")


async def test_store_postgres_reconnects_after_connection_loss(pg_tables: list[str]) -> None:
    db = Database("postgresql", Path())
    pg_tables.append(db.prefix)
    async with connected(db.store()) as store:
        before = await publish_at(store, "a", "before")
        assert before.seq == 1
        # Appends run one at a time, so the pool holds exactly the one connection used.
        assert store.engine.pool.checkedin() == 1  # type: ignore[attr-defined]
        async with store.engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await terminate(pid)
        with anyio.fail_after(20):
            try:
                await store.append("a", b"data: during\n\n", Recorder())
            except BackendError:
                pass
            after = await store.append("a", b"data: after\n\n", Recorder())
            rows = await store.read("a", Position(before.epoch, 0))
        assert after.epoch == before.epoch
        assert rows is not None
        assert rows[-1] == (after.seq, id_line(after.epoch, after.seq) + b"data: after\n\n")
        assert [seq for seq, _ in rows] == list(range(1, after.seq + 1))


async def test_store_postgres_connection_lost_while_delivering(
    pg_tables: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    db = Database("postgresql", Path())
    pg_tables.append(db.prefix)
    holders: list[list[int]] = []

    async def kill_own_session(seq: int, wire: bytes) -> None:
        pids = await advisory_holders(store._group_lock_key("a"))
        holders.append(pids)
        for pid in pids:
            await terminate(pid)

    async with connected(db.store()) as store:
        with anyio.fail_after(20):
            # The event was committed before deliver ran, so the append succeeds; the
            # dead session can't be unlocked, but its end freed the lock.
            assert (await store.append("a", b"data: 1\n\n", kill_own_session)).seq == 1
            assert await publish(store, "a", "2") == 2
            assert await advisory_holders(store._group_lock_key("a")) == []
    assert len(holders) == 1
    assert len(holders[0]) == 1
    assert any("broken connection" in r.getMessage() for r in caplog.records)


async def test_store_cancelled_deliver_releases_the_lock(database: Database) -> None:
    async with connected(database.store()) as store:
        with anyio.move_on_after(0.2) as scope:
            await store.append("a", b"data: 1\n\n", lambda seq, wire: anyio.sleep_forever())
        assert scope.cancelled_caught
        assert await publish(store, "a", "2") == 2
        with anyio.fail_after(10):
            assert [seq for seq, _ in await read(store, "a", 0) or []] == [1, 2]


async def test_store_cancelled_while_waiting_for_the_lock(pg_tables: list[str]) -> None:
    db = Database("postgresql", Path())
    pg_tables.append(db.prefix)
    first, second = db.store(), db.store()
    started, release = anyio.Event(), anyio.Event()

    async def hold(seq: int, wire: bytes) -> None:
        started.set()
        await release.wait()

    async with connected(first), connected(second):
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first.append, "a", b"data: 1\n\n", hold)
                await started.wait()
                # Blocked inside PostgreSQL on the advisory lock, then cancelled.
                with anyio.move_on_after(0.3) as scope:
                    await second.append("a", b"data: never\n\n", Recorder())
                assert scope.cancelled_caught
                release.set()
            assert await publish(second, "a", "2") == 2
            assert await publish(first, "a", "3") == 3
            assert await advisory_holders(first._group_lock_key("a")) == []
            rows = await read(first, "a", 0)
        assert [seq for seq, _ in rows or []] == [1, 2, 3]


async def advisory_holders(key: int) -> list[int]:
    unsigned = key & (2**64 - 1)
    engine = create_async_engine(PG_URL)
    try:
        with anyio.fail_after(10):
            async with engine.connect() as conn:
                result = await conn.execute(
                    text(
                        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                        " AND classid::bigint = :high AND objid::bigint = :low"
                        " AND objsubid = 1"
                    ),
                    {"high": unsigned >> 32, "low": unsigned & 0xFFFFFFFF},
                )
                return list(result.scalars())
    finally:
        await engine.dispose()


async def terminate(pid: int) -> None:
    engine = create_async_engine(PG_URL)
    try:
        with anyio.fail_after(10):
            async with engine.connect() as conn:
                killed = await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                assert killed.scalar_one() is True
    finally:
        await engine.dispose()


async def test_store_sqlite_uses_wal(tmp_path: Path) -> None:
    async with connected(SQLAlchemyStore(f"sqlite:///{tmp_path}/events.db")) as store:
        async with store.engine.connect() as conn:
            mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
    assert mode == "wal"


async def test_store_sqlite_relative_path_is_fixed_at_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "app")
    store = SQLAlchemyStore("sqlite+aiosqlite:///events.db")
    monkeypatch.chdir(tmp_path / "elsewhere")
    async with connected(store):
        await publish(store, "a", "x")
    assert (tmp_path / "app" / "events.db").exists()
    assert not (tmp_path / "elsewhere" / "events.db").exists()


async def test_store_accepts_an_engine_and_leaves_it_open(database: Database) -> None:
    engine = create_async_engine(database.url)
    try:
        store = SQLAlchemyStore(engine, table_prefix=database.prefix)
        assert store.engine is engine
        async with connected(store):
            assert await publish(store, "a", "x") == 1
        # The store did not dispose of the caller's pool.
        assert engine.pool.checkedin() >= 1  # type: ignore[attr-defined]
        with anyio.fail_after(10):
            async with engine.connect() as conn:
                table = f"{database.prefix}_v2_events"
                count = (await conn.execute(text(f'SELECT count(*) FROM "{table}"'))).scalar_one()
        assert count == 1
    finally:
        await engine.dispose()


async def test_store_used_before_connect_raises(tmp_path: Path) -> None:
    store = SQLAlchemyStore(f"sqlite+aiosqlite:///{tmp_path}/events.db")
    with pytest.raises(BroadcastNotConnected):
        await store.append("a", b"data: x\n\n", Recorder())
    with pytest.raises(BroadcastNotConnected):
        await store.read("a", Position("00000000", 0))
    with pytest.raises(BroadcastNotConnected):
        await store.head("a")


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("mysql+aiomysql://u@h/db",), {}, ValueError, "sqlite\\+aiosqlite"),
        (("not a url",), {}, ValueError, "database URL"),
        (("sqlite+aiosqlite://",), {}, ValueError, "needs a file"),
        (("sqlite+aiosqlite:///:memory:",), {}, ValueError, "needs a file"),
        (("sqlite:///x.db",), {"table_prefix": "1bad"}, ValueError, "table_prefix"),
        (("sqlite:///x.db",), {"table_prefix": "bad-name"}, ValueError, "table_prefix"),
        (("sqlite:///x.db",), {"table_prefix": "x" * 41}, ValueError, "table_prefix"),
        (("sqlite:///x.db",), {"retention": 0}, ValueError, "retention"),
        (("sqlite:///x.db",), {"retention": None}, ValueError, "bound"),
        (("sqlite:///x.db",), {"max_age": -1}, ValueError, "max_age"),
        (("sqlite+pysqlite:///x.db",), {}, ValueError, "sqlite\\+aiosqlite"),
        (("postgresql+nodriver://u@h/db",), {}, ValueError, "postgresql\\+asyncpg"),
        ((42,), {}, TypeError, "URL or an AsyncEngine"),
    ],
)
def test_store_rejects_bad_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        SQLAlchemyStore(*args, **kwargs)


def test_store_import_sseviews_does_not_import_sqlalchemy() -> None:
    code = "import sys, sseviews; sys.exit('sqlalchemy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), timeout=60)
    assert result.returncode == 0


@pytest.mark.parametrize("url", ["postgres://u@h/db", "postgresql://u@h/db"])
def test_store_url_without_driver_gets_asyncpg(url: str) -> None:
    store = SQLAlchemyStore(url)
    assert store.engine.url.drivername == "postgresql+asyncpg"
    assert store.engine.pool._pre_ping


def test_store_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    with pytest.raises(ImportError, match=r"pip install sseviews\[postgres\]"):
        SQLAlchemyStore("postgresql+psycopg2://u@h/db")


def test_store_engine_property_type(tmp_path: Path) -> None:
    store = SQLAlchemyStore(f"sqlite:///{tmp_path}/x.db")
    assert isinstance(store.engine, AsyncEngine)
    assert store.engine.url.drivername == "sqlite+aiosqlite"
    assert store.engine.url.database == f"{tmp_path}/x.db"


# -- idle groups and a history that went back -------------------------------------------------


async def test_store_idle_groups_are_swept_with_their_epochs(database: Database) -> None:
    async with connected(database.store(retention=1, max_age=0.3)) as store:
        first = await publish_at(store, "g0", "x")
        for n in range(1, 300):
            await publish(store, f"g{n}", "x")
        await publish(store, "g0", "y")  # trims g0: it has a mark
        with anyio.fail_after(10):
            while True:
                async with store.engine.connect() as conn:
                    rows = (
                        await conn.execute(
                            text(f"SELECT count(*) FROM {database.prefix}_v2_events")
                        )
                    ).scalar()
                    groups = (
                        await conn.execute(
                            text(f"SELECT count(*) FROM {database.prefix}_v2_groups")
                        )
                    ).scalar()
                if rows == 0 and groups == 0:
                    break
                await anyio.sleep(0.1)
            # A client resuming into an expired group gets the reset (None), never [].
            assert await store.read("g0", first) is None
            assert await store.read("g0", Position(first.epoch, 0)) is None
            # Its next use starts a new epoch.
            assert (await store.head("g0")).epoch != first.epoch


async def test_store_that_went_back_starts_a_new_epoch(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async with connected(database.store()) as store:
        issued = {await publish_at(store, "a", str(n)) for n in range(5)}
        other = await publish_at(store, "b", "b")
        (epoch,) = {p.epoch for p in issued}
        async with store.engine.begin() as conn:
            # A restored backup: a's counter is back at 2.
            await conn.execute(
                text(f"UPDATE {database.prefix}_v2_groups SET seq = 2 WHERE grp = 'a'")
            )
        with caplog.at_level(logging.WARNING, logger="sseviews.sqlalchemy"):
            after = await publish_at(store, "a", "after")
        assert after.epoch != epoch
        assert after == Position(after.epoch, 1)
        assert after not in issued
        assert any("started a new epoch" in r.getMessage() for r in caplog.records)
        with anyio.fail_after(10):
            # The old epoch's events are not replayed under the new one.
            assert await store.read("a", Position(after.epoch, 0)) == [
                (1, wire(after.epoch, 1, "after"))
            ]
            assert await store.read("a", Position(epoch, 2)) is None
            # Another group is untouched.
            assert await store.head("b") == other
