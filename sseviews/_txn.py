"""Publishing in the caller's database transaction: `publish(group, data, session=s)`.

The event is stored with the caller's SQLAlchemy `AsyncSession` (or
`AsyncConnection`), in the caller's transaction, by the broadcast's SQL history
(`SQLAlchemyStore.append_in`): it exists once the caller commits, and never if it
rolls back. The history takes the group's lock for the rest of the transaction
(an advisory lock on PostgreSQL, the database's write lock on SQLite), so a
second transaction publishing to the group waits until the first ends, and a
group's ids follow commit order with no gap.

Live delivery happens after the commit, in one of two ways:

- **By PostgreSQL itself**, when the live layer is `PostgresBackend` listening to
  the history's database: the event's `NOTIFY` is queued in the caller's
  transaction, and PostgreSQL delivers it at commit (in commit order) or drops it
  on rollback. Nothing runs after the commit in this process.
- **By the outbox** otherwise (Redis or memory live, or PostgreSQL live on another
  database): the session's `after_commit` event hands the event to `Outbox`, a
  task of the broadcast, which delivers each group's events in id order. A
  rollback drops them. The `after_commit` event is synchronous, so it only marks
  the events and wakes that task; nothing is sent from it.

With the outbox, an event committed but not delivered (the process died in
between, or the live layer was down) is in the history only: a stream gets it on
its next resume, or when it receives a later event of the group and fills the
hole from the history.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ._exceptions import BroadcastNotConnected
from .stores.base import Position

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from .backends.base import LiveBackend
    from .stores.sqlalchemy import SQLAlchemyStore

__all__ = ["Outbox", "Transactions"]

logger = logging.getLogger("sseviews")

_PENDING, _COMMITTED, _DROPPED = 0, 1, 2

Deliver = Callable[[str, int, bytes], Awaitable[None]]


class _Entry:
    """One event published in a transaction (or, waiting behind such events, by
    a plain publish): delivered once committed, in its group's id order."""

    __slots__ = ("done", "epoch", "error", "group", "nested", "seq", "state", "task", "wire")

    def __init__(self, group: str, position: Position, wire: bytes, state: int) -> None:
        self.group = group
        self.epoch = position.epoch
        self.seq = position.seq
        self.wire = wire
        self.state = state
        # The savepoint (SessionTransaction) it was published in, if any.
        self.nested: Any = None
        # The task whose transaction holds the group's lock.
        self.task: asyncio.Task[Any] | None = None
        # Set for a plain publish that waits for its own delivery.
        self.done: asyncio.Event | None = None
        self.error: BaseException | None = None


class Outbox:
    """Delivers committed events after their transaction, per group in id order.

    Each group's entries wait in a queue ordered by seq (within an epoch). The
    head is delivered once committed, and dropped once rolled back; a later
    entry waits behind a head whose transaction has not ended yet (its commit
    hook comes right after the commit, which the later one had to wait for).
    """

    def __init__(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._queues: dict[str, deque[_Entry]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def has(self, group: str) -> bool:
        """Whether events of `group` wait to be delivered."""
        return group in self._queues

    def add(self, entry: _Entry) -> None:
        """Queue `entry` in its group, in seq order within its epoch."""
        self._start()
        queue = self._queues.get(entry.group)
        if queue is None:
            queue = self._queues[entry.group] = deque()
        index = len(queue)
        while index and queue[index - 1].epoch == entry.epoch and queue[index - 1].seq > entry.seq:
            index -= 1
        queue.insert(index, entry)
        if entry.state != _PENDING:
            self._wake.set()

    def resolve(self, entries: list[_Entry], committed: bool) -> None:
        """Mark `entries` committed or rolled back (synchronous: called from the
        session's events), and wake the delivery task."""
        for entry in entries:
            if entry.state == _PENDING:
                entry.state = _COMMITTED if committed else _DROPPED
        self._wake.set()

    async def deliver_after(self, group: str, position: Position, wire: bytes) -> None:
        """Deliver a plain publish's event after the events queued before it in `group`.

        Raises:
            BackendError: The live layer cannot be reached.
            BroadcastNotConnected: The broadcast was closed meanwhile.
        """
        entry = _Entry(group, position, wire, _COMMITTED)
        entry.done = asyncio.Event()
        self.add(entry)
        await entry.done.wait()
        if entry.error is not None:
            raise entry.error

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="sseviews transactional publish outbox"
            )

    async def stop(self) -> None:
        """Deliver what is committed (for up to a second), then stop; plain publishes
        still waiting get `BroadcastNotConnected`."""
        task, self._task = self._task, None
        if task is not None:
            self._closing = True
            self._wake.set()
            # It returns once nothing more is ready to deliver.
            await asyncio.wait({task}, timeout=1)
            task.cancel()
            await asyncio.wait({task})
        for queue in self._queues.values():
            for entry in queue:
                if entry.done is not None and not entry.done.is_set():
                    entry.error = BroadcastNotConnected("the broadcast was closed")
                    entry.done.set()
        self._queues.clear()

    @staticmethod
    def _head(queue: deque[_Entry]) -> _Entry | None:
        """The group's next entry to deliver, dropping the rolled-back ones; None
        while the first one's transaction has not ended."""
        while queue:
            head = queue[0]
            if head.state == _DROPPED:
                queue.popleft()
                continue
            if head.state == _COMMITTED:
                return head
            # A committed entry of the same epoch at or below its seq took that seq
            # again: this head's transaction rolled back (even if its session was
            # dropped without ending it, so no event ever told us).
            for later in queue:
                if (
                    later is not head
                    and later.state == _COMMITTED
                    and later.epoch == head.epoch
                    and later.seq <= head.seq
                ):
                    head.state = _DROPPED
                    break
            else:
                return None
        return None

    async def _run(self) -> None:
        queues = self._queues
        while True:
            self._wake.clear()
            for group in list(queues):
                queue = queues[group]
                while (entry := self._head(queue)) is not None:
                    queue.popleft()
                    try:
                        await self._deliver(group, entry.seq, entry.wire)
                    except Exception as exc:
                        if entry.done is not None:
                            entry.error = exc
                        else:
                            logger.warning(
                                "delivering event %s-%d of %r after its commit failed (it is "
                                "in the history: streams get it when they resume or see "
                                "the group's next event): %s",
                                entry.epoch,
                                entry.seq,
                                group,
                                exc,
                            )
                    finally:
                        if entry.done is not None:
                            entry.done.set()
                if not queue:
                    del queues[group]
            if self._closing:
                return
            await self._wake.wait()


class _Holder:
    """What one session (or connection) published in its current transaction."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: list[_Entry] = []


class Transactions:
    """A broadcast's publishes in callers' transactions (made on first use)."""

    def __init__(self, live: LiveBackend, store: SQLAlchemyStore) -> None:
        self.live = live
        self.store = store
        self.notify_in_transaction = False
        try:
            from .backends.postgres import PostgresBackend
        except ImportError:  # asyncpg missing: the live layer is not PostgreSQL
            pass
        else:
            if isinstance(live, PostgresBackend) and store.same_database(live.listen_dsn):
                self.notify_in_transaction = True
        self.outbox = Outbox(self._deliver)
        # A SQLite append lets go of the database at its commit, before its delivery;
        # a PostgreSQL one keeps the group's lock until its event is delivered.
        self._sqlite = store.engine.dialect.name == "sqlite"
        # The sessions and connections seen, each with its transaction's events.
        self._holders: weakref.WeakKeyDictionary[Any, _Holder] = weakref.WeakKeyDictionary()
        # group -> task -> events that task's open transactions published to it.
        self._held: dict[str, dict[asyncio.Task[Any], int]] = {}

    async def publish(self, group: str, wire: bytes, session: Any) -> Position:
        """Store `wire` in `group` in `session`'s transaction; deliver it at commit.

        Raises:
            TypeError: `session` is not an `AsyncSession` or `AsyncConnection`.
            ValueError: It is on another database, or a connection with no
                transaction begun.
            BackendError: The database refused a statement.
        """
        conn, holder, nested = await self._bind(session)
        position, stored = await self.store.append_in(conn, group, wire)
        if self.notify_in_transaction:
            raw = await conn.get_raw_connection()
            await self.live.deliver_in_transaction(  # type: ignore[attr-defined]
                raw.driver_connection, group, position.seq, stored
            )
        entry = _Entry(group, position, stored, _PENDING)
        entry.nested = nested
        entry.task = task = asyncio.current_task()
        holder.entries.append(entry)
        if task is not None:
            tasks = self._held.get(group)
            if tasks is None:
                tasks = self._held[group] = {}
            tasks[task] = tasks.get(task, 0) + 1
        if not self.notify_in_transaction:
            self.outbox.add(entry)
        return position

    def ordered_by_outbox(self, group: str) -> bool:
        """Whether a plain publish's event must be delivered by the outbox, after
        events of transactions: always on SQLite; on PostgreSQL while some of the
        group's are waiting (the group's lock orders the rest)."""
        if self.notify_in_transaction:
            return False
        return self._sqlite or self.outbox.has(group)

    def check_plain(self, group: str) -> None:
        """Refuse a plain publish that would wait for a lock its own task holds.

        Raises:
            RuntimeError: This task's open transaction published to `group` (or,
                on SQLite, to any group: the database has one write lock).
        """
        if not self._held:
            return
        task = asyncio.current_task()
        if task is None:
            return
        if self._sqlite:
            held = [name for name, tasks in self._held.items() if task in tasks]
        else:
            tasks = self._held.get(group)
            held = [group] if tasks is not None and task in tasks else []
        if held:
            raise RuntimeError(
                f"publish({group!r}) without session= would wait forever for the lock "
                f"that this task's open transaction holds (it published to {held[0]!r} "
                "with session=): pass the same session= to every publish in the "
                "transaction, or publish after it ends"
            )

    async def _bind(self, session: Any) -> tuple[AsyncConnection, _Holder, Any]:
        """Check `session` and return its connection (beginning the transaction of an
        `AsyncSession`), its holder, and its innermost savepoint."""
        from sqlalchemy.engine import Engine
        from sqlalchemy.exc import UnboundExecutionError
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

        if isinstance(session, AsyncSession):
            try:
                bind = session.get_bind()
            except UnboundExecutionError as exc:
                raise ValueError(
                    f"publish(session=...) got an AsyncSession bound to no database: {exc}"
                ) from None
            self._check_database(bind if isinstance(bind, Engine) else bind.engine)
            conn = await session.connection()  # begins the transaction if none is
            sync = session.sync_session
            holder = self._holders.get(sync)
            if holder is None:
                holder = self._holders[sync] = self._listen_session(sync)
            return conn, holder, sync.get_nested_transaction()
        if isinstance(session, AsyncConnection):
            if not self.notify_in_transaction:
                raise TypeError(
                    "publish(session=...) needs an AsyncSession here: with "
                    f"{type(self.live).__name__} live the event is delivered after the "
                    "commit, which only a session's after_commit event tells; an "
                    "AsyncConnection works with PostgreSQL as the live layer (NOTIFY is "
                    "delivered at commit)"
                )
            self._check_database(session.sync_engine)
            if not session.in_transaction():
                raise ValueError(
                    "publish(session=conn) needs a transaction begun on the connection "
                    "(`async with engine.begin() as conn:`), which you then commit"
                )
            sync_conn = session.sync_connection
            holder = self._holders.get(sync_conn)
            if holder is None:
                holder = self._holders[sync_conn] = self._listen_connection(sync_conn)
            return session, holder, None
        raise TypeError(
            "session must be a SQLAlchemy AsyncSession or AsyncConnection on the "
            f"broadcast's history database, got {type(session).__name__}"
        )

    def _check_database(self, engine: Any) -> None:
        if not self.store.same_database(engine):
            raise ValueError(
                "publish(session=...) needs a session on the broadcast's history database "
                f"({self.store}); this one is on "
                f"{engine.url.render_as_string(hide_password=True)}. Bind your sessions "
                "to broadcast.store.engine, or to an engine made with the same URL "
                "(dialect, host, port and database)"
            )

    def _listen_session(self, sync: Any) -> _Holder:
        from sqlalchemy import event

        holder = _Holder()

        def after_commit(session: Any) -> None:
            if session.get_nested_transaction() is not None:
                return  # a savepoint released: the events wait for the real commit
            entries, holder.entries = holder.entries, []
            for entry in entries:
                self.store.issued(entry.group, Position(entry.epoch, entry.seq))
            self._release(entries)
            if not self.notify_in_transaction:
                self.outbox.resolve(entries, committed=True)

        def after_soft_rollback(session: Any, previous: Any) -> None:
            if previous.nested:
                dropped = [entry for entry in holder.entries if _inside(entry.nested, previous)]
                if not dropped:
                    return
                holder.entries = [entry for entry in holder.entries if entry not in dropped]
            else:
                dropped, holder.entries = holder.entries, []
            self._release(dropped)
            if not self.notify_in_transaction:
                self.outbox.resolve(dropped, committed=False)

        def after_transaction_end(session: Any, transaction: Any) -> None:
            if transaction.parent is None and holder.entries:
                # Ended without a commit event (a commit that failed, a close): what
                # was committed, if anything, is in the history.
                after_soft_rollback(session, transaction)

        event.listen(sync, "after_commit", after_commit)
        event.listen(sync, "after_soft_rollback", after_soft_rollback)
        event.listen(sync, "after_transaction_end", after_transaction_end)
        return holder

    def _listen_connection(self, sync_conn: Any) -> _Holder:
        from sqlalchemy import event

        holder = _Holder()

        def ended(conn: Any) -> None:
            # PostgreSQL delivers or drops the NOTIFYs itself; only the lock marks go.
            entries, holder.entries = holder.entries, []
            self._release(entries)

        event.listen(sync_conn, "commit", ended)
        event.listen(sync_conn, "rollback", ended)
        return holder

    def _release(self, entries: list[_Entry]) -> None:
        held = self._held
        for entry in entries:
            tasks = held.get(entry.group)
            if tasks is None or entry.task not in tasks:
                continue
            count = tasks[entry.task] - 1
            if count:
                tasks[entry.task] = count
            else:
                del tasks[entry.task]
                if not tasks:
                    del held[entry.group]

    async def _deliver(self, group: str, seq: int, wire: bytes) -> None:
        await self.live.deliver(group, seq, wire)

    async def stop(self) -> None:
        await self.outbox.stop()


def _inside(nested: Any, savepoint: Any) -> bool:
    """Whether a savepoint `nested` (or None) is `savepoint` or inside it."""
    while nested is not None:
        if nested is savepoint:
            return True
        nested = nested.parent
    return False
