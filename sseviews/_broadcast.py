"""`Broadcast`: groups, event ids, replay, and fan-out to this process's subscribers.

A broadcast pairs a live backend (memory, Redis or PostgreSQL), which carries each
published event to every process that serves its group, with a history store
(memory, Redis or SQL), which assigns ids per group (the group's epoch and its
next seq) and keeps recent events per group.

Each process keeps a hub: group name -> the subscriptions of that group in this
process (one per open stream that joined it). A publish received by this process
becomes one `Delivery`, offered synchronously to each subscription: the
subscription keeps a reference to the shared bytes and wakes its stream. It never
writes to a stream; the stream's own task does that.

A process receives only the events of the groups in its hub: the live backend
subscribes to a group when a subscription first uses it (`LiveBackend.subscribe`)
and lets it go when the last one leaves (`LiveBackend.unsubscribe`).

Resuming is gap-free, per group: a sink is registered (live events are held back),
and the backend has confirmed that its groups' live events reach this process,
before the groups' heads are read; the replay covers each group's history from
its position up to its head, group after group, and the live events above the
heads wait until the replay is sent. The replay is read a page at a time, as the
stream's writer sends it, so a resume holds one page of history at most.

Live events may arrive out of id order when one system assigns the ids and another
delivers them (a history shared by processes, delivery through Redis): a stored
event beyond the next seq its group's stream expects shows a hole. The
subscription then holds the live events and reads the hole from the history, as
a replay, and goes on live dropping the late copies; a hole the history no longer
holds gets the reset event. Nothing is skipped silently.

A stream of one group sends the ids the store gave, in the shared wire bytes. A
stream of several groups sends composite ids, every group's position in the
order of the group names (`<e1>-<s1>.<e2>-<s2>...`): its subscription rewrites
each event's `id:` line.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import sys
import unicodedata
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel

from ._events import Event, event_from_wire
from ._exceptions import (
    BackendError,
    BroadcastNotConnected,
    SlowConsumer,
)
from ._presence import DEFAULT_PRESENCE_LIMIT, PresenceEntry, entry_from_json
from ._reserved import RESET_EVENT
from ._runtime import Waiter, current_runtime
from .backends.base import EPHEMERAL_SEQ, GroupsLost, LiveBackend
from .stores.base import (
    MAX_CURSOR_GROUPS,
    HistoryStore,
    Page,
    Position,
    check_idle_expiry,
    format_cursor,
    format_id,
    parse_cursor,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    from ._txn import Transactions

__all__ = [
    "RESET_EVENT",
    "Broadcast",
    "Delivery",
    "Subscription",
    "check_group",
    "claim_unconnected_report",
    "new_member_id",
    "open_subscription",
    "was_connected",
]

logger = logging.getLogger("sseviews")

#: Longest group name accepted, in characters.
MAX_GROUP_LENGTH = 200
#: The default bytes of history a resuming subscription reads at a time.
REPLAY_PAGE_BYTES = 256 * 1024


def check_group(group: object) -> str:
    """Return `group` if it is a valid group name.

    Raises:
        TypeError: `group` is not a str.
        ValueError: It is empty, longer than 200 characters, contains whitespace
            or control characters, or U+FFFD (what invalid UTF-8 decodes to).
    """
    if not isinstance(group, str):
        raise TypeError(f"a group name must be a str, got {type(group).__name__}")
    if not group or len(group) > MAX_GROUP_LENGTH:
        raise ValueError(f"a group name must be 1 to {MAX_GROUP_LENGTH} characters, got {group!r}")
    if "\ufffd" in group:
        # What servers decode invalid UTF-8 (%ff) into: %ff and %fe would share a group.
        raise ValueError(f"a group name must be valid UTF-8 text, got {group!r}")
    for char in group:
        if char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            raise ValueError(
                f"a group name must not contain whitespace or control characters: {group!r}"
            )
    return group


class _Lane:
    """One group of a subscription: its position in the stream, and its replay."""

    __slots__ = ("cursor", "epoch", "floor", "group", "seq", "upto")

    def __init__(self, group: str, epoch: bytes, seq: int) -> None:
        self.group = group
        #: The group's epoch, as in the `id:` lines (b"" until known).
        self.epoch = epoch
        #: The seq of the group's last event queued to the stream (its position).
        self.seq = seq
        #: A live event of `epoch` at or below it is a duplicate.
        self.floor = seq
        #: The replay has read up to `cursor` and goes on to `upto` (the head).
        self.cursor = seq
        self.upto = seq

    def move_to(self, head: Position) -> None:
        self.epoch = head.epoch.encode()
        self.seq = self.floor = self.cursor = self.upto = head.seq


class Attachment:
    """What a sink starts from: its groups' lanes (sorted by name), and the reset
    event it must send first, if its cursor cannot be resumed."""

    __slots__ = ("lanes", "reset")

    def __init__(self, lanes: list[_Lane], reset: Event | None = None) -> None:
        self.lanes = lanes
        self.reset = reset


#: The URL schemes that select PostgreSQL as the live layer (and, by default, history).
_POSTGRES_SCHEMES = ("postgresql", "postgresql+asyncpg", "postgres", "postgres+asyncpg")
# URL schemes of the Redis backend and store (plain, TLS, unix socket, Sentinel).
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
# URL schemes of a Redis Cluster (the cluster backend, and the store).
_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
_URL_EXAMPLES = (
    "memory://, redis://host:port/db, postgresql+asyncpg://user@host:port/db, "
    "redis+sentinel://host:port[,host:port...]/service[/db] "
    "or redis+cluster://host:port[,host:port...]/"
)


def _scheme(url: str) -> str:
    # urlsplit refuses some URLs (an unbalanced IPv6 bracket) that the scheme's own
    # parser reports better.
    try:
        return urlsplit(url).scheme
    except ValueError:
        return url.partition(":")[0].lower()


def _backend_for(url: str, prefix: str) -> LiveBackend:
    scheme = _scheme(url)
    if scheme == "memory":
        from .backends.memory import MemoryBackend

        return MemoryBackend()
    if scheme in _REDIS_SCHEMES:
        from .backends.redis import RedisBackend

        return RedisBackend(url, prefix=prefix)
    if scheme in _CLUSTER_SCHEMES:
        from .backends.redis_cluster import RedisClusterBackend

        return RedisClusterBackend(url, prefix=prefix)
    if scheme.split("+")[0] in ("postgresql", "postgres"):
        # It says what it expects of a URL with another driver (+psycopg).
        from .backends.postgres import PostgresBackend

        return PostgresBackend(url, prefix=prefix)
    raise ValueError(f"unsupported broadcast URL {url!r}: expected {_URL_EXAMPLES}")


def _store_for(
    history: str,
    *,
    prefix: str,
    retention: int | None,
    max_age: float | None,
    idle_expiry: float | None,
    publish: bool,
) -> HistoryStore:
    scheme = _scheme(history)
    if scheme == "memory":
        from .stores.memory import MemoryStore

        return MemoryStore(retention=retention, max_age=max_age, idle_expiry=idle_expiry)
    if scheme in _REDIS_SCHEMES or scheme in _CLUSTER_SCHEMES:
        from .stores.redis import RedisStore

        return RedisStore(
            history,
            prefix=prefix,
            retention=retention,
            max_age=max_age,
            idle_expiry=idle_expiry,
            publish=publish,
        )
    if scheme.split("+")[0] in ("sqlite", "postgresql", "postgres"):
        from .stores.sqlalchemy import SQLAlchemyStore

        return SQLAlchemyStore(
            history,
            table_prefix=prefix,
            retention=retention,
            max_age=max_age,
            idle_expiry=idle_expiry,
        )
    raise ValueError(
        f"unsupported history {history!r}: expected memory://, redis://..., "
        "redis+cluster://..., sqlite+aiosqlite:///file.db or postgresql+asyncpg://..."
    )


def _worker_count() -> int:
    """Guess how many worker processes serve this app (1 when unknown)."""
    counts = [os.environ.get("WEB_CONCURRENCY", "")]
    # uvicorn --workers N and gunicorn -w N run us in a child of the supervisor.
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as file:
            argv = file.read().decode(errors="replace").split("\0")
    except OSError:
        argv = []
    for flag in ("--workers", "-w"):
        if flag in argv[:-1]:
            counts.append(argv[argv.index(flag) + 1])
    counts += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--workers=")]
    found = [int(count) for count in counts if count.isdigit()]
    return max(found, default=1)


class Broadcast:
    """Publish events to groups and subscribe to them, with ids and replay.

    Args:
        url: The live layer: `"memory://"` (one process, no setup),
            `"redis://host:port/db"` (any number of processes and machines),
            `"postgresql+asyncpg://user@host/db"` (LISTEN/NOTIFY, with the history
            in the same database by default: PostgreSQL only; a `listen_url=`
            query parameter names a direct connection when the URL is a pooler),
            `"redis+sentinel://host:port[,host:port...]/service[/db]"` (Redis
            with Sentinel, following its failovers),
            `"redis+cluster://host:port[,host:port...]/"` (Redis Cluster, sharded
            pub/sub: one connection per master), or a `LiveBackend` instance.
        history: Where the replay log lives. By default `memory://` keeps a bounded
            log in memory and `redis://` keeps it in Redis Streams. Give
            `"sqlite+aiosqlite:///events.db"`, `"postgresql+asyncpg://..."` or a
            `HistoryStore` instance for a durable SQL log.
        prefix: Prefix of every Redis key and channel, and of the SQL table names,
            so two apps (or tests) can share one server.
        retention: Events kept per group (default 1000); None for no count bound.
        max_age: Seconds an event is kept; None (default) for no age bound.
        idle_expiry: Without `max_age`, seconds after its last event that a
            group's history and trim mark are removed (default 86400, one day);
            None keeps idle groups forever. With `max_age`, a group goes once
            its last event is `max_age` old. Ignored for a `HistoryStore` instance.
        max_concurrent_replays: How many history reads of resuming streams run at
            once in this process (default 16); the others wait their turn, so a
            burst of resumes cannot starve live delivery.
        replay_page_bytes: How much history a resuming stream reads at a time
            (default 256 KiB): it reads the next page once it has sent this one.

    Connect it in the app's lifespan with `async with broadcast:`.
    """

    def __init__(
        self,
        url: str | LiveBackend = "memory://",
        *,
        history: str | HistoryStore | None = None,
        prefix: str = "sseviews",
        retention: int | None = 1000,
        max_age: float | None = None,
        idle_expiry: float | None = 86400.0,
        max_concurrent_replays: int = 16,
        replay_page_bytes: int = REPLAY_PAGE_BYTES,
    ) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty str, got {prefix!r}")
        check_idle_expiry(idle_expiry)
        for name, value in (
            ("max_concurrent_replays", max_concurrent_replays),
            ("replay_page_bytes", replay_page_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.max_concurrent_replays = max_concurrent_replays
        self.replay_page_bytes = replay_page_bytes
        # Made by connect(), in the event loop that serves the streams.
        self._replays: anyio.CapacityLimiter | None = None
        # The history reads under way, by group, position and end: see _read_page.
        self._reads: dict[tuple[str, str, int, int], _SharedRead] = {}
        if isinstance(url, LiveBackend):
            self.live = url
            url_text = "memory://"
        elif isinstance(url, str):
            self.live = _backend_for(url, prefix)
            url_text = url
        else:
            raise TypeError(f"url must be a URL str or a LiveBackend, got {type(url).__name__}")
        # Redis live + Redis history publish in one atomic script (ids in live order).
        self._fused = False
        if (
            isinstance(history, str)
            and history == url_text
            and _scheme(url_text)
            in (
                *_REDIS_SCHEMES,
                *_CLUSTER_SCHEMES,
            )
        ):
            # The same Redis named twice: the default, fused (else its events could
            # reach other processes out of order, and each disorder costs a read).
            history = None
        if history is None:
            scheme = _scheme(url_text)
            fused = scheme in _REDIS_SCHEMES or scheme in _CLUSTER_SCHEMES
            if scheme in _POSTGRES_SCHEMES:
                from .backends.postgres import history_url

                # The history in the same database, without the live layer's options.
                url_text = history_url(url_text)
            self.store = _store_for(
                url_text,
                prefix=prefix,
                retention=retention,
                max_age=max_age,
                idle_expiry=idle_expiry,
                publish=fused,
            )
            self._fused = fused
        elif isinstance(history, HistoryStore):
            self.store = history
        elif isinstance(history, str):
            self.store = _store_for(
                history,
                prefix=prefix,
                retention=retention,
                max_age=max_age,
                idle_expiry=idle_expiry,
                publish=False,
            )
        else:
            raise TypeError(
                f"history must be a URL str, a HistoryStore or None, got {type(history).__name__}"
            )
        self._hub: dict[str, set[Subscription]] = {}
        self._epochs: dict[bytes, bytes] = {}  # each epoch seen live, as one object
        self._connected = False
        # Publishes in callers' transactions: made by the first one (see _transactions).
        self._txn: Transactions | None = None
        # Presence connection ids: this broadcast's random name, then a counter.
        self._member_ids = map(f"{secrets.token_hex(6)}-{{}}".format, itertools.count(1))
        # A stream of a broadcast never connected means a missing lifespan: views
        # refuse it loudly, and log it once per broadcast (see claim_unconnected_report).
        self._ever_connected = False
        self._reported_unconnected = False
        self._in_process = _scheme(url_text) == "memory" and not isinstance(url, LiveBackend)

    # -- lifecycle --------------------------------------------------------------

    async def connect(self) -> None:
        """Connect the history store and the live backend."""
        self._replays = anyio.CapacityLimiter(self.max_concurrent_replays)
        await self.store.connect()
        try:
            await self.live.connect(self._dispatch, self._fail_all)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.store.disconnect()
            raise
        self._connected = True
        self._ever_connected = True
        if self._sqlite_history():
            # A SQLite append lets go of the database before its event is delivered:
            # made now, the outbox orders every delivery, those of plain publishes
            # already under way when a first transaction publishes included.
            self._transactions()
        if self._in_process:
            self._check_alone()

    def _check_alone(self) -> None:
        """Warn when this in-process broadcast is not alone: events published in other
        processes never reach its streams live."""
        if not self.store._claim_alone():
            # A history shared by processes whose live layers do not meet.
            logger.warning(
                "Broadcast('memory://') with the history %s, which another process (or "
                "broadcast) uses too: events published there reach this process's clients "
                "only when they reconnect or when a later event shows they are missing, "
                "never live. Use redis://host:port/db for the live layer",
                self.store,
            )
            return
        workers = _worker_count()
        if workers > 1:
            logger.warning(
                "Broadcast('memory://') under %d worker processes: each worker has its "
                "own groups and history, so events published in one worker never reach "
                "clients of the others. Use redis://host:port/db or postgresql+asyncpg://...",
                workers,
            )

    async def disconnect(self) -> None:
        """End every subscription and close the backend and the store."""
        self._connected = False
        transactions, self._txn = self._txn, None
        if transactions is not None:
            with anyio.CancelScope(shield=True):
                # Committed events still to deliver go first (for up to a second).
                await transactions.stop()
        self._fail_all(BroadcastNotConnected("the broadcast was closed"))
        with anyio.CancelScope(shield=True):
            try:
                await self.live.disconnect()
            finally:
                await self.store.disconnect()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    @property
    def subscriber_count(self) -> int:
        """Open subscriptions (streams included) in this process, counted per group."""
        return sum(len(sinks) for sinks in self._hub.values())

    def _check_connected(self) -> None:
        if not self._connected:
            raise BroadcastNotConnected(
                "connect the broadcast first: `async with broadcast:` in the app's lifespan"
            )

    # -- publishing -------------------------------------------------------------

    async def publish(
        self, group: str, event: Any, *, session: AsyncSession | AsyncConnection | None = None
    ) -> str:
        """Publish an event (or data for an unnamed event) to `group`; return its id.

        Args:
            group: The group name.
            event: An `Event` without an id, or the data of an unnamed event.
            session: A SQLAlchemy `AsyncSession` (or `AsyncConnection`) on the
                history's database: the event is stored in its transaction, and
                delivered only once that transaction commits (never if it rolls
                back). Until it ends, other transactions publishing to `group`
                wait, so ids follow commit order with no gap. Needs a SQL
                history; see [Transactional publish](transactional-publish.md).

        Raises:
            ValueError: The event already has an id (the broadcast assigns ids), the
                group name is invalid, or `session` is on another database than
                the history (or the history is not SQL).
            TypeError: `session` is not an `AsyncSession` or `AsyncConnection`.
            RuntimeError: Without `session`, a publish that would wait for the
                group's lock held by this task's own open transaction.
            BroadcastNotConnected: The broadcast is not connected.
            BackendError: Redis or the database cannot be reached.
        """
        check_group(group)
        if not isinstance(event, Event):
            event = Event(event)
        elif event.id is not None:
            raise ValueError(
                "publish() assigns event ids itself; build the Event without id= "
                f"(got id={event.id!r})"
            )
        self._check_connected()
        if session is not None:
            position = await self._transactions().publish(group, event.encode(), session)
            return format_id(*position)
        live = self.live
        transactions = self._txn
        if transactions is not None:
            transactions.check_plain(group)

        async def deliver(seq: int, wire: bytes) -> None:
            if self._fused:
                return
            if transactions is not None and transactions.ordered_by_outbox(group):
                # In id order with the events of transactions, which the outbox
                # delivers after their commits.
                position = Position(wire[4:12].decode(), seq)
                await transactions.outbox.deliver_after(group, position, wire)
            else:
                await live.deliver(group, seq, wire)

        # Let the writers run between publishes (a burst must not starve them), before
        # the event is stored: a publish cancelled here has published nothing, and one
        # that stored its event returns its id at once, in the order of the appends.
        await anyio.lowlevel.checkpoint()
        position = await self.store.append(group, event.encode(), deliver)
        return format_id(*position)

    def _sqlite_history(self) -> bool:
        # A store of that module means it was imported: no import (no SQLAlchemy) here.
        module = sys.modules.get("sseviews.stores.sqlalchemy")
        return (
            module is not None
            and isinstance(self.store, module.SQLAlchemyStore)
            and self.store.engine.dialect.name == "sqlite"
        )

    def _transactions(self) -> Transactions:
        transactions = self._txn
        if transactions is None:
            # Not imported means the history is not SQL (and SQLAlchemy may be missing).
            store = self.store
            if "sseviews.stores.sqlalchemy" in sys.modules:
                from .stores.sqlalchemy import SQLAlchemyStore
            if "sseviews.stores.sqlalchemy" not in sys.modules or not isinstance(
                store, SQLAlchemyStore
            ):
                raise ValueError(
                    "publish(session=...) needs a SQL history on the session's database: "
                    "Broadcast('postgresql+asyncpg://...'), or history='postgresql+asyncpg://"
                    "...' or 'sqlite+aiosqlite:///file.db'; this broadcast keeps its history "
                    f"in {type(self.store).__name__}"
                )
            from ._txn import Transactions

            transactions = self._txn = Transactions(self.live, store)
        return transactions

    async def last_id(self, *groups: str) -> str:
        """Return the id of the latest event of `groups`: for one group its last
        event's id (`<epoch>-0` before its first event), for several the composite id
        of their positions. A stream resuming from it replays nothing.

        Raises:
            ValueError: No group, or an invalid group name.
            BroadcastNotConnected: The broadcast is not connected.
            BackendError: The history store cannot be reached.
        """
        if not groups:
            raise ValueError("last_id() needs at least one group")
        for group in groups:
            check_group(group)
        self._check_connected()
        return format_cursor(await self._heads(sorted(dict.fromkeys(groups))))

    async def publish_ephemeral(self, group: str, event: Any) -> None:
        """Send an event (or data) to the streams of `group` now, without storing it.

        The event carries no id, is never replayed, and never moves a client's
        `Last-Event-ID`: for what only matters live ("alice is typing", join and
        leave events).

        Raises:
            ValueError: The event has an id, or the group name is invalid.
            BroadcastNotConnected: The broadcast is not connected.
            BackendError: Redis cannot be reached.
        """
        check_group(group)
        if not isinstance(event, Event):
            event = Event(event)
        elif event.id is not None:
            raise ValueError(f"an ephemeral event carries no id (got id={event.id!r})")
        self._check_connected()
        await self.live.deliver(group, EPHEMERAL_SEQ, event.encode())

    # -- presence ----------------------------------------------------------------

    async def presence(
        self, group: str, *, limit: int = DEFAULT_PRESENCE_LIMIT
    ) -> list[PresenceEntry]:
        """Return the connections present in `group`, in every process, oldest first.

        Args:
            group: The group name.
            limit: Most entries returned (default 1000); `presence_count()` gives
                the total. Which entries a capped list holds is unspecified.

        Raises:
            ValueError: An invalid group name or limit.
            BroadcastNotConnected: The broadcast is not connected.
            BackendError: Redis cannot be reached.
        """
        check_group(group)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r}")
        self._check_connected()
        entries = [entry_from_json(raw) for raw in await self.live.presence_list(group, limit)]
        entries.sort(key=lambda entry: (entry.joined_at, entry.id))
        return entries

    async def presence_count(self, group: str) -> int:
        """Return how many connections are present in `group`, in every process.

        Raises:
            ValueError: An invalid group name.
            BroadcastNotConnected: The broadcast is not connected.
            BackendError: Redis cannot be reached.
        """
        check_group(group)
        self._check_connected()
        return await self.live.presence_count(group)

    # -- local fan-out -----------------------------------------------------------

    def _dispatch(self, group: str, seq: int, wire: bytes) -> None:
        sinks = self._hub.get(group)
        if sinks:
            epoch = b""
            if seq != EPHEMERAL_SEQ:
                # One object per epoch, so subscriptions compare epochs by identity.
                raw = wire[4:12]
                epochs = self._epochs
                epoch = epochs.get(raw, raw)
                if epoch is raw:
                    if len(epochs) >= 4096:
                        epochs.clear()
                    epochs[raw] = raw
            delivery = Delivery(group, seq, wire, epoch)
            for sink in sinks:
                sink.offer(delivery)

    def _fail_all(self, error: BaseException) -> None:
        if isinstance(error, GroupsLost):
            # Only these groups' events may be lost (one shard of a Redis Cluster).
            hub = self._hub
            sinks = {sink for group in error.groups for sink in hub.get(group, ())}
            if sinks:
                logger.warning(
                    "broadcast backend lost %d group(s); ending %d subscription(s) of them: %s",
                    len(error.groups),
                    len(sinks),
                    error,
                )
            for sink in sinks:
                sink.fail(error)
            return
        if self._hub and not isinstance(error, BroadcastNotConnected):
            logger.warning(
                "broadcast backend failed; ending %d subscriber(s): %s",
                self.subscriber_count,
                error,
            )
        sinks = {sink for group in self._hub.values() for sink in group}
        for sink in sinks:
            sink.fail(error)

    def _register(self, sink: Subscription, groups: Sequence[str]) -> None:
        hub = self._hub
        for group in groups:
            members = hub.get(group)
            if members is None:
                members = hub[group] = set()
            members.add(sink)

    def _unregister(self, sink: Subscription, groups: Sequence[str]) -> None:
        hub = self._hub
        unused = []
        for group in groups:
            members = hub.get(group)
            if members is not None:
                members.discard(sink)
                if not members:
                    del hub[group]
                    unused.append(group)
        if unused:
            # No stream of this process is in these groups any more.
            self.live.unsubscribe(unused)

    async def _heads(self, groups: Sequence[str]) -> list[Position]:
        """Read the heads of `groups`, in order (making the epoch of a new group)."""
        return await self.store.heads(groups)

    async def _attach(
        self, sink: Subscription, groups: Sequence[str], last_event_id: str | None
    ) -> Attachment:
        """Register `sink` for `groups` (sorted by name) and work out where it starts.

        The sink must hold back the live events it is offered until it has sent
        its replay (or the reset event), and drop those its lanes cover.

        Raises:
            InvalidLastEventId: A malformed id.
            BackendError: The backend is down.
        """
        self._check_connected()
        if not self.live.healthy:
            raise BackendError("the broadcast backend is reconnecting")
        cursor = parse_cursor(last_event_id) if last_event_id is not None else None
        self._register(sink, groups)
        try:
            # The live events of the groups reach this process before their heads
            # are read: the replay and the live events meet without a gap. Returns
            # at once for groups that other streams of this process use already.
            await self.live.subscribe(groups)
            if cursor is None and len(groups) == 1:
                # Live only: the ids are the store's, nothing to read.
                return Attachment([_Lane(groups[0], b"", 0)])
            heads = await self._heads(groups)
            lanes = [
                _Lane(group, head.epoch.encode(), head.seq)
                for group, head in zip(groups, heads, strict=True)
            ]
            if cursor is None:
                return Attachment(lanes)
            # The groups that cannot resume start at their heads, behind the reset
            # event; the others resume exactly after their own positions.
            reset: dict[str, str] = {}
            if len(cursor) != len(groups):
                # Not an id of a stream of these groups (or of the previous format).
                reset = dict.fromkeys(groups, "unknown_epoch")
            else:
                for lane, head, position in zip(lanes, heads, cursor, strict=True):
                    if position.epoch != head.epoch:
                        reset[lane.group] = "unknown_epoch"
                    elif position.seq > head.seq:
                        # An id of this epoch that was never issued here: the history
                        # lost events (a restored snapshot, a failover). A 400 would
                        # stop EventSource for good; the reset lets it reload and go on.
                        reset[lane.group] = "ahead"
                    else:
                        lane.seq = lane.cursor = position.seq
            if reset:
                return Attachment(lanes, self._reset_event(lanes, reset))
            return Attachment(lanes)
        except BaseException:
            self._unregister(sink, groups)
            raise

    async def _read_page(
        self, borrower: object, group: str, after: Position, upto: int
    ) -> Page | None:
        """Read one page of a group's replay, in a slot of this broadcast's replay limiter.

        Raises:
            BackendError: The store cannot be reached.
            BroadcastNotConnected: The broadcast is not connected.
        """
        limiter = self._replays
        if limiter is None:
            raise BroadcastNotConnected("the broadcast is not connected")
        # Every stream of a group that receives the same event early reads the same
        # hole, and clients resuming together the same pages: one read serves them.
        key = (group, after.epoch, after.seq, upto)
        shared = self._reads.get(key)
        if shared is not None:
            await shared.done.wait()
            if shared.read:
                return shared.page
            # That read failed or was cancelled: this one reads on its own.
        shared = None
        if key not in self._reads:
            shared = self._reads[key] = _SharedRead()
        try:
            await limiter.acquire_on_behalf_of(borrower)
            try:
                page = await self.store.read_page(group, after, upto, self.replay_page_bytes)
            finally:
                limiter.release_on_behalf_of(borrower)
            if shared is not None:
                shared.page, shared.read = page, True
            return page
        finally:
            if shared is not None:
                del self._reads[key]
                shared.done.set()

    def _reset_event(self, lanes: Sequence[_Lane], reset: dict[str, str]) -> Event:
        """The reset event of the groups in `reset` (group -> reason), its id the
        stream's position: those groups at their heads, the others where they stand."""
        head_id = ".".join([f"{lane.epoch.decode()}-{lane.seq}" for lane in lanes])
        reason = next(iter(reset.values()))
        return Event(
            {"reason": reason, "head": head_id, "groups": list(reset)},
            event=RESET_EVENT,
            id=head_id,
        )

    # -- subscribing ---------------------------------------------------------------

    @asynccontextmanager
    async def subscribe(
        self,
        *groups: str,
        last_event_id: str | None = None,
        max_events: int = 1000,
        max_bytes: int = 1024 * 1024,
    ) -> AsyncIterator[Subscription]:
        """Subscribe to `groups`: replay what came after `last_event_id`, then live.

        Args:
            *groups: Group names.
            last_event_id: An id this broadcast issued; replay starts after it.
            max_events: Live events this subscription may hold before it fails
                with `SlowConsumer`.
            max_bytes: Bytes it may hold before it fails with `SlowConsumer`.

        Raises:
            InvalidLastEventId: `last_event_id` is not in the id format of this
                broadcast.
            ValueError: No group, more than 256, or an invalid group name.
            BackendError: The backend is down.
        """
        if not groups:
            raise ValueError("subscribe() needs at least one group")
        for group in groups:
            check_group(group)
        subscription = await open_subscription(
            self, groups, last_event_id, Subscription(max_events=max_events, max_bytes=max_bytes)
        )
        try:
            yield subscription
        finally:
            subscription.close()


class _SharedRead:
    """A read of a page of history that other subscriptions wait for."""

    __slots__ = ("done", "page", "read")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.read = False
        self.page: Page | None = None


class Delivery:
    """One published event as this process received it, shared by all its subscribers.

    The wire bytes go to every stream of one group as they are; the `Event` is
    parsed from them at most once per publish, by the first subscription iterated
    for it.
    """

    __slots__ = ("_event", "epoch", "group", "seq", "wire")

    def __init__(self, group: str, seq: int, wire: bytes, epoch: bytes | None = None) -> None:
        self.group = group
        self.seq = seq
        self.wire = wire
        # The epoch in the wire's `id: <epoch>-<seq>` line (none for an ephemeral event).
        if epoch is None:
            epoch = wire[4:12] if seq != EPHEMERAL_SEQ else b""
        self.epoch = epoch
        self._event: Event | None = None

    def event(self) -> Event:
        event = self._event
        if event is None:
            event = self._event = event_from_wire(self.wire)
        return event


class Subscription:
    """The events of some groups: the replay first, then live. Iterate with `async for`.

    It is the one subscriber of the broadcast layer: it holds back live events
    while the replay is read, drops the duplicates the replay already covered (per
    group), and bounds what may wait to be sent. A view that streams its groups
    sends straight from it; a view that iterates `self.subscription` reads events
    from it. With several groups it rewrites each event's id into the stream's
    composite id.

    The replay is held one page at a time: once a page is taken, `pending_history`
    is true and `fill()` reads the next one, in the reader's own task. A live
    event that arrives before an earlier one of its group starts such a read too:
    the events in between are read from the history first (the late copies are
    then dropped as duplicates).

    Iteration raises `SlowConsumer` when more than `max_events` or `max_bytes`
    of live events were waiting, and `BackendError` when the backend failed:
    events are never dropped silently. Resume with the last event's id.
    """

    __slots__ = (
        "_backlog",
        "_broadcast",
        "_by_group",
        "_bytes",
        "_epoch",
        "_error",
        "_floor",
        "_groups",
        "_lane",
        "_lanes",
        "_live",
        "_replay",
        "_started",
        "_waiter",
        "max_bytes",
        "max_events",
        "on_error",
        "on_ready",
        "taken",
    )

    def __init__(self, *, max_events: int = 1000, max_bytes: int = 1024 * 1024) -> None:
        if max_events < 1 or max_bytes < 1:
            raise ValueError("max_events and max_bytes must be >= 1")
        self.max_events = max_events
        self.max_bytes = max_bytes
        # The replay (or reset event), as wire bytes, sent or read before anything live.
        self._backlog: list[bytes] = _EMPTY
        self._live: list[Delivery] = []
        self._bytes = 0  # bytes of live events waiting
        self._started = False  # False while the replay is read: live events are held
        # The groups' lanes, sorted by name; `_lane` is the one of a one-group
        # subscription, `_by_group` maps the groups of a several-group one. Until
        # they are set (the subscription is attaching), every offer is held.
        self._lanes: list[_Lane] = []
        self._lane: _Lane | None = None
        self._by_group: dict[str, _Lane] | None = None
        self._replay: list[_Lane] = _NO_LANES  # the lanes whose replay is still to read
        # Live, one group: the epoch object of its last event, and its seq.
        self._epoch: bytes | None = None
        self._floor = 0
        self._error: BaseException | None = None
        self._waiter: Waiter | None = None
        self._broadcast: Broadcast | None = None
        self._groups: Sequence[str] = ()
        #: Called once when the subscription fails (slow consumer, backend loss).
        self.on_error: Callable[[BaseException], None] | None = None
        #: Called when events are ready, instead of waking an `async for` reader
        #: (a view that sends straight from the subscription sets it).
        self.on_ready: Callable[[], None] | None = None
        #: How many events the last `take()` returned.
        self.taken = 0

    # -- fed by the broadcast (synchronously, in whatever task published) ---------

    def offer(self, delivery: Delivery) -> None:
        """Take one live event: keep a reference to its bytes and wake the reader."""
        if self._error is not None:
            return
        seq = delivery.seq
        # An ephemeral event (seq 0: join/leave) has no id and is never a duplicate.
        if seq != EPHEMERAL_SEQ:
            if delivery.epoch is self._epoch and seq == self._floor + 1:
                # One group, live, the next event of the epoch of its last one (the
                # broadcast hands every subscription the same epoch object): the hot path.
                self._floor = seq
            elif not self._offer_other(delivery):
                return
        live = self._live
        live.append(delivery)
        size = self._bytes = self._bytes + len(delivery.wire)
        if len(live) > self.max_events or size > self.max_bytes:
            self._overflow()
            return
        if self._started:
            on_ready = self.on_ready
            if on_ready is not None:
                on_ready()
            else:
                waiter = self._waiter
                if waiter is not None:
                    waiter.wake()

    def _offer_other(self, delivery: Delivery) -> bool:
        """The rest of `offer` for a stored event: True to queue it as it is."""
        lane = self._lane
        if lane is None:
            if self._by_group is not None:
                self._offer_composite(delivery)
                return False
            return True  # attaching: held until the lanes are known
        epoch, seq = delivery.epoch, delivery.seq
        if not self._started:
            return epoch != lane.epoch or seq > lane.floor
        if epoch == lane.epoch:
            self._epoch = epoch
            if seq != self._floor + 1:
                if seq > self._floor:
                    self._gap(lane, delivery)
                return False
        else:
            # The group started a new epoch (its history was lost): go on in it.
            lane.epoch = epoch
        self._epoch = epoch
        self._floor = seq
        return True

    def _offer_composite(self, delivery: Delivery) -> None:
        """`offer` for a subscription of several groups: the event gets the stream's id."""
        by_group = self._by_group
        lane = by_group.get(delivery.group) if by_group is not None else None
        if lane is None:
            return
        if delivery.epoch == lane.epoch and delivery.seq <= lane.floor:
            return
        if self._started and delivery.epoch == lane.epoch and delivery.seq != lane.floor + 1:
            self._gap(lane, delivery)
            return
        if self._started:
            lane.epoch = delivery.epoch
            lane.seq = lane.floor = delivery.seq
            delivery = self._composite(delivery.group, delivery.seq, delivery.wire)
        self._live.append(delivery)
        self._bytes += len(delivery.wire)
        if len(self._live) > self.max_events or self._bytes > self.max_bytes:
            self._overflow()
        elif self._started:
            self._ready()

    def _gap(self, lane: _Lane, delivery: Delivery) -> None:
        """A live event of `lane`'s epoch arrived beyond the next seq the stream
        expects: the events in between were published (their ids are taken) but
        arrive later, or never to this process. Read them from the history first."""
        if lane is self._lane:
            # One group: the hot path moves only `_floor`.
            lane.seq = lane.floor = self._floor
        ready, self._live = self._live, []
        self._fill(lane, delivery.seq, ready, [delivery])
        self._ready()

    def _fill(self, lane: _Lane, seq: int, ready: list[Delivery], held: list[Delivery]) -> None:
        """Hold the live events from `held` on, and read `lane`'s history up to `seq - 1`
        (the hole before `seq`) after the events of `ready`, as a replay does."""
        if ready:
            self._backlog = [*self._backlog, *[delivery.wire for delivery in ready]]
        lane.cursor = lane.floor
        lane.upto = lane.floor = seq - 1
        self._replay = [lane]
        self._live = held
        self._bytes = sum(len(delivery.wire) for delivery in held)
        self._started = False
        self._epoch = None

    def _composite(self, group: str, seq: int, wire: bytes) -> Delivery:
        """A copy of a stored event (at its lane's position) with the stream's id."""
        cursor = b".".join([b"%s-%d" % (lane.epoch, lane.seq) for lane in self._lanes])
        return Delivery(group, seq, b"id: " + cursor + wire[wire.index(b"\n") :])

    def _overflow(self) -> None:
        self._live = []
        self._bytes = 0
        self.fail(
            SlowConsumer(
                f"slow consumer: a subscriber fell more than {self.max_events} events or "
                f"{self.max_bytes} bytes behind (it resumes from its Last-Event-ID)"
            )
        )

    def fail(self, error: BaseException) -> None:
        """End the subscription with `error` (raised to its reader; `on_error` is called)."""
        if self._error is None:
            self._error = error
            if self.on_error is not None:
                self.on_error(error)
        self._ready()

    def _ready(self) -> None:
        on_ready = self.on_ready
        if on_ready is not None:
            on_ready()
            return
        waiter = self._waiter
        if waiter is not None:
            waiter.wake()

    def _start(self, attachment: Attachment) -> None:
        """Take the lanes, queue the reset event if any, and go live unless a replay
        is to be read."""
        lanes = self._lanes = attachment.lanes
        if len(lanes) == 1:
            self._lane = lanes[0]
        else:
            self._by_group = {lane.group: lane for lane in lanes}
        for lane in lanes:
            # Held live events the replay covers are duplicates.
            lane.floor = lane.upto
        if attachment.reset is not None:
            self._backlog = [attachment.reset.encode()]
        replay = [lane for lane in lanes if lane.cursor < lane.upto]
        if replay:
            self._replay = replay
            self._hold()
            self._ready()
            return
        if self._go_live() or self._backlog:
            self._ready()

    def _lane_of(self, delivery: Delivery) -> _Lane | None:
        if self._lane is not None:
            return self._lane
        return self._by_group.get(delivery.group) if self._by_group is not None else None

    def _hold(self) -> None:
        """Drop the held live events that the replay covers."""
        held = []
        for delivery in self._live:
            lane = self._lane_of(delivery)
            if (
                delivery.seq == EPHEMERAL_SEQ
                or lane is None
                or delivery.epoch != lane.epoch
                or delivery.seq > lane.floor
            ):
                held.append(delivery)
        self._live = held
        self._bytes = sum(len(delivery.wire) for delivery in held)

    def _go_live(self) -> bool:
        """End the replay: the held live events newer than it are ready, in order.
        One beyond the next seq of its lane's epoch starts a read of the hole before
        it instead (the events before it stay ready, those from it on held). True
        when there is something to send or to read."""
        ready: list[Delivery] = []
        held = self._live
        composite = self._by_group is not None
        for index, delivery in enumerate(held):
            if delivery.seq != EPHEMERAL_SEQ:
                lane = self._lane_of(delivery)
                if lane is None:
                    continue
                if delivery.epoch == lane.epoch:
                    if delivery.seq <= lane.floor:
                        continue
                    if delivery.seq != lane.floor + 1:
                        self._fill(lane, delivery.seq, ready, held[index:])
                        return True
                lane.epoch = delivery.epoch
                lane.seq = lane.floor = delivery.seq
                if composite:
                    delivery = self._composite(delivery.group, delivery.seq, delivery.wire)
            ready.append(delivery)
        self._live = ready
        self._bytes = sum(len(delivery.wire) for delivery in ready)
        self._replay = _NO_LANES
        lane = self._lane
        if lane is not None:
            # The next offer, checked against the lane, sets the epoch to compare with.
            self._epoch = None
            self._floor = lane.floor
        self._started = True
        return bool(ready)

    def _queue_page(self, lane: _Lane, page: Page) -> None:
        """Queue one page of `lane`'s replay, and go live after the last one."""
        events, end = page
        if events:
            if self._by_group is not None:
                backlog = []
                for seq, wire in events:
                    lane.seq = seq
                    backlog.append(self._composite(lane.group, seq, wire).wire)
                self._backlog = backlog
            else:
                self._backlog = [wire for _, wire in events]
                lane.seq = events[-1][0]
        if end >= lane.upto:
            lane.cursor = lane.seq = lane.upto
            self._replay.remove(lane)
            if not self._replay:
                self._go_live()
                self._ready()
        elif end > lane.cursor:
            lane.cursor = end
        else:
            self._replay = _NO_LANES
            self.fail(
                BackendError(
                    f"the history store's page of {lane.group!r} after {lane.cursor} ends at {end}"
                )
            )

    async def _read_next(self, broadcast: Broadcast) -> None:
        """Read the replay's next page; a cursor that cannot be resumed any more gets
        the reset event, then live.

        Raises:
            BackendError: The store cannot be reached.
            BroadcastNotConnected: The broadcast is not connected.
        """
        lane = self._replay[0]
        after = Position(lane.epoch.decode(), lane.cursor)
        for wait in _HOLE_WAITS:
            page = await broadcast._read_page(self, lane.group, after, lane.upto)
            if self._error is not None or self._broadcast is None:
                self._replay = _NO_LANES  # failed or closed meanwhile
                return
            if page is None:
                break
            if _whole(page, lane.cursor, lane.upto):
                self._queue_page(lane, page)
                return
            # A seq of the range is not in the history: an event whose successor was
            # delivered first, still being stored by another process, or a store
            # that lost it. Wait a little for the former.
            if wait is None:
                logger.warning(
                    "the history of group %r lacks events after seq %d up to %d that "
                    "later events were delivered after; the stream gets the reset event",
                    lane.group,
                    lane.cursor,
                    min(page.end, lane.upto),
                )
                break
            await anyio.sleep(wait)
        # Events the replay had not reached yet were dropped meanwhile: this group
        # starts at its head, behind the reset event; the others' replay goes on.
        [head] = await broadcast._heads([lane.group])
        if self._error is not None or self._broadcast is None:
            self._replay = _NO_LANES
            return
        reason = "expired" if head.epoch == after.epoch else "unknown_epoch"
        lane.move_to(head)
        self._backlog = [broadcast._reset_event(self._lanes, {lane.group: reason}).encode()]
        self._replay.remove(lane)
        if not self._replay:
            self._go_live()
        self._ready()

    # -- read by the stream (in the stream's own task) ----------------------------

    @property
    def error(self) -> BaseException | None:
        """The error that ended the subscription, if one did."""
        return self._error

    @property
    def pending_history(self) -> bool:
        """True when the replay's current page is used up and more history is to be
        read: await `fill()`."""
        return bool(self._replay) and not self._backlog

    async def fill(self) -> None:
        """Read the replay's next page (when `pending_history`), in the reader's own task:
        the replay of a resume, or the events missing before one that arrived early.

        It waits for a slot of the broadcast's `max_concurrent_replays`. A backend
        failure ends the subscription with `BackendError` (raised by iteration, and
        passed to `on_error`); history lost since the replay started gets the reset
        event, then the live events.
        """
        if not self.pending_history:
            return
        broadcast = self._broadcast
        if broadcast is None or self._error is not None:
            self._replay = _NO_LANES  # closed or failed: nothing more to read
            return
        try:
            await self._read_next(broadcast)
        except (BackendError, BroadcastNotConnected) as error:
            self._replay = _NO_LANES
            logger.warning("reading the replay from the history failed: %s", error)
            self.fail(error)

    def take(self, limit: int) -> bytes:
        """Take the ready events' bytes (empty when none): replay slices of about
        `limit` bytes first, else every live event. `taken` says how many events."""
        backlog = self._backlog
        if backlog:
            size = count = 0
            for wire in backlog:
                size += len(wire)
                count += 1
                if size >= limit:
                    break
            data = b"".join(backlog[:count])
            del backlog[:count]
            self.taken = count
            return data
        live = self._live
        if not live or not self._started:
            return b""
        self._bytes = 0
        count = self.taken = len(live)
        data = live[0].wire if count == 1 else b"".join([delivery.wire for delivery in live])
        # Emptied in place: a new list per delivery would outlive the burst of
        # wake-ups and be promoted by the collector, 2,000 of them per publish.
        live.clear()
        return data

    def close(self) -> None:
        """Leave the groups (idempotent); nothing more is delivered."""
        # The callbacks point back at the stream (a view's bound methods): let go
        # of them, so a closed stream is freed by reference counting.
        self.on_error = None
        self.on_ready = None
        broadcast = self._broadcast
        if broadcast is not None:
            self._broadcast = None
            broadcast._unregister(self, self._groups)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        while True:
            backlog = self._backlog
            if backlog:
                return event_from_wire(backlog.pop(0))
            live = self._live
            if live and self._started:
                delivery = live.pop(0)
                self._bytes -= len(delivery.wire)
                return delivery.event()
            if self._error is not None:
                raise self._error
            if self._replay:
                await self.fill()
                continue
            waiter = self._waiter
            if waiter is None:
                waiter = self._waiter = current_runtime().waiter()
            await waiter.wait()


# Seconds to wait before reading again a page that lacks an event, then None: give
# up and send the reset event.
_HOLE_WAITS = (0.01, 0.05, 0.25, None)


def _whole(page: Page, cursor: int, upto: int) -> bool:
    """Whether a page of the history after `cursor` holds every seq up to its end: a
    group's seqs have no gap within its epoch, so a missing one was not stored."""
    events, end = page
    last = min(end, upto)
    if not events:
        return last <= cursor
    return events[0][0] == cursor + 1 and events[-1][0] == last and len(events) == last - cursor


_EMPTY: list[bytes] = []  # shared by every subscription with no replay; never mutated
_NO_LANES: list[_Lane] = []  # the same, for the lanes left to replay


async def open_subscription(
    broadcast: Broadcast,
    groups: Sequence[str],
    last_event_id: str | None,
    subscription: Subscription,
) -> Subscription:
    """Join `groups` with `subscription` and queue its replay's first page (or the reset
    event); `close()` leaves them.

    Raises:
        InvalidLastEventId: A malformed id.
        ValueError: More than 256 groups.
        BackendError: The backend is down.
        BroadcastNotConnected: The broadcast is not connected.
    """
    # A group named twice is joined once; the order of a composite id is by name.
    groups = sorted(dict.fromkeys(groups))
    if len(groups) > MAX_CURSOR_GROUPS:
        raise ValueError(
            f"a stream may join at most {MAX_CURSOR_GROUPS} groups (its id carries a "
            f"position per group), got {len(groups)}"
        )
    attachment = await broadcast._attach(subscription, groups, last_event_id)
    subscription._broadcast = broadcast
    subscription._groups = groups
    subscription._start(attachment)
    if subscription.pending_history:
        try:
            await subscription._read_next(broadcast)
        except BaseException:
            subscription.close()
            raise
    return subscription


def was_connected(broadcast: Broadcast) -> bool:
    """Whether `broadcast` was ever connected (never: the app's lifespan is missing)."""
    return broadcast._ever_connected


def claim_unconnected_report(broadcast: Broadcast) -> bool:
    """True the first time it is asked for `broadcast`: the caller logs that it was
    never connected, once per broadcast rather than once per refused stream."""
    if broadcast._reported_unconnected:
        return False
    broadcast._reported_unconnected = True
    return True


def new_member_id(broadcast: Broadcast) -> str:
    """A new presence connection id: the broadcast's random name, then a counter."""
    return next(broadcast._member_ids)
