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

from sseviews import BackendError, BroadcastNotConnected
from sseviews.stores.base import id_line
from sseviews.stores.sqlalchemy import SQLAlchemyStore

pytestmark = pytest.mark.anyio

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
TABLES = ("events", "trim", "meta")


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
    with anyio.fail_after(10):
        return await store.append(group, f"data: {data}\n\n".encode(), Recorder())


def wire(store: SQLAlchemyStore, seq: int, data: str) -> bytes:
    return id_line(store.epoch, seq) + f"data: {data}\n\n".encode()


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


async def test_store_ids_monotonic_across_groups(database: Database) -> None:
    async with connected(database.store()) as store:
        deliver = Recorder()
        seqs = []
        for group in ["a", "b", "a", "c", "b"]:
            with anyio.fail_after(10):
                seqs.append(await store.append(group, b"data: x\n\n", deliver))
        assert seqs == [1, 2, 3, 4, 5]
        assert deliver.calls == [(seq, wire(store, seq, "x")) for seq in seqs]
        assert deliver.calls[0][1].startswith(f"id: {store.epoch}-1\n".encode())


async def test_store_head_counts_issued_seqs(database: Database) -> None:
    async with connected(database.store(retention=1)) as store:
        with anyio.fail_after(10):
            assert await store.head() == 0
        for _ in range(3):
            await publish(store, "a", "x")
        with anyio.fail_after(10):
            # Trimming keeps one row, the head still counts every seq issued.
            assert await store.head() == 3


async def test_store_epoch_persists_across_reconnect(database: Database) -> None:
    async with connected(database.store()) as first:
        epoch = first.epoch
        assert await publish(first, "a", "one") == 1
    async with connected(database.store()) as second:
        assert second.epoch == epoch
        with anyio.fail_after(10):
            assert await second.head() == 1
            assert await second.read(["a"], 0) == [(1, wire(second, 1, "one"))]
        assert await publish(second, "a", "two") == 2
    async with connected(database.other().store()) as fresh:
        assert fresh.epoch != epoch
        with anyio.fail_after(10):
            assert await fresh.head() == 0


async def test_store_read_returns_later_events_of_the_groups(database: Database) -> None:
    async with connected(database.store()) as store:
        published = []
        for i in range(12):
            group = "abc"[i % 3]
            published.append((await publish(store, group, f"{group}{i}"), group, f"{group}{i}"))
        with anyio.fail_after(10):
            got = await store.read(["c", "a"], 4)
            everything = await store.read(["a", "b", "c"], 0)
            nothing = await store.read(["a"], 12)
            unknown = await store.read(["nope"], 0)
            none = await store.read([], 0)
        expected = [(s, wire(store, s, d)) for s, g, d in published if g in "ac" and s > 4]
        assert got == expected
        assert [seq for seq, _ in expected] == [6, 7, 9, 10, 12]
        assert everything == [(s, wire(store, s, d)) for s, _, d in published]
        assert nothing == []
        assert unknown == []
        assert none == []


async def test_store_keeps_wire_bytes_exactly(database: Database) -> None:
    payload = bytes(range(256)) * 40 + b"\x00\n\r"
    async with connected(database.store()) as store:
        with anyio.fail_after(10):
            seq = await store.append("bin", payload, Recorder())
            assert await store.read(["bin"], 0) == [(seq, id_line(store.epoch, seq) + payload)]


async def test_store_count_retention_trims_each_group(database: Database) -> None:
    async with connected(database.store(retention=3)) as store:
        a = [await publish(store, "a", f"a{i}") for i in range(5)]
        b = [await publish(store, "b", f"b{i}") for i in range(2)]
        with anyio.fail_after(10):
            # a[0] and a[1] were trimmed: a cursor before either is expired.
            assert await store.read(["a"], 0) is None
            assert await store.read(["a"], a[0]) is None
            assert await store.read(["a"], a[1]) == [
                (s, wire(store, s, f"a{i}")) for i, s in enumerate(a) if i >= 2
            ]
            # b was never trimmed, so it still replays from the start...
            assert await store.read(["b"], 0) == [
                (s, wire(store, s, f"b{i}")) for i, s in enumerate(b)
            ]
            # ...but recovery is all or nothing across the requested groups.
            assert await store.read(["a", "b"], 0) is None
            assert await store.read(["a", "b"], a[1]) == [
                (s, wire(store, s, d))
                for s, d in [(a[2], "a2"), (a[3], "a3"), (a[4], "a4"), (b[0], "b0"), (b[1], "b1")]
            ]


async def test_store_count_retention_survives_reconnect(database: Database) -> None:
    async with connected(database.store(retention=2)) as store:
        for i in range(4):
            await publish(store, "a", f"a{i}")
    async with connected(database.store(retention=2)) as store:
        with anyio.fail_after(10):
            assert await store.read(["a"], 1) is None
            assert await store.read(["a"], 2) == [
                (3, wire(store, 3, "a2")),
                (4, wire(store, 4, "a3")),
            ]


async def test_store_age_retention_expires_old_events(database: Database) -> None:
    async with connected(database.store(retention=None, max_age=0.5)) as store:
        old_a = await publish(store, "a", "old-a")
        old_b = await publish(store, "b", "old-b")
        with anyio.fail_after(10):
            assert await store.read(["a", "b"], 0) == [
                (old_a, wire(store, old_a, "old-a")),
                (old_b, wire(store, old_b, "old-b")),
            ]
        await anyio.sleep(0.7)
        with anyio.fail_after(10):
            # Expired but not deleted yet: nothing was appended since.
            assert await store.read(["a"], 0) is None
        new_b = await publish(store, "b", "new-b")
        with anyio.fail_after(10):
            # The sweep (or that append) deleted the old rows of every group and
            # marked them trimmed: a, gone as a whole, is covered by the store's floor.
            assert await store.read(["a"], 0) is None
            assert await store.read(["a"], old_b) == []
            assert await store.read(["b"], 0) is None
            assert await store.read(["b"], old_b) == [(new_b, wire(store, new_b, "new-b"))]


async def test_store_deliver_in_seq_order_under_concurrency(database: Database) -> None:
    # PostgreSQL: two stores (as two processes would) share one history.
    count = 2 if database.kind == "postgresql" else 1
    stores = [database.store() for _ in range(count)]
    delivered: list[int] = []
    returned: list[int] = []

    async def deliver(seq: int, wire: bytes) -> None:
        await anyio.sleep(random.random() / 200)
        delivered.append(seq)

    async def one(store: SQLAlchemyStore, i: int) -> None:
        returned.append(await store.append(f"g{i % 3}", b"data: x\n\n", deliver))

    async with AsyncExitStack() as stack:
        for store in stores:
            await stack.enter_async_context(connected(store))
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(one, stores[i % count], i)
    assert sorted(returned) == list(range(1, 51))
    assert delivered == list(range(1, 51))


async def test_store_append_holds_the_lock_until_deliver_returns(pg_tables: list[str]) -> None:
    db = Database("postgresql", Path())
    pg_tables.append(db.prefix)
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
                # The second append waits on the first's advisory lock.
                await anyio.sleep(0.3)
                assert events == ["deliver 1 start"]
                release.set()
    assert events == ["deliver 1 start", "deliver 1 end", "deliver 2"]


async def connect_together(stores: list[SQLAlchemyStore]) -> None:
    """Connect every store at once; they must agree on one epoch. All are disconnected."""
    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for store in stores:
                    tg.start_soon(store.connect)
        assert len({store.epoch for store in stores}) == 1
    finally:
        with anyio.fail_after(10):
            for store in stores:
                await store.disconnect()


async def test_store_concurrent_connect_agrees_on_epoch(database: Database) -> None:
    await connect_together([database.store() for _ in range(4)])


async def test_store_sqlite_new_file_many_stores_connect_together(tmp_path: Path) -> None:
    # SQLite refuses the switch to WAL at once, without its busy wait, while another
    # connection opens the same new file: a new file, many times, shows it.
    for round_ in range(30):
        url = f"sqlite+aiosqlite:///{tmp_path}/new{round_}.db"
        await connect_together([SQLAlchemyStore(url, retention=10) for _ in range(8)])


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
        assert await publish(store, "a", "before") == 1
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
            rows = await store.read(["a"], 0)
        assert rows is not None
        assert rows[-1] == (after, id_line(store.epoch, after) + b"data: after\n\n")
        assert [seq for seq, _ in rows] == list(range(1, after + 1))


async def test_store_postgres_connection_lost_while_delivering(
    pg_tables: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    db = Database("postgresql", Path())
    pg_tables.append(db.prefix)
    holders: list[list[int]] = []

    async def kill_own_session(seq: int, wire: bytes) -> None:
        pids = await advisory_holders(store._lock_key)
        holders.append(pids)
        for pid in pids:
            await terminate(pid)

    async with connected(db.store()) as store:
        with anyio.fail_after(20):
            # The event was committed before deliver ran, so the append succeeds; the
            # dead session can't be unlocked, but its end freed the lock.
            assert await store.append("a", b"data: 1\n\n", kill_own_session) == 1
            assert await publish(store, "a", "2") == 2
            assert await advisory_holders(store._lock_key) == []
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
            assert [seq for seq, _ in await store.read(["a"], 0) or []] == [1, 2]


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
            assert await advisory_holders(first._lock_key) == []
            rows = await first.read(["a"], 0)
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
                table = f"{database.prefix}_events"
                count = (await conn.execute(text(f'SELECT count(*) FROM "{table}"'))).scalar_one()
        assert count == 1
    finally:
        await engine.dispose()


async def test_store_used_before_connect_raises(tmp_path: Path) -> None:
    store = SQLAlchemyStore(f"sqlite+aiosqlite:///{tmp_path}/events.db")
    with pytest.raises(BroadcastNotConnected):
        await store.append("a", b"data: x\n\n", Recorder())
    with pytest.raises(BroadcastNotConnected):
        await store.read(["a"], 0)
    with pytest.raises(BroadcastNotConnected):
        await store.head()


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


async def test_store_idle_groups_are_swept_with_their_marks(database: Database) -> None:
    async with connected(database.store(retention=1, max_age=0.3)) as store:
        first = await publish(store, "g0", "x")
        for n in range(1, 300):
            await publish(store, f"g{n}", "x")
        await publish(store, "g0", "y")  # trims g0: it has a mark
        with anyio.fail_after(10):
            while True:
                async with store.engine.connect() as conn:
                    rows = (
                        await conn.execute(text(f"SELECT count(*) FROM {database.prefix}_events"))
                    ).scalar()
                    marks = (
                        (await conn.execute(text(f"SELECT grp FROM {database.prefix}_trim")))
                        .scalars()
                        .all()
                    )
                if rows == 0 and marks == [""]:
                    break
                await anyio.sleep(0.1)
            # A client resuming into an expired group gets the reset (None), never [].
            assert await store.read(["g0"], first) is None
            assert await store.read(["g7"], first) is None


async def test_store_that_went_back_starts_a_new_epoch(database: Database) -> None:
    async with connected(database.store()) as store:
        issued = {(store.epoch, await publish(store, "a", str(n))) for n in range(5)}
        epoch = store.epoch
        async with store.engine.begin() as conn:
            # A restored backup: the head is back at 2.
            await conn.execute(text(f"UPDATE {database.prefix}_meta SET head = 2"))
        seq = await publish(store, "a", "after")
        assert store.epoch != epoch
        assert (store.epoch, seq) not in issued
        with anyio.fail_after(10):
            # The old epoch's events are not replayed under the new one.
            assert await store.read(["a"], seq - 1) == [(seq, wire(store, seq, "after"))]
            assert await store.read(["a"], 0) is None
