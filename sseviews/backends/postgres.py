"""A live backend on PostgreSQL LISTEN/NOTIFY: a process listens to the channels of its groups.

With it, PostgreSQL is the only server an app needs: `Broadcast("postgresql+asyncpg://...")`
delivers live events with this backend and keeps the history in SQL tables of the
same database (`sseviews.stores.sqlalchemy`).

Each group has a channel of its own (`channel_name`): `{prefix}:{group}` when that
fits PostgreSQL's 63-byte identifiers, else `{prefix}#` and a hash of the group.
Each notification carries `{seq} {group}` first, so a listener drops a
notification of another group that shares its channel (a hash collision, never
seen in practice). What follows is the event itself (`\\n` then the wire), or, for
an event too large for a NOTIFY payload (8000 bytes) or not valid text, ` {id}`:
the id of a row of the table `{prefix}_live_payloads` that holds it. A listener
fetches the rows a burst of notifications refers to with one query, and
dispatches the burst in the order it arrived. Rows older than `payload_ttl` are
deleted by every process now and then.

A backend holds one listening connection of its own, opened with `listen_url`
(PostgreSQL itself: a pooler in transaction mode cannot LISTEN), and a small pool
of publishing connections opened with the main URL. It LISTENs to a group's
channel while a subscription of this process uses the group (`subscribe`), and
for `unsubscribe_linger` seconds after the last one left. One writer task sends
what was asked while its previous command ran as one query of many `LISTEN` and
`UNLISTEN` statements. When the listening connection is lost the backend calls
`on_failure`, then reconnects with backoff and listens again to the groups still
in use.

Presence lives in two tables: `{prefix}_presence` (group, member, process,
entry) and `{prefix}_presence_processes` (process -> the time its entries expire).
A join or leave is one transaction that also sends its announcements (delivered
at commit). Each process refreshes its own deadline with one heartbeat task;
any process that finds another's deadline passed deletes that process's members
and announces their leave, so the members of a killed process vanish within
`presence_timeout`.

Order per group: the history store assigns a group's ids one at a time and holds
that serialisation until `deliver` returns, and `deliver`'s NOTIFY is committed
before it returns. So the NOTIFY of event N commits before the one of N+1 is
sent, by any process; PostgreSQL delivers notifications in commit order; and the
listener dispatches them in the order received.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
from base64 import b32encode
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import anyio
import asyncpg

from .._exceptions import BackendError
from .._presence import JOIN_EVENT, LEAVE_EVENT
from ._channels import Channels, Send
from ._common import ReconnectingBackend, first_error
from .base import EPHEMERAL_SEQ, Dispatch, OnFailure

__all__ = ["PostgresBackend", "channel_name", "history_url"]

logger = logging.getLogger("sseviews.postgres")

_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
#: Longest channel name PostgreSQL keeps whole (NAMEDATALEN - 1), in bytes.
_MAX_CHANNEL = 63
#: Longest NOTIFY payload PostgreSQL accepts, in bytes.
_MAX_PAYLOAD = 7999
#: The URL query parameter that names the listening connection's URL.
_LISTEN_PARAMETER = "listen_url"
# Errors that mean "PostgreSQL cannot be reached or refused the command".
_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def channel_name(prefix: str, group: str) -> str:
    """Return the NOTIFY channel of `group`: at most 63 bytes, one per group in practice.

    `{prefix}:{group}` when it fits, else `{prefix}#` and 110 bits of the group's
    SHA-256. A prefix holds neither `:` nor `#`, so the two forms never meet.
    """
    plain = f"{prefix}:{group}"
    if len(plain.encode()) <= _MAX_CHANNEL:
        return plain
    digest = b32encode(hashlib.sha256(group.encode()).digest()).decode().lower()
    return f"{prefix}#{digest[:22]}"


def _split_url(url: str) -> tuple[str, str | None]:
    """Return `url` without sseviews' `listen_url` query parameter, and that parameter."""
    parts = urlsplit(url)
    kept: list[str] = []
    listen: str | None = None
    for item in parts.query.split("&") if parts.query else []:
        name, _, value = item.partition("=")
        if name == _LISTEN_PARAMETER:
            # unquote, not unquote_plus: the `+` of `postgresql+asyncpg` stays.
            listen = unquote(value)
        else:
            kept.append(item)
    return urlunsplit(parts._replace(query="&".join(kept))), listen


def history_url(url: str) -> str:
    """Return the SQLAlchemy URL of the history that `Broadcast(url)` keeps by default.

    It is the `listen_url` parameter when `url` has one, else `url`: the SQL history
    holds a session-level advisory lock from an event's INSERT until its delivery,
    which only a connection that keeps its session (not a pooler in transaction
    mode) can hold.
    """
    url, listen = _split_url(url)
    return listen if listen is not None else url


def _asyncpg_dsn(url: str, what: str) -> str:
    parts = urlsplit(url)
    scheme, _, driver = parts.scheme.partition("+")
    if scheme not in ("postgresql", "postgres") or driver not in ("", "asyncpg"):
        raise ValueError(
            f"{what} must be a postgresql:// or postgresql+asyncpg:// URL (live delivery "
            f"on PostgreSQL uses asyncpg), got {url!r}"
        )
    return urlunsplit(parts._replace(scheme="postgresql"))


def _describe(dsn: str) -> str:
    parts = urlsplit(dsn)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"PostgreSQL at {host}{port}{parts.path}"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _ListenConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection that hands every notification to `sink`, whatever its channel.

    asyncpg only routes notifications of channels LISTENed with `add_listener`,
    one round trip each; this backend LISTENs to many channels in one query.
    """

    sink: Any = None

    def _process_notification(self, pid: int, channel: str, payload: str) -> None:
        sink = self.sink
        if sink is not None:
            sink(channel, payload)


class _Link:
    """One listening connection, and the notifications it received."""

    __slots__ = ("conn", "inbox", "lost", "received")

    def __init__(self, conn: _ListenConnection) -> None:
        self.conn = conn
        # Notifications not yet dispatched, in arrival order; `received` is set with them.
        self.inbox: list[tuple[str, str]] = []
        self.received = asyncio.Event()
        # Set when asyncpg reports the connection closed.
        self.lost = asyncio.Event()


class PostgresBackend(ReconnectingBackend):
    """Carries events between processes with PostgreSQL LISTEN/NOTIFY, one channel per group.

    Args:
        url: A `postgresql://` or `postgresql+asyncpg://` URL; events are published
            (NOTIFY) through it, which may be a pooler such as pgbouncer. A
            `listen_url=` query parameter (percent-encoded where needed) gives the
            listening connection's URL, as the keyword does.
        listen_url: The URL of the one listening connection: PostgreSQL itself, or a
            pooler in session mode. A pooler in transaction mode cannot LISTEN.
            Defaults to `url`.
        prefix: Prefix of the channel names and of the backend's tables
            (`{prefix}_live_payloads`, `{prefix}_presence`,
            `{prefix}_presence_processes`); use the prefix of the history.
        presence_timeout: Bound, in seconds, on how long the members of a process
            that died without cleaning up stay listed.

    Raises:
        ValueError: A bad URL, prefix or presence_timeout.
    """

    #: Seconds the listening connection waits for its own test notification when it
    #: connects; none arriving means LISTEN does not work there (a pooler).
    listen_check_timeout = 3.0
    #: Seconds between two checks that the listening connection is still alive.
    health_check_interval = 10.0
    #: Seconds a large event's row is kept in `{prefix}_live_payloads` for listeners.
    payload_ttl = 300.0
    #: Most connections of the publishing pool.
    pool_size = 4

    def __init__(
        self,
        url: str,
        *,
        listen_url: str | None = None,
        prefix: str = "sseviews",
        presence_timeout: float = 30.0,
    ) -> None:
        if not isinstance(url, str):
            raise TypeError(f"url must be a str, got {type(url).__name__}")
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise ValueError(
                "prefix must be 1 to 40 letters, digits or underscores, not starting "
                f"with a digit, got {prefix!r}"
            )
        self._init_presence(presence_timeout)
        # Leaves that failed (database down): retried by the heartbeat, or the member
        # would stay listed for as long as this process lives.
        self._unleft: list[str] = []
        url, in_url = _split_url(url)
        if listen_url is not None and in_url is not None:
            raise ValueError("give listen_url either in the URL or as a keyword, not both")
        listen = listen_url if listen_url is not None else in_url
        self.prefix = prefix
        self._dsn = _asyncpg_dsn(url, "url")
        self._listen_dsn = _asyncpg_dsn(listen, "listen_url") if listen else self._dsn
        self._where = _describe(self._listen_dsn)
        self._table = _quote_ident(f"{prefix}_live_payloads")
        self._members = _quote_ident(f"{prefix}_presence")
        self._processes = _quote_ident(f"{prefix}_presence_processes")
        self._pool: asyncpg.Pool | None = None
        self._task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._link: _Link | None = None  # None while disconnected or reconnecting
        self._healthy = False
        # The groups in use, and the channels the listening connection LISTENs to.
        self._channels: Channels[str] = Channels(
            self._channel,
            linger=self.unsubscribe_linger,
            attempt_timeout=self.attempt_timeout,
            where=self._where,
        )

    @property
    def healthy(self) -> bool:
        """False before `connect`, after `disconnect`, and while reconnecting."""
        return self._healthy

    @property
    def listening(self) -> frozenset[str]:
        """The groups the listening connection LISTENs to now (lingering ones included)."""
        return frozenset(self._channels.confirmed) if self._link is not None else frozenset()

    async def connect(self, dispatch: Dispatch, on_failure: OnFailure) -> None:
        """Open the publishing pool and the listening connection, check that LISTEN
        works there, and start calling `dispatch`.

        Raises:
            BackendError: PostgreSQL cannot be reached, or LISTEN does not work on
                the listening connection (a pooler in transaction mode).
            RuntimeError: The backend is already connected.
        """
        if self._task is not None:
            raise RuntimeError("this PostgresBackend is already connected")
        if not callable(getattr(asyncpg.Connection, "_process_notification", None)):
            # The one asyncpg internal this backend relies on (see _ListenConnection).
            raise RuntimeError(
                f"asyncpg {asyncpg.__version__} no longer routes notifications through "
                "Connection._process_notification, which PostgresBackend overrides "
                "(tested with asyncpg 0.32)"
            )
        try:
            with _errors(f"connecting to {_describe(self._dsn)}"):
                async with asyncio.timeout(self.attempt_timeout):
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=1,
                        max_size=self.pool_size,
                        # No named prepared statements: a pooler in transaction mode
                        # may run the next statement on another server connection.
                        statement_cache_size=0,
                        server_settings={"application_name": f"sseviews publish {self.prefix}"},
                    )
                    await self._create_table()
            link = self._link = _Link(await self._open())
        except BaseException:
            await self._close_pool()
            raise
        channels = self._channels
        # Read now: an app (or a test) may change them after construction.
        channels.linger = self.unsubscribe_linger
        channels.attempt_timeout = self.attempt_timeout
        channels.open()
        channels.attach(self._sender(link))
        self._healthy = True
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(
            self._run(link, dispatch, on_failure), name=f"sseviews postgres listener {self.prefix}"
        )
        self._sweeper = loop.create_task(
            self._sweep(), name=f"sseviews postgres payload sweeper {self.prefix}"
        )
        self._heartbeat = loop.create_task(
            self._beat(), name=f"sseviews postgres presence heartbeat {self.prefix}"
        )

    async def disconnect(self) -> None:
        """Stop listening, and close the listening connection and the pool."""
        task, self._task = self._task, None
        sweeper, self._sweeper = self._sweeper, None
        heartbeat, self._heartbeat = self._heartbeat, None
        self._healthy = False
        with anyio.move_on_after(1, shield=True):
            for running in (heartbeat, task, sweeper):
                if running is not None:
                    running.cancel()
                    await asyncio.wait({running})
            if heartbeat is not None and self._pool is not None:
                # Streams still listed (a server stopping) leave now, not at the timeout.
                try:
                    await self._drop_presence()
                except BackendError as exc:
                    logger.warning("removing this process's presence failed: %s", exc)
        link, self._link = self._link, None
        self._channels.close()
        if link is not None:
            link.conn.sink = None
            # A clean goodbye, so the server logs no lost client; bounded.
            with anyio.move_on_after(1, shield=True):
                try:
                    await link.conn.close()
                except _ERRORS as exc:
                    logger.debug("closing the listening connection to %s: %s", self._where, exc)
            link.conn.terminate()
        await self._close_pool()

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with anyio.move_on_after(1, shield=True):
                try:
                    await pool.close()
                except _ERRORS as exc:
                    logger.debug("closing the pool of %s: %s", self._where, exc)
            pool.terminate()

    async def _create_table(self) -> None:
        assert self._pool is not None
        async with self._pool.acquire() as conn, conn.transaction():
            # Two processes starting at once would race on CREATE TABLE IF NOT EXISTS.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self._table)
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._table} ("
                " id bigserial PRIMARY KEY,"
                " created timestamptz NOT NULL DEFAULT now(),"
                " wire bytea NOT NULL);"
                f"CREATE TABLE IF NOT EXISTS {self._processes} ("
                " process text PRIMARY KEY,"
                " expires timestamptz NOT NULL);"
                f"CREATE TABLE IF NOT EXISTS {self._members} ("
                " grp text NOT NULL,"
                " member text NOT NULL,"
                " process text NOT NULL,"
                " entry bytea NOT NULL,"
                " announce boolean NOT NULL,"
                " PRIMARY KEY (grp, member));"
                f"CREATE INDEX IF NOT EXISTS {_quote_ident(self.prefix + '_presence_by_process')}"
                f" ON {self._members} (process, member)"
            )

    # -- publishing --------------------------------------------------------------------

    async def deliver(self, group: str, seq: int, wire: bytes) -> None:
        """NOTIFY the group's channel with the event, or with the id of a row holding it.

        Returns once the NOTIFY is committed.

        Raises:
            BackendError: PostgreSQL cannot be reached.
        """
        pool = self._pool
        if pool is None:
            raise BackendError(f"the backend is not connected to {_describe(self._dsn)}")
        with _errors(f"publishing to {_describe(self._dsn)}"):
            await self._notify(pool, [(group, seq, wire)])

    async def deliver_in_transaction(
        self, connection: Any, group: str, seq: int, wire: bytes
    ) -> None:
        """Queue the event's NOTIFY in the transaction open on `connection` (an asyncpg
        connection to the database this backend listens to): PostgreSQL delivers it
        when that transaction commits, and drops it if it rolls back.

        Raises:
            BackendError: PostgreSQL refused the statement.
        """
        with _errors(f"publishing in a transaction on {_describe(self._listen_dsn)}"):
            await self._notify(connection, [(group, seq, wire)])

    @property
    def listen_dsn(self) -> str:
        """The URL of the database this backend listens to (`postgresql://...`)."""
        return self._listen_dsn

    async def _notify(self, executor: Any, events: Sequence[tuple[str, int, bytes]]) -> None:
        """NOTIFY `events` (group, seq, wire) in order, through `executor` (the pool, or a
        connection in a transaction: then they are sent when it commits)."""
        small: list[tuple[str, str]] = []
        for group, seq, wire in events:
            channel = channel_name(self.prefix, group)
            header = f"{seq} {group}"
            text: str | None
            try:
                text = wire.decode()
            except UnicodeDecodeError:
                text = None
            if (
                text is not None
                and "\0" not in text
                and len(header.encode()) + 1 + len(wire) <= _MAX_PAYLOAD
            ):
                small.append((channel, f"{header}\n{text}"))
                continue
            if small:
                await self._notify_small(executor, small)
                small = []
            # One statement: the row and its NOTIFY commit together.
            await executor.execute(
                f"WITH row AS (INSERT INTO {self._table} (wire) VALUES ($3) RETURNING id) "
                "SELECT pg_notify($1, $2 || ' ' || id) FROM row",
                channel,
                header,
                wire,
            )
        if small:
            await self._notify_small(executor, small)

    @staticmethod
    async def _notify_small(executor: Any, small: list[tuple[str, str]]) -> None:
        if len(small) == 1:
            await executor.execute("SELECT pg_notify($1, $2)", *small[0])
            return
        channels, payloads = zip(*small, strict=True)
        await executor.execute(
            "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) WITH ORDINALITY "
            "AS t(c, p, n) ORDER BY n",
            list(channels),
            list(payloads),
        )

    async def _sweep(self) -> None:
        """Delete the rows of large events older than `payload_ttl`, now and then."""
        while True:
            await anyio.sleep(self.payload_ttl / 4)
            pool = self._pool
            if pool is None:
                return
            try:
                async with asyncio.timeout(self.attempt_timeout):
                    await pool.execute(
                        f"DELETE FROM {self._table} "
                        "WHERE created < now() - make_interval(secs => $1)",
                        self.payload_ttl,
                    )
            except _ERRORS as exc:
                logger.warning("deleting old event rows from %s failed: %s", self._where, exc)

    # -- subscriptions ----------------------------------------------------------------

    async def subscribe(self, groups: Sequence[str]) -> None:
        """LISTEN to the channels of `groups`; return once PostgreSQL ran the LISTEN.

        Raises:
            BackendError: Not connected, or the connection was lost before the LISTEN ran.
        """
        await self._channels.subscribe(groups)

    def unsubscribe(self, groups: Sequence[str]) -> None:
        """UNLISTEN the channels of `groups` after `unsubscribe_linger` seconds, unless
        they are subscribed to again meanwhile."""
        self._channels.unsubscribe(groups)

    def _channel(self, group: str) -> str:
        return channel_name(self.prefix, group)

    def _sender(self, link: _Link) -> Send:
        channels = self._channels

        async def send(subscribe: list[str], unsubscribe: list[str]) -> None:
            # UNLISTENs first: a channel given up by one group and taken by another
            # (two groups may share one) ends up LISTENed.
            statements = [f"UNLISTEN {_quote_ident(channel)}" for channel in unsubscribe]
            statements += [f"LISTEN {_quote_ident(channel)}" for channel in subscribe]
            async with asyncio.timeout(self.attempt_timeout):
                await link.conn.execute(";".join(statements))
            # The query ran: that is PostgreSQL's confirmation.
            for channel in unsubscribe:
                channels.confirmed_by_server(False, channel)
            for channel in subscribe:
                channels.confirmed_by_server(True, channel)

        return send

    def _recovered(self) -> None:
        # Every group in use LISTENs again after a reconnection.
        self._healthy = True
        logger.info("listening again on %s", self._where)

    # -- the listening connection -------------------------------------------------------

    async def _open(self) -> _ListenConnection:
        """Open a listening connection and check that a NOTIFY reaches it."""
        with _errors(f"listening on {self._where}"):
            async with asyncio.timeout(self.attempt_timeout):
                conn: _ListenConnection = await asyncpg.connect(
                    self._listen_dsn,
                    connection_class=_ListenConnection,
                    server_settings={"application_name": f"sseviews listen {self.prefix}"},
                )
        try:
            await self._check_listen(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _check_listen(self, conn: _ListenConnection) -> None:
        """LISTEN to a channel of this connection's own, NOTIFY it from the pool, and
        wait for the notification: a pooler in transaction mode never delivers it."""
        assert self._pool is not None
        probe = f"{self.prefix}#probe{secrets.token_hex(8)}"
        arrived = asyncio.Event()

        def sink(channel: str, payload: str) -> None:
            if channel == probe:
                arrived.set()

        conn.sink = sink
        try:
            with _errors(f"listening on {self._where}"):
                async with asyncio.timeout(self.attempt_timeout):
                    await conn.execute(f"LISTEN {_quote_ident(probe)}")
                    await self._pool.execute("SELECT pg_notify($1, '')", probe)
            try:
                async with asyncio.timeout(self.listen_check_timeout):
                    await arrived.wait()
            except TimeoutError:
                raise BackendError(
                    f"LISTEN does not work on {self._where}: a notification sent to it "
                    f"did not arrive within {self.listen_check_timeout}s. A pooler in "
                    "transaction mode (pgbouncer) cannot LISTEN: give PostgresBackend "
                    "listen_url= (or the URL's listen_url= parameter) pointing at "
                    "PostgreSQL directly, or at a pooler in session mode."
                ) from None
            with _errors(f"listening on {self._where}"):
                async with asyncio.timeout(self.attempt_timeout):
                    await conn.execute(f"UNLISTEN {_quote_ident(probe)}")
        finally:
            conn.sink = None

    async def _run(self, link: _Link, dispatch: Dispatch, on_failure: OnFailure) -> None:
        try:
            while True:
                error = await self._serve(link, dispatch)
                self._healthy = False
                self._link = None
                self._channels.detach()
                link.conn.sink = None
                link.conn.terminate()
                logger.warning(
                    "lost the listening connection to %s (%s); ending live subscribers "
                    "and reconnecting",
                    self._where,
                    error,
                )
                failure = BackendError(f"lost the connection to {self._where}: {error}")
                failure.__cause__ = error
                try:
                    on_failure(failure)
                except Exception:
                    logger.exception("on_failure callback failed")
                link = self._link = _Link(await self._reconnect())
                # The writer LISTENs to every group still in use, then sets healthy.
                self._channels.attach(self._sender(link), self._recovered)
        finally:
            # Cancelled by disconnect(), which closes the connection in use.
            link.conn.sink = None

    async def _serve(self, link: _Link, dispatch: Dispatch) -> BaseException:
        """Read and write on `link` until it fails; return why."""

        def sink(channel: str, payload: str) -> None:
            link.inbox.append((channel, payload))
            link.received.set()

        def closed(conn: object) -> None:
            link.lost.set()

        link.conn.sink = sink
        link.conn.add_termination_listener(closed)
        if link.conn.is_closed():
            link.lost.set()
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(link, dispatch), name="sseviews postgres reader")

        async def check() -> None:
            await link.conn.execute("SELECT 1")

        writer = loop.create_task(
            self._channels.run((self.health_check_interval, check)),
            name="sseviews postgres writer",
        )
        watcher = loop.create_task(link.lost.wait(), name="sseviews postgres watcher")
        error = await first_error(
            {reader, writer, watcher},
            (reader, writer),
            _ERRORS,
            logger,
            f"listening on {self._where}",
        )
        return error or ConnectionError("the connection was closed")

    async def _read(self, link: _Link, dispatch: Dispatch) -> None:
        channels = self._channels
        while True:
            await link.received.wait()
            link.received.clear()
            batch, link.inbox = link.inbox, []
            parsed: list[tuple[str, int, str | None, int | None]] = []
            for channel, payload in batch:
                head, newline, text = payload.partition("\n")
                fields = head.split(" ")
                try:
                    seq = int(fields[0])
                    ref = None if newline else int(fields[2])
                    group = fields[1]
                except (ValueError, IndexError):
                    logger.warning("ignoring a malformed notification on %r", channel)
                    continue
                # Another group of the same channel (a hash collision), or a channel
                # UNLISTENed meanwhile: not for this process.
                if not channels.carries(channel, group):
                    continue
                parsed.append((group, seq, text if newline else None, ref))
            refs = [ref for _, _, _, ref in parsed if ref is not None]
            rows = await self._fetch(refs) if refs else {}
            for group, seq, inline, ref in parsed:
                if ref is None:
                    assert inline is not None
                    wire = inline.encode()
                else:
                    found = rows.get(ref)
                    if found is None:
                        # Gone (older than payload_ttl): end the streams, so clients
                        # resume from the history instead of missing this event.
                        raise ConnectionError(f"the row of event {seq} of {group!r} is gone")
                    wire = found
                try:
                    dispatch(group, seq, wire)
                except Exception:
                    logger.exception("dispatching event %d of %r failed", seq, group)

    async def _fetch(self, refs: list[int]) -> dict[int, bytes]:
        """Return the large events of `refs`, read with one query."""
        pool = self._pool
        if pool is None:
            raise ConnectionError("the backend is disconnected")
        async with asyncio.timeout(self.attempt_timeout):
            rows = await pool.fetch(
                f"SELECT id, wire FROM {self._table} WHERE id = ANY($1::bigint[])", refs
            )
        return {int(row["id"]): bytes(row["wire"]) for row in rows}

    async def _reconnect(self) -> _ListenConnection:
        delay = self.first_retry_delay
        while True:
            await anyio.sleep(delay)
            try:
                return await self._open()
            except BackendError as exc:
                logger.debug("reconnecting to %s failed: %s", self._where, exc)
            except Exception:
                logger.exception("unexpected error reconnecting to %s", self._where)
            delay = min(delay * 2, self.max_retry_delay)

    # -- presence ------------------------------------------------------------------------

    async def presence_join(
        self, member: str, groups: Sequence[str], entry: bytes, announce: bool
    ) -> None:
        """List `member` in `groups` in one transaction (which also announces it)."""
        with self._joining():
            async with self._presence_transaction("joining presence") as conn:
                await self._register(conn)
                await conn.execute(
                    f"INSERT INTO {self._members} (grp, member, process, entry, announce) "
                    "SELECT g, $2, $3, $4, $5 FROM unnest($1::text[]) AS g "
                    "ON CONFLICT (grp, member) DO UPDATE SET process = excluded.process, "
                    "entry = excluded.entry, announce = excluded.announce",
                    list(dict.fromkeys(groups)),  # a row once: ON CONFLICT updates it once
                    member,
                    self._process,
                    entry,
                    announce,
                )
                if announce:
                    wire = _presence_wire(JOIN_EVENT, entry)
                    await self._notify(conn, [(group, EPHEMERAL_SEQ, wire) for group in groups])

    async def presence_leave(
        self, member: str, groups: Sequence[str], entry: bytes, announce: bool
    ) -> None:
        """Remove `member` from its groups in one transaction (which also announces it)."""
        try:
            async with self._presence_transaction("leaving presence") as conn:
                await self._leave(conn, member)
        except BaseException:
            self._unleft.append(member)
            raise
        self._present -= 1

    async def presence_list(self, group: str, limit: int) -> list[bytes]:
        """Return at most `limit` entries of `group`, after removing dead processes'."""
        async with self._presence_transaction("reading presence") as conn:
            await self._sweep_presence(conn)
            rows = await conn.fetch(
                f"SELECT entry FROM {self._members} WHERE grp = $1 LIMIT $2", group, limit
            )
        return [bytes(row["entry"]) for row in rows]

    async def presence_count(self, group: str) -> int:
        """Return the number of members of `group`, after removing dead processes'."""
        async with self._presence_transaction("reading presence") as conn:
            await self._sweep_presence(conn)
            count = await conn.fetchval(
                f"SELECT count(*) FROM {self._members} WHERE grp = $1", group
            )
        return int(count)

    @asynccontextmanager
    async def _presence_transaction(self, doing: str) -> AsyncIterator[Any]:
        pool = self._pool
        if pool is None:
            raise BackendError(f"the backend is not connected to {_describe(self._dsn)}")
        with _errors(f"{doing} on {_describe(self._dsn)}"):
            async with pool.acquire() as conn, conn.transaction():
                yield conn

    async def _register(self, conn: Any) -> bool:
        """Push this process's deadline `presence_timeout * 2/3` ahead; return whether
        its registration was still there (no other process swept it)."""
        # Refreshed every timeout/6: once the deadline passes, the next sweep of any
        # process (at most timeout/6 later) removes the members, within the timeout.
        existed: bool = await conn.fetchval(
            f"INSERT INTO {self._processes} (process, expires) "
            "VALUES ($1, now() + make_interval(secs => $2)) "
            "ON CONFLICT (process) DO UPDATE SET expires = excluded.expires "
            "RETURNING xmax <> 0",
            self._process,
            self.presence_timeout * 2 / 3,
        )
        return existed

    async def _leave(self, conn: Any, member: str) -> None:
        # Gone already when another process swept this one: it announced the leave.
        rows = await conn.fetch(
            f"DELETE FROM {self._members} WHERE member = $1 AND process = $2 "
            "RETURNING grp, entry, announce",
            member,
            self._process,
        )
        await self._announce_leaves(conn, rows)

    async def _announce_leaves(self, conn: Any, rows: Sequence[Any]) -> None:
        leaves = [
            (row["grp"], EPHEMERAL_SEQ, _presence_wire(LEAVE_EVENT, bytes(row["entry"])))
            for row in rows
            if row["announce"]
        ]
        if leaves:
            await self._notify(conn, leaves)

    async def _sweep_presence(self, conn: Any) -> None:
        """Remove the members of processes whose deadline passed, announcing their leave."""
        rows = await conn.fetch(
            f"WITH dead AS (DELETE FROM {self._processes} WHERE expires < now() "
            "RETURNING process) "
            f"DELETE FROM {self._members} m USING dead WHERE m.process = dead.process "
            "RETURNING m.grp, m.entry, m.announce"
        )
        await self._announce_leaves(conn, rows)

    async def _drop_presence(self) -> None:
        """Remove every member of this process (a server stopping), announcing leaves."""
        async with self._presence_transaction("removing this process's presence") as conn:
            rows = await conn.fetch(
                f"DELETE FROM {self._members} WHERE process = $1 RETURNING grp, entry, announce",
                self._process,
            )
            await self._announce_leaves(conn, rows)
            await conn.execute(f"DELETE FROM {self._processes} WHERE process = $1", self._process)

    async def _beat(self) -> None:
        """Refresh this process's deadline and sweep dead processes, every timeout/6."""
        while True:
            try:
                async with (
                    asyncio.timeout(self.attempt_timeout),
                    self._presence_transaction("presence heartbeat") as conn,
                ):
                    while self._unleft:
                        await self._leave(conn, self._unleft[-1])
                        self._unleft.pop()
                        self._present -= 1
                    await self._sweep_presence(conn)
                    if self._present:
                        if not await self._register(conn):
                            logger.warning(
                                "this process missed its presence heartbeats for more than "
                                "%ss: other processes removed its members from presence",
                                self.presence_timeout,
                            )
                    else:
                        await conn.execute(
                            f"DELETE FROM {self._processes} WHERE process = $1 AND NOT EXISTS "
                            f"(SELECT 1 FROM {self._members} WHERE process = $1)",
                            self._process,
                        )
            except (BackendError, TimeoutError) as exc:
                logger.warning("presence heartbeat to %s failed: %s", self._where, exc)
            except Exception:
                logger.exception("presence heartbeat to %s failed", self._where)
            await anyio.sleep(self.presence_timeout / 6)


def _presence_wire(event: str, entry: bytes) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + entry + b"\n\n"


@contextmanager
def _errors(doing: str) -> Iterator[None]:
    """Turn PostgreSQL and connection errors into BackendError, saying what failed."""
    try:
        yield
    except BackendError:
        raise
    except _ERRORS as exc:
        raise BackendError(f"{doing} failed: {exc}") from exc
