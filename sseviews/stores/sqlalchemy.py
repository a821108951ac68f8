"""A durable history in SQL: SQLite through aiosqlite, or PostgreSQL through asyncpg.

Install the extra that matches your database, `sseviews[sqlite]` or `sseviews[postgres]`,
and give `Broadcast` a URL or a store:

    broadcast = Broadcast("redis://localhost:6379/0", history="postgresql+asyncpg://db/app")

PostgreSQL serves any number of processes and machines: appends are serialised by an
advisory lock, so ids and live delivery keep one order everywhere. A SQLite history is
for one process (one `SQLAlchemyStore` instance): appends are serialised by a lock in
that instance only.
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
from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    Index,
    Integer,
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
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, InvalidRequestError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .._exceptions import BackendError, BroadcastNotConnected
from .base import (
    Deliver,
    HistoryStore,
    Page,
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
# The trim row of no group (names are 1 to 200 characters): the mark of every group
# that has none, raised when whole groups are swept or a new epoch starts.
_FLOOR = ""
# Most events in one page of a replay (their sizes are read first, then the page).
_PAGE_ROWS = 1000


class SQLAlchemyStore(HistoryStore):
    """Keeps the history in SQL tables, so it survives restarts and is shared by processes.

    Three tables are created on `connect()`, named after `table_prefix`:
    `<prefix>_meta` (the epoch and the last seq issued), `<prefix>_events` (each event's
    seq, group, creation time and wire bytes, id line included) and `<prefix>_trim`
    (per group, the highest seq removed by retention). A group with no event for
    `max_age` (else `idle_expiry`) seconds is deleted with its mark by a sweep that
    runs between `connect()` and `disconnect()`.

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
        # The highest seq this instance has seen: the head going below it means the
        # database went back (a restored backup, a failover), so a new epoch starts.
        self._high = 0
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
        # A session-level advisory lock, one per history in a database: prefixes differ,
        # keys differ (a rare collision only serialises two histories together).
        digest = hashlib.blake2b(f"sseviews:{table_prefix}".encode(), digest_size=8).digest()
        self._lock_key = int.from_bytes(digest, "big", signed=True)
        self._lock = anyio.Lock()
        self._connected = False

        metadata = MetaData()
        self._meta = Table(
            f"{table_prefix}_meta",
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=False),
            Column("epoch", Text, nullable=False),
            Column("head", BigInteger, nullable=False),
        )
        self._events = Table(
            f"{table_prefix}_events",
            metadata,
            Column("seq", BigInteger, primary_key=True, autoincrement=False),
            Column("grp", Text, nullable=False),
            Column("created", Double, nullable=False),
            Column("wire", LargeBinary, nullable=False),
            Index(f"ix_{table_prefix}_events_grp_seq", "grp", "seq"),
            # Age retention deletes across all groups on every append; without this
            # index each append would scan the whole table.
            Index(f"ix_{table_prefix}_events_created", "created"),
        )
        self._trim = Table(
            f"{table_prefix}_trim",
            metadata,
            Column("grp", Text, primary_key=True),
            Column("upto", BigInteger, nullable=False),
        )
        self._metadata = metadata

    @property
    def engine(self) -> AsyncEngine:
        """The engine this store runs on."""
        return self._engine

    async def connect(self) -> None:
        """Create the tables if needed, and read the epoch (or start one in a new database).

        Raises:
            BackendError: The database cannot be reached.
        """
        insert = postgresql.insert if self._postgres else sqlite.insert
        claim = insert(self._meta).values(id=1, epoch=new_epoch(), head=0)
        async with self._wrap("connect"):
            if not self._postgres and self._owns_engine:
                await self._use_wal()
        async with self._wrap("connect"), self._engine.begin() as conn:
            # Two stores starting together would race in CREATE TABLE.
            if self._postgres:
                await conn.execute(select(func.pg_advisory_xact_lock(self._key())))
            else:
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            await conn.run_sync(self._metadata.create_all)
            await conn.execute(claim.on_conflict_do_nothing(index_elements=["id"]))
            epoch, head = (await conn.execute(select(self._meta.c.epoch, self._meta.c.head))).one()
        self.epoch = epoch
        self._high = int(head)
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

    async def sweep(self) -> int:
        """Delete the groups with no event younger than the idle expiry; return how many.

        Raises:
            BackendError: The database cannot be reached.
        """
        ttl = self.max_age if self.max_age is not None else self.idle_expiry
        if ttl is None:
            return 0
        events, trim = self._events, self._trim
        newest = (
            select(events.c.grp, func.max(events.c.seq).label("last"))
            .group_by(events.c.grp)
            .having(func.max(events.c.created) < time.time() - ttl)
            .subquery()
        )
        async with self._wrap("sweep idle groups"), self._engine.begin() as conn:
            idle = (await conn.execute(select(newest.c.grp, newest.c.last))).all()
            # Marks of groups that hold no event any more (emptied by max_age).
            orphans = (
                await conn.execute(
                    select(trim.c.grp, trim.c.upto).where(
                        trim.c.grp != _FLOOR,
                        ~select(events.c.seq).where(events.c.grp == trim.c.grp).exists(),
                    )
                )
            ).all()
            found = [*idle, *orphans]
            floor = max([int(last) for _, last in found], default=0)
            if not floor:
                return 0
            names = [grp for grp, _ in found]
            for start in range(0, len(names), 500):
                chunk = names[start : start + 500]
                await conn.execute(delete(events).where(events.c.grp.in_(chunk)))
                await conn.execute(delete(trim).where(trim.c.grp.in_(chunk)))
            await self._raise_floor(conn, floor)
        return len(idle)

    async def _raise_floor(self, conn: AsyncConnection, floor: int) -> None:
        trim = self._trim
        insert = postgresql.insert if self._postgres else sqlite.insert
        greatest = func.greatest if self._postgres else func.max
        mark = insert(trim).values(grp=_FLOOR, upto=floor)
        await conn.execute(
            mark.on_conflict_do_update(
                index_elements=["grp"], set_={"upto": greatest(trim.c.upto, mark.excluded.upto)}
            )
        )

    async def append(self, group: str, wire: bytes, deliver: Deliver) -> int:
        """Store one event and return its seq (see `HistoryStore.append`).

        Raises:
            BackendError: The database cannot be reached. An exception raised by
                `deliver` propagates unchanged (the event stays stored).
        """
        self._check_connected()
        # In-process first: a burst of publishes then waits here, not in PostgreSQL with
        # every pooled connection taken.
        async with self._lock:
            async with self._wrap("append an event"):
                conn = await self._engine.connect()
            locked = False
            try:
                async with self._wrap("append an event"), conn.begin():
                    if self._postgres:
                        # Session-level: it outlives the commit, so deliver runs under it.
                        locked = True
                        await conn.execute(select(func.pg_advisory_lock(self._key())))
                    seq, stored = await self._store(conn, group, wire)
                self._high = max(self._high, seq)  # committed: this id is issued
                await deliver(seq, stored)
                return seq
            finally:
                await self._release(conn, locked)

    async def read(self, groups: Sequence[str], after: int) -> list[tuple[int, bytes]] | None:
        """Return the retained events of `groups` after `after` (see `HistoryStore.read`).

        Raises:
            BackendError: The database cannot be reached.
        """
        self._check_connected()
        if not groups:
            return []
        events, trim = self._events, self._trim
        rows = (
            select(events.c.seq, events.c.created, events.c.wire)
            .where(events.c.grp.in_(groups), events.c.seq > after)
            .order_by(events.c.seq)
        )
        trimmed = select(trim.c.grp, trim.c.upto).where(trim.c.grp.in_([*groups, _FLOOR]))
        async with self._wrap("read the history"), self._engine.connect() as conn:
            found = (await conn.execute(rows)).all()
            # Read after the events: a trim committed before that read is seen here, so
            # no event can vanish unnoticed between the two statements.
            marks = {grp: int(upto) for grp, upto in (await conn.execute(trimmed)).all()}
        if self._expired(groups, after, marks, found):
            return None
        return [(seq, bytes(stored)) for seq, _, stored in found]

    async def read_page(
        self, groups: Sequence[str], after: int, upto: int, limit_bytes: int
    ) -> Page | None:
        """Return one page of the events of `groups` in `(after, upto]`, or None if the
        cursor expired (see `HistoryStore.read_page`).

        It reads the sizes of the next events first (`LIMIT`), then the events of
        the page, so it never loads more than about `limit_bytes` of them.

        Raises:
            BackendError: The database cannot be reached.
        """
        self._check_connected()
        if not groups:
            return Page([], upto)
        events, trim = self._events, self._trim
        in_range = (events.c.grp.in_(groups), events.c.seq > after, events.c.seq <= upto)
        sizes = (
            select(events.c.seq, func.length(events.c.wire))
            .where(*in_range)
            .order_by(events.c.seq)
            .limit(_PAGE_ROWS)
        )
        trimmed = select(trim.c.grp, trim.c.upto).where(trim.c.grp.in_([*groups, _FLOOR]))
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
            # Read after the events: a trim committed before that read is seen here, so
            # no event can vanish unnoticed between the two statements.
            marks = {grp: int(mark) for grp, mark in (await conn.execute(trimmed)).all()}
        if self._expired(groups, after, marks, found):
            return None
        return Page([(int(seq), bytes(stored)) for seq, _, stored in found], end)

    def _expired(
        self,
        groups: Sequence[str],
        after: int,
        marks: dict[str, int],
        found: Sequence[Any],
    ) -> bool:
        """Whether a read after `after` lost events: a trim mark (or the store-wide
        floor) above the cursor, or a row expired by age but not deleted yet (its
        group saw no append since). `found` rows are `(seq, created, wire)`."""
        floor = marks.get(_FLOOR, 0)
        if any(marks.get(group, floor) > after for group in groups):
            return True
        if self.max_age is not None and found:
            oldest = time.time() - self.max_age
            return any(created < oldest for _, created, _ in found)
        return False

    async def head(self) -> int:
        """Return the highest seq issued so far.

        Raises:
            BackendError: The database cannot be reached.
        """
        self._check_connected()
        async with self._wrap("read the head"), self._engine.connect() as conn:
            epoch, head = (await conn.execute(select(self._meta.c.epoch, self._meta.c.head))).one()
        if epoch != self.epoch:
            # Another process started a new epoch.
            self.epoch, self._high = epoch, int(head)
        return int(head)

    async def _store(self, conn: AsyncConnection, group: str, wire: bytes) -> tuple[int, bytes]:
        meta, events, trim = self._meta, self._events, self._trim
        # The row lock taken here also serialises publishers inside PostgreSQL.
        bump = (
            update(meta)
            .where(meta.c.id == 1)
            .values(head=meta.c.head + 1)
            .returning(meta.c.head, meta.c.epoch)
        )
        raw_seq, epoch = (await conn.execute(bump)).one()
        seq = int(raw_seq)
        if epoch != self.epoch:
            # Another process started a new epoch.
            self.epoch, self._high = epoch, 0
        elif seq <= self._high:
            seq = await self._renew(conn, seq - 1)
        # self._high moves only once this transaction commits (see append()): a
        # rolled-back append (its connection terminated) issued no id.
        stored = id_line(self.epoch, seq) + wire
        now = time.time()
        await conn.execute(events.insert().values(seq=seq, grp=group, created=now, wire=stored))

        removed: dict[str, int] = {}
        if self.retention is not None:
            cutoff = (
                select(events.c.seq)
                .where(events.c.grp == group)
                .order_by(events.c.seq.desc())
                .limit(1)
                .offset(self.retention)
                .scalar_subquery()
            )
            gone = delete(events).where(events.c.grp == group, events.c.seq <= cutoff)
            for (old,) in await conn.execute(gone.returning(events.c.seq)):
                removed[group] = max(removed.get(group, 0), old)
        if self.max_age is not None:
            gone = delete(events).where(events.c.created < now - self.max_age)
            for grp, old in await conn.execute(gone.returning(events.c.grp, events.c.seq)):
                removed[grp] = max(removed.get(grp, 0), old)
        if removed:
            insert = postgresql.insert if self._postgres else sqlite.insert
            greatest = func.greatest if self._postgres else func.max
            marks = insert(trim).values([{"grp": g, "upto": s} for g, s in removed.items()])
            await conn.execute(
                marks.on_conflict_do_update(
                    index_elements=["grp"],
                    set_={"upto": greatest(trim.c.upto, marks.excluded.upto)},
                )
            )
        return seq, stored

    async def _renew(self, conn: AsyncConnection, head: int) -> int:
        """Start a new epoch after `head` (the database went back); return the next seq.

        The events kept belong to the old epoch, which no client can resume any more.
        """
        meta, events, trim = self._meta, self._events, self._trim
        epoch = new_epoch()
        issued = self._high
        # Above every seq this instance saw, so no row that survived is in the way.
        head = max(head, issued)
        await conn.execute(update(meta).where(meta.c.id == 1).values(epoch=epoch, head=head + 1))
        await conn.execute(delete(events))
        await conn.execute(delete(trim))
        await self._raise_floor(conn, head)
        logger.warning(
            "SQL history %s went back below seq %d, which this process issued (a restored "
            "backup or a failover); started a new epoch %s so that no event id is issued twice",
            self,
            issued,
            epoch,
        )
        self.epoch = epoch
        return head + 1

    async def _release(self, conn: AsyncConnection, locked: bool) -> None:
        """Unlock and return the connection, even when the append was cancelled."""
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(_CLEANUP_SECONDS):
                try:
                    if locked:
                        await conn.rollback()
                        await conn.execute(select(func.pg_advisory_unlock(self._key())))
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

    def _key(self) -> Any:
        return bindparam("lock_key", self._lock_key, type_=BigInteger)

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
