"""A durable history in SQL: SQLite through aiosqlite, or PostgreSQL through asyncpg.

Install the extra that matches your database, `sseviews[sqlite]` or `sseviews[postgres]`,
and give `Broadcast` a URL or a store:

    broadcast = Broadcast("redis://localhost:6379/0", history="postgresql+asyncpg://db/app")

PostgreSQL serves any number of processes and machines: an append takes its group's
lock (an advisory lock per group, held until the event is delivered, and the group's
counter row), so a group's ids and live delivery keep one order everywhere, and
appends to different groups never wait for each other. A SQLite history serves
the processes of one machine: an append holds a lock on the file
`<database>-sseviews.lock` (beside the database) from taking its seq until the
event is delivered, so its ids and live delivery keep one order too; appends to
every group of the file take turns.

The tables are `<prefix>_v2_groups` and `<prefix>_v2_events`: per-group ids came
with new tables, and the tables of sseviews 0.x before them (`<prefix>_meta`,
`<prefix>_events`, `<prefix>_trim`) are neither read nor removed; drop them once
you have upgraded.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    LargeBinary,
    MetaData,
    Table,
    Text,
    bindparam,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, InvalidRequestError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .._exceptions import BackendError, BroadcastNotConnected
from .base import (
    Deliver,
    HistoryStore,
    Page,
    Position,
    SeenPositions,
    Sweeper,
    check_idle_expiry,
    check_retention,
    id_line,
    new_epoch,
    sweep_interval,
)

__all__ = ["SQLAlchemyStore"]

logger = logging.getLogger("sseviews.sqlalchemy")

_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
# The async driver used when a URL names none (`sqlite:///events.db`).
_ASYNC_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}
# Cleanup that must run even when the append was cancelled gets this many seconds.
_CLEANUP_SECONDS = 5.0
# Appends of one PostgreSQL store that may hold a pooled connection at once (each to
# its own group): the others wait in the process, not in the pool.
_MAX_APPENDS = 8
# Most events in one page of a replay (their sizes are read first, then the page).
_PAGE_ROWS = 1000


class SQLAlchemyStore(HistoryStore):
    """Keeps the history in SQL tables, so it survives restarts and is shared by processes.

    Two tables are created on `connect()`, named after `table_prefix`:
    `<prefix>_v2_groups` (per group: its epoch, its last seq, the highest seq removed
    by retention, and when it was last used) and `<prefix>_v2_events` (each event's
    group, seq, creation time and wire bytes, id line included). A group with no
    event for `max_age` (else `idle_expiry`) seconds is deleted, epoch included, by
    a sweep that runs between `connect()` and `disconnect()`.

    Args:
        url_or_engine: A database URL such as `"sqlite+aiosqlite:///events.db"` or
            `"postgresql+asyncpg://user@host/db"` (a URL without a driver gets the async
            one), or an `AsyncEngine` you created and dispose of yourself. A URL's engine
            gets WAL mode on SQLite (replays read while appends write) and pre-ping on
            PostgreSQL (a dropped connection is replaced); an engine is used as it is.
        table_prefix: Prefix of the table names, so several histories share a database.
        retention: Events kept per group, or None for no count bound.
        max_age: Seconds an event is kept, or None for no age bound.
        idle_expiry: Without `max_age`, seconds after its last event that a group
            is deleted (default one day); None keeps idle groups.

    Raises:
        ValueError: The URL is not a SQLite file or PostgreSQL URL with an async driver,
            `table_prefix` is not an identifier of at most 40 characters, or a retention
            bound is not positive (or neither is set).
        TypeError: `url_or_engine` is neither a URL nor an `AsyncEngine`.
        ImportError: The URL's driver is not installed.
    """

    def __init__(
        self,
        url_or_engine: str | URL | AsyncEngine,
        *,
        table_prefix: str = "sseviews",
        retention: int | None = 1000,
        max_age: float | None = None,
        idle_expiry: float | None = 86400.0,
    ) -> None:
        check_retention(retention, max_age)
        check_idle_expiry(idle_expiry)
        self.idle_expiry = idle_expiry
        # Per group, the highest seq this instance issued or saw in its epoch: the
        # group's counter going below it means the database went back (a restored
        # backup, a failover), so a new epoch starts for that group.
        self._seen = SeenPositions()
        self._sweeper: Sweeper | None = None
        if not isinstance(table_prefix, str) or _PREFIX.fullmatch(table_prefix) is None:
            raise ValueError(
                "table_prefix must be letters, digits and underscores, not starting with a "
                f"digit, at most 40 characters; got {table_prefix!r}"
            )
        self.retention = retention
        self.max_age = max_age
        self.table_prefix = table_prefix
        if isinstance(url_or_engine, AsyncEngine):
            self._engine = url_or_engine
            self._owns_engine = False
        elif isinstance(url_or_engine, str | URL):
            self._engine = _create_engine(url_or_engine)
            self._owns_engine = True
        else:
            raise TypeError(
                "SQLAlchemyStore needs a database URL or an AsyncEngine, "
                f"got {type(url_or_engine).__name__}"
            )
        dialect = self._engine.dialect.name
        if dialect not in _ASYNC_DRIVERS:
            raise ValueError(f"SQLAlchemyStore supports SQLite and PostgreSQL, not {dialect!r}")
        self._postgres = dialect == "postgresql"
        self._errors = _database_errors(self._engine)
        self._where = self._engine.url.render_as_string(hide_password=True)
        self._lock = anyio.Lock()  # SQLite: one append at a time in this instance...
        # ...and in every process (and instance) on the file: see _append_slot.
        self._file = None if self._postgres else _sqlite_file(self._engine.url)
        self._file_lock = None if self._file is None else _FileLock(f"{self._file}-sseviews.lock")
        self._claim: _FileLock | None = None  # see _claim_alone
        self._group_locks: dict[str, list[Any]] = {}  # PostgreSQL: [lock, users] per group
        self._appends = anyio.CapacityLimiter(_MAX_APPENDS)
        self._connected = False

        metadata = MetaData()
        self._groups = Table(
            f"{table_prefix}_v2_groups",
            metadata,
            Column("grp", Text, primary_key=True),
            Column("epoch", Text, nullable=False),
            Column("seq", BigInteger, nullable=False),
            Column("trim", BigInteger, nullable=False),
            Column("used", Double, nullable=False),
        )
        self._events = Table(
            f"{table_prefix}_v2_events",
            metadata,
            Column("grp", Text, primary_key=True),
            Column("seq", BigInteger, primary_key=True, autoincrement=False),
            Column("created", Double, nullable=False),
            Column("wire", LargeBinary, nullable=False),
        )
        self._metadata = metadata
        # A session-level advisory lock per history, taken while creating the tables.
        digest = hashlib.blake2b(f"sseviews:{table_prefix}".encode(), digest_size=8).digest()
        self._lock_key = int.from_bytes(digest, "big", signed=True)

    @property
    def engine(self) -> AsyncEngine:
        """The engine this store runs on."""
        return self._engine

    async def connect(self) -> None:
        """Create the tables if needed.

        Raises:
            BackendError: The database cannot be reached.
        """
        async with self._wrap("connect"):
            if not self._postgres and self._owns_engine:
                await self._use_wal()
            if self._file_lock is not None:
                self._file_lock.open()
        async with self._wrap("connect"), self._engine.begin() as conn:
            # Two stores starting together would race in CREATE TABLE.
            if self._postgres:
                await conn.execute(select(func.pg_advisory_xact_lock(self._key(self._lock_key))))
            else:
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            await conn.run_sync(self._metadata.create_all)
        self._connected = True
        ttl = self.max_age if self.max_age is not None else self.idle_expiry
        if ttl is not None and self._sweeper is None:
            self._sweeper = Sweeper(self.sweep, sweep_interval(ttl))
            self._sweeper.start(f"sseviews SQL history sweep {self}")

    async def _use_wal(self) -> None:
        # WAL lets readers (replays) run while an append writes. The mode is kept in
        # the file, so once per store is enough. On a new file SQLite refuses the switch
        # at once, without its busy wait, while another connection opens the file too
        # (2 to 3% of four stores connecting together): try again for up to 5 s.
        deadline = anyio.current_time() + 5
        while True:
            try:
                async with self._engine.connect() as conn:
                    await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                return
            except OperationalError as exc:
                if "locked" not in str(exc) or anyio.current_time() > deadline:
                    raise
            await anyio.sleep(0.01)

    async def disconnect(self) -> None:
        """Close the store's connections (the engine is disposed only if the store made it)."""
        self._connected = False
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            await sweeper.stop()
        if self._owns_engine:
            await self._engine.dispose()
        if self._file_lock is not None:
            self._file_lock.close()
        claim, self._claim = self._claim, None
        if claim is not None:
            claim.close()

    def _claim_alone(self) -> bool:
        """On SQLite, hold a second lock file (`<database>-<prefix>-alone.lock`) until
        `disconnect()`; False when another instance holds it (see
        `HistoryStore._claim_alone`). On PostgreSQL it cannot tell: True."""
        if self._file is None or self._claim is not None:
            return True
        # Per table prefix: two apps may keep their histories in one file.
        claim = _FileLock(f"{self._file}-{self.table_prefix}-alone.lock")
        try:
            claim.open()
            if not claim.try_acquire():
                claim.close()
                return False
        except OSError as exc:
            claim.close()
            logger.warning("SQL history %s: could not open %s: %r", self, claim.path, exc)
            return True
        self._claim = claim
        return True

    async def sweep(self) -> int:
        """Delete the groups with no event younger than the idle expiry; return how many.

        Raises:
            BackendError: The database cannot be reached.
        """
        ttl = self.max_age if self.max_age is not None else self.idle_expiry
        if ttl is None:
            return 0
        groups, events = self._groups, self._events
        gone = delete(groups).where(groups.c.used < time.time() - ttl).returning(groups.c.grp)
        async with self._wrap("sweep idle groups"), self._engine.begin() as conn:
            names = [grp for (grp,) in await conn.execute(gone)]
            for start in range(0, len(names), 500):
                chunk = names[start : start + 500]
                await conn.execute(delete(events).where(events.c.grp.in_(chunk)))
        return len(names)

    @asynccontextmanager
    async def _append_slot(self, group: str) -> AsyncIterator[None]:
        """Serialise this instance's appends: all of them on SQLite, those of one group
        on PostgreSQL (at most `_MAX_APPENDS` at once)."""
        if not self._postgres:
            async with self._lock:
                file_lock = self._file_lock
                if file_lock is None:
                    yield
                    return
                async with self._wrap("lock the history file"):
                    fd = await file_lock.acquire()
                try:
                    yield
                finally:
                    file_lock.release(fd)
            return
        entry = self._group_locks.get(group)
        if entry is None:
            entry = self._group_locks[group] = [anyio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0], self._appends:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._group_locks[group]

    async def append(self, group: str, wire: bytes, deliver: Deliver) -> Position:
        """Store one event and return its position (see `HistoryStore.append`).

        Raises:
            BackendError: The database cannot be reached. An exception raised by
                `deliver` propagates unchanged (the event stays stored).
        """
        self._check_connected()
        # In-process first: a burst of publishes then waits here, not in PostgreSQL with
        # every pooled connection taken.
        async with self._append_slot(group):
            async with self._wrap("append an event"):
                conn = await self._engine.connect()
            locked = None
            try:
                async with self._wrap("append an event"), conn.begin():
                    if self._postgres:
                        # Session-level: it outlives the commit, so deliver runs under it.
                        locked = self._group_lock_key(group)
                        await conn.execute(select(func.pg_advisory_lock(self._key(locked))))
                    position, stored = await self._store(conn, group, wire)
                self._seen.saw(group, position)  # committed: this id is issued
                await deliver(position.seq, stored)
                return position
            finally:
                await self._release(conn, locked)

    async def append_in(
        self, conn: AsyncConnection, group: str, wire: bytes
    ) -> tuple[Position, bytes]:
        """Store one event in the transaction open on `conn` (the caller's); return its
        position and its stored wire bytes.

        Nothing is delivered and nothing commits here: the event exists once the
        caller commits, and never if it rolls back (its seq is then not used, so
        ids keep no gap). On PostgreSQL the group's advisory lock is taken for the
        rest of the transaction: another transaction appending to the group waits
        until this one ends, so a group's ids follow commit order. On SQLite the
        database's write lock, held until the commit, does the same.

        `conn` must be a connection to this store's database (see `same_database`).

        Raises:
            BackendError: The database refused a statement (the caller's transaction
                is then to be rolled back).
        """
        self._check_connected()
        async with self._wrap("append an event in the caller's transaction"):
            if self._postgres:
                key = self._key(self._group_lock_key(group))
                await conn.execute(select(func.pg_advisory_xact_lock(key)))
            return await self._store(conn, group, wire)

    def issued(self, group: str, position: Position) -> None:
        """Record that `position`, appended by `append_in`, was committed."""
        self._seen.saw(group, position)

    def same_database(self, target: Engine | URL | str) -> bool:
        """Whether `target` (a sync `Engine`, such as `AsyncEngine.sync_engine`, or a
        URL) reaches this store's database: the same engine, or the same dialect, host,
        port and database name (the user, the driver and the options may differ)."""
        if target is self._engine.sync_engine:
            return True
        url = target.url if isinstance(target, Engine) else make_url(target)
        return _database_key(url) == _database_key(self._engine.url)

    async def head(self, group: str) -> Position:
        """Return `group`'s epoch and last seq, making its epoch if it has none.

        Raises:
            BackendError: The database cannot be reached.
        """
        self._check_connected()
        groups = self._groups
        query = select(groups.c.epoch, groups.c.seq).where(groups.c.grp == group)
        async with self._wrap("read the head"), self._engine.connect() as conn:
            row = (await conn.execute(query)).one_or_none()
        if row is None:
            insert = postgresql.insert if self._postgres else sqlite.insert
            claim = insert(groups).values(
                grp=group, epoch=new_epoch(), seq=0, trim=0, used=time.time()
            )
            async with self._append_slot(group):
                async with self._wrap("read the head"), self._engine.begin() as conn:
                    await conn.execute(claim.on_conflict_do_nothing(index_elements=["grp"]))
                    row = (await conn.execute(query)).one()
        position = Position(row[0], int(row[1]))
        self._seen.saw(group, position)
        return position

    async def heads(self, groups: Sequence[str]) -> list[Position]:
        """Return the heads of `groups`, in order: one query for the groups that exist.

        Raises:
            BackendError: The database cannot be reached.
        """
        self._check_connected()
        table = self._groups
        found: dict[str, Position] = {}
        for start in range(0, len(groups), 500):
            query = select(table.c.grp, table.c.epoch, table.c.seq).where(
                table.c.grp.in_(groups[start : start + 500])
            )
            async with self._wrap("read the heads"), self._engine.connect() as conn:
                for grp, epoch, seq in await conn.execute(query):
                    found[grp] = Position(epoch, int(seq))
        heads = []
        for group in groups:
            position = found.get(group)
            if position is None:
                position = await self.head(group)  # makes its epoch
            else:
                self._seen.saw(group, position)
            heads.append(position)
        return heads

    async def read(self, group: str, after: Position) -> list[tuple[int, bytes]] | None:
        """Return the retained events of `group` after `after` (see `HistoryStore.read`).

        Raises:
            BackendError: The database cannot be reached.
        """
        self._check_connected()
        events = self._events
        rows = (
            select(events.c.seq, events.c.created, events.c.wire)
            .where(events.c.grp == group, events.c.seq > after.seq)
            .order_by(events.c.seq)
        )
        async with self._wrap("read the history"), self._engine.connect() as conn:
            found = (await conn.execute(rows)).all()
            # Read after the events: a trim or a new epoch committed before that read is
            # seen here, so no event can vanish unnoticed between the two statements.
            resumable = await self._resumable(conn, group, after, found)
        if not resumable:
            return None
        return [(int(seq), bytes(stored)) for seq, _, stored in found]

    async def read_page(
        self, group: str, after: Position, upto: int, limit_bytes: int
    ) -> Page | None:
        """Return one page of the events of `group` in `(after.seq, upto]`, or None if
        the cursor cannot be resumed (see `HistoryStore.read_page`).

        It reads the sizes of the next events first (`LIMIT`), then the events of
        the page, so it never loads more than about `limit_bytes` of them.

        Raises:
            BackendError: The database cannot be reached.
        """
        self._check_connected()
        events = self._events
        in_range = (events.c.grp == group, events.c.seq > after.seq, events.c.seq <= upto)
        sizes = (
            select(events.c.seq, func.length(events.c.wire))
            .where(*in_range)
            .order_by(events.c.seq)
            .limit(_PAGE_ROWS)
        )
        async with self._wrap("read the history"), self._engine.connect() as conn:
            end, size, count = upto, 0, 0
            rows = (await conn.execute(sizes)).all()
            for _, length in rows:
                if size >= limit_bytes:
                    end = int(rows[count - 1][0])
                    break
                size += int(length)
                count += 1
            else:
                if len(rows) == _PAGE_ROWS:
                    end = int(rows[-1][0])
            found: list[Any] = []
            if count:
                page = (
                    select(events.c.seq, events.c.created, events.c.wire)
                    .where(*in_range[:2], events.c.seq <= end)
                    .order_by(events.c.seq)
                )
                found = list((await conn.execute(page)).all())
            # Read after the events: a trim or a new epoch committed before that read is
            # seen here, so no event can vanish unnoticed between the two statements.
            resumable = await self._resumable(conn, group, after, found)
        if not resumable:
            return None
        return Page([(int(seq), bytes(stored)) for seq, _, stored in found], end)

    async def _resumable(
        self, conn: AsyncConnection, group: str, after: Position, found: Sequence[Any]
    ) -> bool:
        """Whether a read after `after` lost nothing: the group is in `after`'s epoch,
        not behind it, with no trim mark above it, and no row of `found`
        (`(seq, created, wire)`) is expired by age but not deleted yet (its group saw
        no append since)."""
        groups = self._groups
        row = (
            await conn.execute(
                select(groups.c.epoch, groups.c.seq, groups.c.trim).where(groups.c.grp == group)
            )
        ).one_or_none()
        if row is None:
            return False
        epoch, seq, trim = row
        if epoch != after.epoch or after.seq > int(seq) or int(trim) > after.seq:
            return False
        if self.max_age is not None and found:
            oldest = time.time() - self.max_age
            return not any(created < oldest for _, created, _ in found)
        return True

    async def _store(
        self, conn: AsyncConnection, group: str, wire: bytes
    ) -> tuple[Position, bytes]:
        groups, events = self._groups, self._events
        insert = postgresql.insert if self._postgres else sqlite.insert
        now = time.time()
        # Takes the group's row lock until commit: appends to one group get
        # consecutive seqs in commit order, and other groups are not touched.
        bump = insert(groups).values(grp=group, epoch=new_epoch(), seq=1, trim=0, used=now)
        bump = bump.on_conflict_do_update(
            index_elements=["grp"], set_={"seq": groups.c.seq + 1, "used": now}
        )
        raw_epoch, raw_seq = (
            await conn.execute(bump.returning(groups.c.epoch, groups.c.seq))
        ).one()
        epoch, seq = str(raw_epoch), int(raw_seq)
        seen = self._seen.get(group)
        if seen is not None and seen.epoch == epoch and seq <= seen.seq:
            epoch, seq = await self._renew(conn, group, seen.seq), 1
        # self._seen moves only once this transaction commits (see append()): a
        # rolled-back append (its connection terminated) issued no id.
        stored = id_line(epoch, seq) + wire
        await conn.execute(events.insert().values(grp=group, seq=seq, created=now, wire=stored))

        # Seqs have no gap: with a count bound, what is trimmed is known.
        trimmed = 0
        if self.retention is not None and seq > self.retention:
            trimmed = seq - self.retention
            await conn.execute(delete(events).where(events.c.grp == group, events.c.seq <= trimmed))
        if self.max_age is not None:
            gone = delete(events).where(
                events.c.grp == group, events.c.created < now - self.max_age
            )
            for (old,) in await conn.execute(gone.returning(events.c.seq)):
                trimmed = max(trimmed, int(old))
        if trimmed:
            greatest = func.greatest if self._postgres else func.max
            await conn.execute(
                update(groups)
                .where(groups.c.grp == group)
                .values(trim=greatest(groups.c.trim, trimmed))
            )
        return Position(epoch, seq), stored

    async def _renew(self, conn: AsyncConnection, group: str, issued: int) -> str:
        """Start a new epoch for `group`, whose counter went below `issued`, a seq this
        instance issued or saw (the database went back); return the epoch.

        The group's events kept belong to the old epoch, which no client can resume
        any more.
        """
        groups, events = self._groups, self._events
        epoch = new_epoch()
        await conn.execute(
            update(groups).where(groups.c.grp == group).values(epoch=epoch, seq=1, trim=0)
        )
        await conn.execute(delete(events).where(events.c.grp == group))
        logger.warning(
            "SQL history %s: group %r went back below seq %d, which this process issued or "
            "saw (a restored backup or a failover); started a new epoch %s for it so that "
            "no event id is issued twice",
            self,
            group,
            issued,
            epoch,
        )
        return epoch

    async def _release(self, conn: AsyncConnection, locked: int | None) -> None:
        """Unlock and return the connection, even when the append was cancelled."""
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(_CLEANUP_SECONDS):
                try:
                    if locked is not None:
                        await conn.rollback()
                        await conn.execute(select(func.pg_advisory_unlock(self._key(locked))))
                        await conn.commit()
                    await conn.close()
                except Exception as exc:
                    logger.warning("SQL history %s: dropping a broken connection: %r", self, exc)
                else:
                    return
            # Closing the session is what frees a lock we could not release.
            with anyio.move_on_after(_CLEANUP_SECONDS):
                try:
                    await conn.invalidate()
                    await conn.close()
                except Exception as exc:
                    logger.warning("SQL history %s: could not close a connection: %r", self, exc)

    def _group_lock_key(self, group: str) -> int:
        # One advisory lock per group of a history: a rare collision of two groups
        # only serialises their appends together.
        digest = hashlib.blake2b(
            f"sseviews:{self.table_prefix}:{group}".encode(), digest_size=8
        ).digest()
        return int.from_bytes(digest, "big", signed=True)

    @staticmethod
    def _key(key: int) -> Any:
        return bindparam("lock_key", key, type_=BigInteger)

    def _check_connected(self) -> None:
        if not self._connected:
            raise BroadcastNotConnected(f"SQL history {self} is not connected: call connect()")

    @asynccontextmanager
    async def _wrap(self, action: str) -> AsyncIterator[None]:
        try:
            yield
        except self._errors as exc:
            logger.warning("SQL history %s could not %s: %r", self, action, exc)
            raise BackendError(f"SQL history {self} could not {action}: {exc}") from exc

    def __str__(self) -> str:
        return f"{self._where} ({self.table_prefix}_*)"


def _database_key(url: URL) -> tuple[str, str | None, int | None, str | None]:
    """What names a database in `url`: its dialect, host, port and database (a
    SQLite file as an absolute path)."""
    backend = url.get_backend_name()
    if backend == "postgres":
        backend = "postgresql"
    database = url.database
    if backend == "sqlite":
        if database and not database.startswith("file:") and database != ":memory:":
            database = os.path.abspath(database)
        return (backend, None, None, database)
    return (backend, url.host or "localhost", url.port or 5432, database)


def _sqlite_file(url: URL) -> str | None:
    """The absolute path of a SQLite database file (None for a database in memory)."""
    database = url.database or ""
    if database.startswith("file:"):
        database = database[5:].split("?", 1)[0]
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        return None
    return os.path.abspath(database)


class _FileLock:
    """An exclusive lock shared by every process (and every open of it) on one machine.

    SQLite releases its write lock at commit, before the event is delivered; this
    lock is held from before the seq is taken until the delivery returns, so two
    processes on one file deliver a group's events in id order. It is `flock` on
    POSIX systems, `msvcrt.locking` on Windows; either is freed by the system when
    the process ends.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        # An append that holds or awaits the lock keeps its descriptor open: closed
        # meanwhile, it is closed once that append is over, so the lock is never
        # released through a descriptor number the system gave to another file.
        self._users = 0
        self._closing: int | None = None

    def open(self) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._users:
            self._closing = fd
        else:
            os.close(fd)

    def _fileno(self) -> int:
        if self._fd is None:
            raise BroadcastNotConnected(f"the lock file {self.path} is not open: call connect()")
        return self._fd

    def try_acquire(self) -> bool:
        return _try_lock(self._fileno())

    async def acquire(self) -> int:
        """Take the lock; return the descriptor to give back to `release`."""
        fd = self._fileno()
        self._users += 1
        try:
            if not _try_lock(fd):
                await _wait_for_lock(fd)
        except BaseException:
            self._done(fd)
            raise
        return fd

    def release(self, fd: int) -> None:
        try:
            _unlock(fd)
        finally:
            self._done(fd)

    def _done(self, fd: int) -> None:
        self._users -= 1
        if not self._users and self._closing == fd:
            self._closing = None
            os.close(fd)


async def _wait_for_lock(fd: int) -> None:
    """Wait until the lock of `fd`, taken by another process or open, is ours."""
    if _flock is None:
        while True:  # Windows: no waiting lock call that the system wakes
            await anyio.sleep(0.001)
            if _try_lock(fd):
                return
    # Wait in a thread, woken by the system when the lock is released. A cancelled
    # wait lasts until the thread has it (one append of the other process), then
    # gives it back.
    taken = False

    def wait() -> None:
        nonlocal taken
        _flock(fd)
        taken = True

    try:
        await anyio.to_thread.run_sync(wait)
    except BaseException:
        if taken:
            _unlock(fd)
        raise


try:
    import fcntl
except ImportError:  # Windows
    import msvcrt

    _flock = None

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]

else:

    def _flock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _create_engine(url: str | URL) -> AsyncEngine:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ValueError(f"history must be a database URL, got {url!r}: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend == "postgres":
        backend = "postgresql"
    if backend not in _ASYNC_DRIVERS:
        raise ValueError(
            "history URL must be 'sqlite+aiosqlite:///path.db' or "
            f"'postgresql+asyncpg://user@host/db', got {parsed.drivername!r}"
        )
    if "+" not in parsed.drivername:
        parsed = parsed.set(drivername=f"{backend}+{_ASYNC_DRIVERS[backend]}")
    options: dict[str, Any] = {}
    if backend == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
            raise ValueError(
                "a SQLite history needs a file, such as 'sqlite+aiosqlite:///events.db'; "
                "for a history in memory leave history unset"
            )
        if not database.startswith("file:"):
            # Resolved now, so the app changing directory later does not move the log.
            parsed = parsed.set(database=os.path.abspath(database))
    else:
        # Notice connections the server dropped (restart, failover) before using them.
        options["pool_pre_ping"] = True
    try:
        engine = create_async_engine(parsed, **options)
    except (ArgumentError, InvalidRequestError) as exc:
        raise ValueError(
            f"history URL {parsed.drivername!r} needs an async driver, such as "
            f"'{backend}+{_ASYNC_DRIVERS[backend]}': {exc}"
        ) from exc
    except ImportError as exc:
        extra = "sqlite" if backend == "sqlite" else "postgres"
        raise ImportError(
            f"history URL {parsed.drivername!r} needs its driver: {exc}; "
            f"install it with `pip install sseviews[{extra}]`"
        ) from exc
    return engine


def _database_errors(engine: AsyncEngine) -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (SQLAlchemyError, OSError, ConnectionError)
    if engine.dialect.driver == "asyncpg":
        # Most asyncpg errors arrive wrapped by SQLAlchemy, but not all (connecting).
        asyncpg = importlib.import_module("asyncpg")
        errors += (asyncpg.PostgresError, asyncpg.InterfaceError)
    return errors
