"""`Broadcast`: groups, event ids, replay, and fan-out to this process's subscribers.

A broadcast pairs a live backend (memory or Redis), which carries each published
event to every process that serves its group, with a history store (memory,
Redis or SQL), which assigns ids from one monotonic cursor and keeps recent
events per group.

Each process keeps a hub: group name -> the subscriptions of that group in this
process (one per open stream that joined it). A publish received by this process
becomes one `Delivery`, offered synchronously to each subscription: the
subscription keeps a reference to the shared bytes and wakes its stream. It never
writes to a stream; the stream's own task does that.

A process receives only the events of the groups in its hub: the live backend
subscribes to a group when a subscription first uses it (`LiveBackend.subscribe`)
and lets it go when the last one leaves (`LiveBackend.unsubscribe`).

Resuming is gap-free: a sink is registered (live events are held back), and the
backend has confirmed that its groups' live events reach this process, before
the head is read; the replay covers the history from its cursor up to that head,
and the live events above the head wait until the replay is sent. The replay is
read a page at a time, as the stream's writer sends it, so a resume holds one
page of history at most.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import unicodedata
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self
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
from ._wait import Waiter
from .backends.base import EPHEMERAL_SEQ, LiveBackend
from .stores.base import HistoryStore, Page, check_idle_expiry, format_id, parse_id

__all__ = [
    "RESET_EVENT",
    "Broadcast",
    "Delivery",
    "Subscription",
    "check_group",
    "open_subscription",
]

logger = logging.getLogger("sseviews")

#: The name of the event sent instead of a replay when a cursor cannot be resumed.
RESET_EVENT = "sseviews.reset"
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


class Attachment:
    """What a sink must send first after subscribing: a replay or a reset event.

    `backlog` is the replay's first page; it read the history up to `cursor`, and
    the rest of the replay, up to `upto`, is read page by page (`Subscription.fill`).
    """

    __slots__ = ("backlog", "cursor", "epoch", "floor", "reset", "upto")

    def __init__(
        self,
        backlog: list[bytes],
        floor: int,
        reset: Event | None,
        cursor: int = 0,
        upto: int = 0,
        epoch: str = "",
    ) -> None:
        self.backlog = backlog
        self.floor = floor
        self.reset = reset
        self.cursor = cursor
        self.upto = upto
        self.epoch = epoch


#: The URL schemes that select PostgreSQL as the live layer (and, by default, history).
_POSTGRES_SCHEMES = ("postgresql", "postgresql+asyncpg", "postgres", "postgres+asyncpg")
# URL schemes of the Redis backend and store (plain, TLS, unix socket, Sentinel).
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")


def _backend_for(url: str, prefix: str) -> LiveBackend:
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from .backends.memory import MemoryBackend

        return MemoryBackend()
    if scheme in _REDIS_SCHEMES:
        from .backends.redis import RedisBackend

        return RedisBackend(url, prefix=prefix)
    if scheme.split("+")[0] in ("postgresql", "postgres"):
        # It says what it expects of a URL with another driver (+psycopg).
        from .backends.postgres import PostgresBackend

        return PostgresBackend(url, prefix=prefix)
    raise ValueError(
        f"unsupported broadcast URL {url!r}: expected memory://, redis://host:port/db "
        "or postgresql+asyncpg://user@host:port/db, "
        "or redis+sentinel://host:port[,host:port...]/service[/db]"
    )


def _store_for(
    history: str,
    *,
    prefix: str,
    retention: int | None,
    max_age: float | None,
    idle_expiry: float | None,
    publish: bool,
) -> HistoryStore:
    scheme = urlsplit(history).scheme
    if scheme == "memory":
        from .stores.memory import MemoryStore

        return MemoryStore(retention=retention, max_age=max_age, idle_expiry=idle_expiry)
    if scheme in _REDIS_SCHEMES:
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
        "sqlite+aiosqlite:///file.db or postgresql+asyncpg://..."
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
            with Sentinel, following its failovers), or a `LiveBackend` instance.
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
        if history is None:
            scheme = urlsplit(url_text).scheme
            fused = scheme in _REDIS_SCHEMES
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
        self._connected = False
        # Presence connection ids: this broadcast's random name, then a counter.
        self._member_ids = map(f"{secrets.token_hex(6)}-{{}}".format, itertools.count(1))
        # A stream of a broadcast never connected means a missing lifespan: views
        # refuse it loudly, and log it once per broadcast (see EventStreamView._open).
        self._ever_connected = False
        self._reported_unconnected = False
        self._in_process = urlsplit(url_text).scheme == "memory" and not isinstance(
            url, LiveBackend
        )

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
        if self._in_process:
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
    def epoch(self) -> str:
        """The history's epoch, the first part of every id; it changes when history resets."""
        return self.store.epoch

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

    async def publish(self, group: str, event: Any) -> str:
        """Publish an event (or data for an unnamed event) to `group`; return its id.

        Raises:
            ValueError: The event already has an id (the broadcast assigns ids), or
                the group name is invalid.
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
        live = self.live

        async def deliver(seq: int, wire: bytes) -> None:
            if not self._fused:
                await live.deliver(group, seq, wire)

        seq = await self.store.append(group, event._wire, deliver)
        # Let the writers run between publishes: a burst must not starve them.
        await anyio.lowlevel.checkpoint()
        return format_id(self.store.epoch, seq)

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
        await self.live.deliver(group, EPHEMERAL_SEQ, event._wire)

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

    def _new_member_id(self) -> str:
        return next(self._member_ids)

    # -- local fan-out -----------------------------------------------------------

    def _dispatch(self, group: str, seq: int, wire: bytes) -> None:
        sinks = self._hub.get(group)
        if sinks:
            delivery = Delivery(seq, wire)
            for sink in sinks:
                sink.offer(delivery)

    def _fail_all(self, error: BaseException) -> None:
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

    async def _attach(
        self, sink: Subscription, groups: Sequence[str], last_event_id: str | None
    ) -> Attachment:
        """Register `sink` for `groups` and work out what it must be sent first.

        The sink must hold back the live events it is offered until it has sent
        the attachment's backlog, and drop those with seq <= `floor`.

        Raises:
            InvalidLastEventId: A malformed id.
            BackendError: The backend is down.
        """
        self._check_connected()
        groups = list(dict.fromkeys(groups))
        if not self.live.healthy:
            raise BackendError("the broadcast backend is reconnecting")
        cursor: tuple[str, int] | None = None
        if last_event_id is not None:
            cursor = parse_id(last_event_id)
        self._register(sink, groups)
        try:
            # The live events of the groups reach this process before their history
            # is read: the replay and the live events meet without a gap. Returns
            # at once for groups that other streams of this process use already.
            await self.live.subscribe(groups)
            if cursor is None:
                return Attachment([], 0, None)
            epoch, after = cursor
            store = self.store
            # head() first: a store that lost its history (a Redis restart without
            # persistence) learns its new epoch there.
            head = await store.head()
            if epoch != store.epoch:
                return Attachment([], head, self._reset_event("unknown_epoch", head))
            if after > head:
                # An id of this epoch that was never issued here: the history lost
                # events (a restored snapshot, a failover). A 400 would stop
                # EventSource for good; the reset lets it reload and go on.
                return Attachment([], head, self._reset_event("ahead", head))
            # The replay covers (after, head]; live events above head wait for it.
            page = await self._read_page(sink, groups, after, head)
            if page is None:
                reason = "expired" if store.epoch == epoch else "unknown_epoch"
                head = await store.head()
                return Attachment([], head, self._reset_event(reason, head))
            backlog = [wire for _, wire in page.events]
            return Attachment(backlog, head, None, page.end, head, epoch)
        except BaseException:
            self._unregister(sink, groups)
            raise

    async def _read_page(
        self, borrower: object, groups: Sequence[str], after: int, upto: int
    ) -> Page | None:
        """Read one page of a replay, in a slot of this broadcast's replay limiter.

        Raises:
            BackendError: The store cannot be reached.
            BroadcastNotConnected: The broadcast is not connected.
        """
        limiter = self._replays
        if limiter is None:
            raise BroadcastNotConnected("the broadcast is not connected")
        await limiter.acquire_on_behalf_of(borrower)
        try:
            return await self.store.read_page(groups, after, upto, self.replay_page_bytes)
        finally:
            limiter.release_on_behalf_of(borrower)

    def _reset_event(self, reason: str, head: int) -> Event:
        epoch = self.store.epoch
        head_id = format_id(epoch, head)
        return Event(
            {"reason": reason, "epoch": epoch, "head": head_id},
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


class Delivery:
    """One published event as this process received it, shared by all its subscribers.

    The wire bytes go to every stream as they are; the `Event` is parsed from them
    at most once per publish, by the first subscription iterated for it.
    """

    __slots__ = ("_event", "seq", "wire")

    def __init__(self, seq: int, wire: bytes) -> None:
        self.seq = seq
        self.wire = wire
        self._event: Event | None = None

    def event(self) -> Event:
        event = self._event
        if event is None:
            event = self._event = event_from_wire(self.wire)
        return event


class Subscription:
    """The events of some groups: the replay first, then live. Iterate with `async for`.

    It is the one subscriber of the broadcast layer: it holds back live events
    while the replay is read, drops the duplicates the replay already covered,
    and bounds what may wait to be sent. A view that streams its groups sends
    straight from it; a view that iterates `self.subscription` reads events from it.

    The replay is held one page at a time: once a page is taken, `pending_history`
    is true and `fill()` reads the next one, in the reader's own task.

    Iteration raises `SlowConsumer` when more than `max_events` or `max_bytes`
    of live events were waiting, and `BackendError` when the backend failed:
    events are never dropped silently. Resume with the last event's id.
    """

    __slots__ = (
        "_backlog",
        "_broadcast",
        "_bytes",
        "_cursor",
        "_epoch",
        "_error",
        "_floor",
        "_groups",
        "_live",
        "_started",
        "_upto",
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
        self._floor = 0  # highest seq taken; an offer at or below it is a duplicate
        self._started = False  # False while the replay is read: live events are held
        # While the replay is paged: it has been read up to _cursor, and goes on to
        # _upto (the head when it attached); live events above _upto are held.
        self._cursor = 0
        self._upto = 0
        self._epoch = ""  # the epoch of the cursor being replayed
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
        seq = delivery.seq
        # An ephemeral event (seq 0: join/leave) has no id and is never a duplicate.
        if self._error is not None or (seq <= self._floor and seq != EPHEMERAL_SEQ):
            return
        if self._started and seq != EPHEMERAL_SEQ:
            self._floor = seq
        live = self._live
        live.append(delivery)
        size = self._bytes = self._bytes + len(delivery.wire)
        if len(live) > self.max_events or size > self.max_bytes:
            self._live = []
            self._bytes = 0
            self.fail(
                SlowConsumer(
                    f"slow consumer: a subscriber fell more than {self.max_events} events or "
                    f"{self.max_bytes} bytes behind (it resumes from its Last-Event-ID)"
                )
            )
            return
        if self._started:
            on_ready = self.on_ready
            if on_ready is not None:
                on_ready()
            else:
                waiter = self._waiter
                if waiter is not None:
                    waiter.wake()

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
        """Queue the replay's first page (or reset), and keep only the held events newer
        than the replay."""
        backlog = [attachment.reset.encode()] if attachment.reset is not None else []
        backlog.extend(attachment.backlog)
        if backlog:
            self._backlog = backlog
        if attachment.cursor < attachment.upto:
            # More pages to read: live events stay held, those the replay covers dropped.
            self._cursor = attachment.cursor
            self._upto = attachment.upto
            self._epoch = attachment.epoch
            self._hold(attachment.floor)
            self._floor = attachment.floor
            self._ready()
            return
        if self._go_live(attachment.floor) or backlog:
            self._ready()

    def _hold(self, floor: int) -> list[Delivery]:
        held = [d for d in self._live if d.seq > floor or d.seq == EPHEMERAL_SEQ]
        self._live = held
        self._bytes = sum(len(delivery.wire) for delivery in held)
        return held

    def _go_live(self, floor: int) -> list[Delivery]:
        """End the replay: the held live events newer than `floor` are ready."""
        held = self._hold(floor)
        self._floor = max([floor, *(delivery.seq for delivery in held)])
        self._cursor = self._upto = 0
        self._started = True
        return held

    # -- read by the stream (in the stream's own task) ----------------------------

    @property
    def error(self) -> BaseException | None:
        """The error that ended the subscription, if one did."""
        return self._error

    @property
    def pending_history(self) -> bool:
        """True when the replay's current page is used up and more history is to be
        read: await `fill()`."""
        return self._cursor < self._upto and not self._backlog

    async def fill(self) -> None:
        """Read the replay's next page (when `pending_history`), in the reader's own task.

        It waits for a slot of the broadcast's `max_concurrent_replays`. A backend
        failure ends the subscription with `BackendError` (raised by iteration, and
        passed to `on_error`); history lost since the replay started gets the reset
        event, then the live events.
        """
        if not self.pending_history:
            return
        broadcast = self._broadcast
        cursor, upto = self._cursor, self._upto
        if broadcast is None or self._error is not None:
            self._cursor = self._upto = 0  # closed or failed: nothing more to read
            return
        store = broadcast.store
        try:
            page = await broadcast._read_page(self, self._groups, cursor, upto)
            head = await store.head() if page is None else 0
        except (BackendError, BroadcastNotConnected) as error:
            self._cursor = self._upto = 0
            logger.warning("reading the replay from the history failed: %s", error)
            self.fail(error)
            return
        if self._error is not None or self._broadcast is None:
            self._cursor = self._upto = 0  # failed or closed meanwhile
            return
        if page is None:
            # Events the replay had not reached yet were dropped meanwhile.
            reason = "expired" if store.epoch == self._epoch else "unknown_epoch"
            self._backlog = [broadcast._reset_event(reason, head).encode()]
            self._go_live(head)
            return
        events, end = page
        if events:
            self._backlog = [wire for _, wire in events]
        if end >= upto:
            self._go_live(upto)
        elif end > cursor:
            self._cursor = end
        else:
            self._cursor = self._upto = 0
            self.fail(BackendError(f"the history store's page after {cursor} ends at {end}"))

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
            if self._cursor < self._upto:
                await self.fill()
                continue
            waiter = self._waiter
            if waiter is None:
                waiter = self._waiter = Waiter()
            await waiter.wait()


_EMPTY: list[bytes] = []  # shared by every subscription with no replay; never mutated


async def open_subscription(
    broadcast: Broadcast,
    groups: Sequence[str],
    last_event_id: str | None,
    subscription: Subscription,
) -> Subscription:
    """Join `groups` with `subscription` and queue its replay; `close()` leaves them.

    Raises:
        InvalidLastEventId: A malformed id.
        BackendError: The backend is down.
        BroadcastNotConnected: The broadcast is not connected.
    """
    groups = list(dict.fromkeys(groups))  # a group named twice is joined once
    attachment = await broadcast._attach(subscription, groups, last_event_id)
    subscription._broadcast = broadcast
    subscription._groups = groups
    subscription._start(attachment)
    return subscription
