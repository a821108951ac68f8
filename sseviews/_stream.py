"""`Stream`: one open stream, from its first write to its teardown.

Every stream runs the same way, under every server, middleware and async backend:

- **the writer** is the only code that calls the stream's ASGI `send`. It takes
  everything that is ready from the stream's one `Source` (the stream's own
  buffer, which `events()` fills, or the view's `Subscription`) and writes it in
  one `send`, under `send_timeout`; it sends a keep-alive ping after
  `ping_interval` of silence, and the final chunk that ends the response;
- **the listener** is the only code that calls `receive`. It waits for
  `http.disconnect` and stops the stream when it comes;
- **the producer**, for a view with `events()`, is the request task itself: it
  iterates `events()`, encodes what it yields into the buffer and wakes the writer.

The writer always runs in a child task: woken once per burst of events, it
resumes a shallow stack of its own rather than the request's (every ASGI
middleware and the router above the view). A view that only streams its groups
has no producer, so its request task is the listener; a view with `events()`
runs the listener in a second child task. The children are started by the
request task, run in a copy of the request's contextvars context, and are
awaited before the request task returns (`StreamTasks`). Each ASGI call is
awaited to completion in the task that started it. The tasks, waits and deadlines
come from the runtime seam (`sseviews._runtime`): this module is the same on
asyncio and trio.

When the stream ends, the request task closes `events()`, runs `on_disconnect()`,
closes the view's session and leaves the groups' presence: each shielded and
bounded by `disconnect_timeout`.

Publishers never write: `Broadcast.publish()` appends a reference to the event's
bytes to each subscription and wakes that stream's writer. So middleware that
wrap `send` or `receive` (tracing, error reporting, `anyio.fail_after`) see
ordinary calls in the request's own task tree.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import anyio
import anyio.lowlevel
from starlette.types import Message, Receive, Send

from ._compression import Encoder, compressed_start
from ._events import Event, encode_comment, encode_data
from ._exceptions import BackendError, SlowConsumer
from ._lifecycle import DisconnectReason, register_stream, unregister_stream
from ._reserved import ERROR_EVENT
from ._runtime import CancelRegion, current_runtime

if TYPE_CHECKING:
    from ._broadcast import Broadcast, Subscription
    from ._lifecycle import ShutdownSignal
    from ._metrics import ViewCounters

__all__ = ["HIGH_WATER", "Source", "Stream", "StreamOwner", "first_chunk", "response_start"]

logger = logging.getLogger("sseviews")

# Bytes buffered before the producer waits for the writer. Large enough that a
# view yielding small events as fast as it can is written in few sends.
HIGH_WATER = 64 * 1024
# Reasons after which nothing more is written: the client is gone or cannot keep up.
DROP_REASONS = frozenset(
    {
        DisconnectReason.CLIENT_CLOSED,
        DisconnectReason.SEND_TIMEOUT,
        DisconnectReason.SLOW_CONSUMER,
    }
)
# Upper bound on the writes that end a stream during shutdown, in seconds, so a
# client that stopped reading cannot hold the server's exit.
SHUTDOWN_WRITE_TIMEOUT = 1.0
# The names of a stream's child tasks (in task dumps and debuggers).
WRITER_TASK = "sseviews stream writer"
LISTENER_TASK = "sseviews stream listener"


_DEFAULT_HEADERS: dict[str, str] = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-store",
    "x-accel-buffering": "no",
}
_DEFAULT_RAW_HEADERS = [(k.encode(), v.encode()) for k, v in _DEFAULT_HEADERS.items()]


def response_start(extra: Mapping[str, str]) -> Message:
    """The stream's `http.response.start`: the SSE headers, with `extra` over them."""
    if not extra:
        # A copy: ASGI lets middleware edit the message (GZipMiddleware adds
        # content-encoding to its headers), and no response may see another's edits.
        headers = list(_DEFAULT_RAW_HEADERS)
    else:
        merged = dict(_DEFAULT_HEADERS)
        merged.update({key.lower(): value for key, value in extra.items()})
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in merged.items()]
    return {"type": "http.response.start", "status": 200, "headers": headers}


def first_chunk(retry: int | None) -> bytes:
    """The stream's first body chunk: the `retry:` line, or nothing."""
    # No blank line after it: a `retry:` line takes effect as it is parsed, and a
    # blank line would make httpx-sse and fetch-event-source dispatch an empty event.
    return b"retry: %d\n" % retry if retry is not None else b""


class StreamOwner(Protocol):
    """What a stream needs of the view that serves it (`EventStreamView` is one)."""

    ping_interval: ClassVar[float | None]
    send_timeout: ClassVar[float | None]
    shutdown_grace_period: ClassVar[float]
    disconnect_timeout: ClassVar[float]
    error_retry: ClassVar[int | None]
    retry: ClassVar[int | None]
    headers: ClassVar[Mapping[str, str]]
    compress: ClassVar[bool | tuple[str, ...]]
    broadcast: ClassVar[Broadcast | None]
    announce_presence: ClassVar[bool]

    def describe(self) -> str: ...

    def ping_message(self) -> Event | str: ...

    async def on_disconnect(self, reason: DisconnectReason) -> None: ...


class Source(Protocol):
    """What the writer reads: the stream's own buffer, or the view's `Subscription`."""

    #: How many events the last `take()` returned.
    taken: int

    @property
    def pending_history(self) -> bool:
        """Whether `fill()` has more to read (a replay's next page)."""

    def take(self, limit: int) -> bytes:
        """Everything ready to write, as one chunk (at least `limit` bytes are taken
        whole); empty when nothing is ready."""

    async def fill(self) -> None:
        """Read what `pending_history` announces, in the writer's task."""


class Stream:
    """One open stream: its source, its writer and listener, its producer and teardown."""

    __slots__ = (
        "_ending",
        "_finishing",
        "_listening",
        "_request",
        "_runtime",
        "_scope",
        "_send_deadline",
        "_sending",
        "_shutdown_deadline",
        "_writer",
        "_written",
        "buffer",
        "buffered",
        "counters",
        "encoder",
        "events_scope",
        "farewell",
        "hooked",
        "last_write",
        "max_pending",
        "ping_interval",
        "presence",
        "reason",
        "receive",
        "send",
        "send_timeout",
        "session",
        "shutdown",
        "shutting_down",
        "source",
        "subscription",
        "taken",
        "task",
        "view",
    )

    def __init__(
        self,
        view: StreamOwner,
        receive: Receive,
        send: Send,
        shutdown: ShutdownSignal | None,
        counters: ViewCounters | None,
        *,
        hooked: bool = True,
    ) -> None:
        self.view = view
        self.receive = receive
        self.send = send
        self.shutdown = shutdown  # the server's, when it has one
        self.counters = counters
        self.ping_interval: float | None = view.ping_interval
        self.send_timeout: float | None = view.send_timeout
        #: What the writer reads when the view streams its groups directly: the
        #: view's subscription. None: this stream's own buffer, which `events()`
        #: fills (not a reference to itself, which would keep a closed stream for
        #: the garbage collector instead of freeing it at once).
        self.source: Source | None = None
        self.taken = 0
        #: The view's subscription, streamed directly or relayed by `events()`.
        self.subscription: Subscription | None = None
        #: (connection id, entry JSON, groups) while the stream is listed in its
        #: groups' presence.
        self.presence: tuple[str, bytes, list[str]] | None = None
        #: Whether the view overrides `on_disconnect()` (else there is nothing to run).
        self.hooked = hooked
        #: The view's database session, made on first use in the stream's task.
        self.session: Any = None
        #: The key of the task that iterates `events()` (see `EventStreamView.session`).
        self.task: int | None = None
        self.buffer: list[bytes] = []
        self.buffered = 0
        #: Events the producer may buffer ahead of the writer (a view that relays
        #: its subscription lowers it, so group events stay bounded by its settings).
        self.max_pending = 1 << 30
        #: The negotiated encoding's encoder, for a compressed stream: every chunk the
        #: writer sends goes through it. None: the stream is sent as it is.
        self.encoder: Encoder | None = None
        self.reason: DisconnectReason | None = None
        #: Complete messages written last, with the terminal chunk, when the stream
        #: ends for a reason end_at() did not plan (the view's `sseviews.error`).
        self.farewell = b""
        self.shutting_down = False
        self.last_write = 0.0
        # The scope that stops events(); made by open_events_scope().
        self.events_scope: anyio.CancelScope | None = None
        runtime = self._runtime = current_runtime()
        self._writer = runtime.waiter()  # the writer waits here for something to send
        # The request task waits here: for room in the buffer, or for the writer to end.
        self._request = runtime.waiter()
        self._listening: CancelRegion | None = None  # the request task's receive()
        self._scope: CancelRegion | None = None  # the writer's; bounds each send
        self._sending = False
        self._send_deadline = math.inf
        self._finishing = False
        self._written = False  # the writer has returned
        self._shutdown_deadline = math.inf
        # (when, reason, last bytes): see end_at(); None for most streams, at no cost.
        self._ending: tuple[float, DisconnectReason, bytes] | None = None

    def clock(self) -> float:
        """Anyio's clock."""
        return self._writer.clock()

    # -- the request task -------------------------------------------------------------

    async def start(self, head: Message, first: bytes) -> bool:
        """Send the response head and a first body chunk; False if the client is gone.

        The first chunk (the `retry:` line, or empty) makes every server flush the
        head at once: ASGI lets a server hold the head until the first body message.
        """
        with self._runtime.region() as region:
            self._scope = region
            try:
                if await self._send(head):
                    body: Message = {"type": "http.response.body", "body": first, "more_body": True}
                    if await self._send(body):
                        self._count(0, len(first))
                        return True
                    return False
            finally:
                self._scope = None
        if self.reason is None:
            self.reason = DisconnectReason.SEND_TIMEOUT
        return False

    async def serve(
        self,
        events: AsyncIterator[Any] | None,
        look_at: Callable[[object], None] | None = None,
    ) -> None:
        """Run the stream in this task until it ends, then tear it down in this task.

        Args:
            events: What the view's `events()` yields (already checked against its
                `event_types`), iterated into the buffer in this task; None for a
                view that streams its subscription directly.
            look_at: Called with the first yielded value that is not an `Event`.
        """
        counters = self.counters
        if counters is not None:
            counters.open += 1
            counters.streams += 1
        self.task = self._runtime.task_key()
        try:
            # One frame for the whole stream: the request task's stack is what every
            # open stream keeps while it waits. The head is built in the call, so
            # this frame never holds it.
            if not await self.start(*self._opening()):
                return  # the client is gone: only the teardown is left
            shutdown = self.shutdown
            if shutdown is not None:
                register_stream(shutdown, self)
            try:
                async with self._runtime.tasks() as tasks:
                    tasks.start(self._write, WRITER_TASK)
                    if events is None:
                        # The request task listens, and the writer (woken once per
                        # burst of group events) runs in a task with a shallow stack.
                        with self._runtime.region() as listening:
                            self._listening = listening  # cancelled when the writer ends
                            await self._listen()
                    else:
                        tasks.start(self._listen, LISTENER_TASK)
                        # events() is iterated in this frame rather than one of its
                        # own: this frame is kept while the stream is open anyway.
                        try:
                            with self.open_events_scope():
                                async for item in events:
                                    if isinstance(item, Event):
                                        data = item.encode()
                                    else:
                                        if look_at is not None:
                                            look_at(item)  # the first value that is not an Event
                                            look_at = None
                                        data = encode_data(item)
                                    if self.push(data):
                                        await self.wait_for_space()
                            self.stop(
                                DisconnectReason.SHUTDOWN
                                if self.shutting_down
                                else DisconnectReason.COMPLETED
                            )
                        except Exception as error:
                            self._events_failed(error)
                        finally:
                            await self._events_over(events)
                    while not self._written:
                        await self._request.wait()
            finally:
                if self.reason is None:
                    # Cancelled from outside (the server gave up on its graceful
                    # shutdown).
                    self.reason = DisconnectReason.SHUTDOWN
        finally:
            await self._end()

    async def _events_over(self, events: AsyncIterator[Any]) -> None:
        """`events()` is done: close it if it was left at a yield, then let the
        writer send what is buffered and end the response."""
        try:
            # A generator that returned, raised, or was cancelled at an await has
            # already finished: only one left at a yield has finally blocks to run.
            if getattr(events, "ag_frame", True) is not None:
                await self._close_events(events)
        finally:
            self._finishing = True
            self._writer.wake()

    async def _end(self) -> None:
        """The teardown, `on_disconnect` first; then leave the shutdown, the groups and
        their presence."""
        try:
            await self._teardown(self.reason or DisconnectReason.SHUTDOWN)
        finally:
            self.release()
            subscription = self.subscription
            if subscription is not None:
                subscription.close()
                if self.presence is not None:
                    await self._leave_presence(self.presence)

    def _opening(self) -> tuple[Message, bytes]:
        """The response head and the first body chunk (see `start()`)."""
        view = self.view
        head, first = response_start(view.headers), first_chunk(view.retry)
        if view.compress:
            head, first = compressed_start(head, first, self.encoder)
        return head, first

    def fail(self) -> None:
        """End the stream with `ERROR`: the `sseviews.error` event last, no details.

        Its `retry:` (the view's `error_retry`, jittered) makes clients back off
        instead of reconnecting to a failing stream at once; the traceback goes to
        the log only.
        """
        retry = self.view.error_retry
        if retry is not None:
            retry = round(retry * random.uniform(0.5, 1.5))
        self.farewell = Event({"reason": "error"}, event=ERROR_EVENT, retry=retry).encode()
        self.stop(DisconnectReason.ERROR)

    def session_from(self, factory: Callable[[], Any]) -> Any:
        """The view's session: made by `factory` on first use, closed in the teardown."""
        session = self.session
        if session is None:
            session = self.session = factory()
        return session

    def send_from(self, subscription: Subscription) -> None:
        """Write straight from `subscription` (a view without `events()`)."""
        self.subscription = self.source = subscription
        # The waiter's own method, so a publisher's wake-up is one call.
        subscription.on_ready = self._writer.wake
        subscription.on_error = self._subscription_failed

    def relay(self, subscription: Subscription, max_pending: int) -> None:
        """Let `events()` relay `subscription`, buffering at most `max_pending` events.

        events() may not get further ahead of the client than the subscription
        itself may.
        """
        self.subscription = subscription
        self.max_pending = max_pending
        subscription.on_error = self._subscription_failed

    def _subscription_failed(self, error: BaseException) -> None:
        # events() may be parked behind a blocked write and never see the error.
        if self.reason is not None:
            return
        if isinstance(error, SlowConsumer):
            logger.warning("%s: %s; disconnecting", self.view.describe(), error)
            self.stop(DisconnectReason.SLOW_CONSUMER)
        else:
            self.stop(DisconnectReason.ERROR)

    def release(self) -> None:
        """Tell the server's shutdown that this stream is done (after `on_disconnect`).

        Not before: a server whose shutdown waits for its streams (see
        `ShutdownMiddleware`) must not exit, or cancel the request, while
        `on_disconnect()` still runs.
        """
        shutdown = self.shutdown
        if shutdown is not None:
            unregister_stream(shutdown, self)

    # -- the stream's own buffer, as a Source -----------------------------------------

    pending_history = False  # events() has no history to read

    def take(self, limit: int) -> bytes:
        """Take the whole buffer (`limit` aside), and wake a producer waiting for room."""
        buffer = self.buffer
        count = self.taken = len(buffer)
        if not count:
            return b""
        data = buffer[0] if count == 1 else b"".join(buffer)
        buffer.clear()
        self.buffered = 0
        self._request.wake()
        return data

    async def fill(self) -> None:
        """Nothing to read: the buffer is filled by `events()`."""

    def push(self, data: bytes) -> bool:
        """Buffer one encoded message; True when the caller must `wait_for_space()`."""
        buffer = self.buffer
        if not buffer:
            # A writer with nothing to send waits for this; with something in the
            # buffer, it was woken already, or takes it before it waits again.
            self._writer.wake()
        buffer.append(data)
        buffered = self.buffered = self.buffered + len(data)
        return buffered >= HIGH_WATER or len(buffer) >= self.max_pending

    async def wait_for_space(self) -> None:
        """Wait until the writer has taken the buffer (backpressure on `events()`)."""
        waiter = self._request
        while self.buffered >= HIGH_WATER or len(self.buffer) >= self.max_pending:
            if self._written:
                # Nobody will take the buffer: the stream is over, and stop() has
                # cancelled events(). A checkpoint delivers that cancellation to an
                # events() that never waits by itself.
                self.buffer.clear()
                self.buffered = 0
                await anyio.lowlevel.checkpoint()
                return
            await waiter.wait()

    def open_events_scope(self) -> anyio.CancelScope:
        """Make the scope that stops `events()`, already stopped if the stream was."""
        scope = self.events_scope = anyio.CancelScope(deadline=self._shutdown_deadline)
        if self.reason is not None:
            scope.cancel()
        return scope

    # -- the producer -----------------------------------------------------------------

    def _events_failed(self, error: Exception) -> None:
        """End the stream because iterating `events()` raised `error` (call it from
        the `except` block: the traceback is logged)."""
        if isinstance(error, SlowConsumer):  # from the subscription events() relays
            if self.reason is None:
                logger.warning("%s: %s; disconnecting", self.view.describe(), error)
                self.stop(DisconnectReason.SLOW_CONSUMER)
        elif self.reason is None:
            logger.exception("%s: events() raised; ending the stream", self.view.describe())
            self.fail()
        else:
            logger.exception("%s: events() raised while closing", self.view.describe())

    async def _close_events(self, agen: Any) -> None:
        """Close `events()` left at a yield: shielded, and bounded by disconnect_timeout."""
        view = self.view
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(view.disconnect_timeout) as closing:
                try:
                    await agen.aclose()
                except Exception:
                    logger.exception("%s: events() raised while closing", view.describe())
            if closing.cancelled_caught:
                logger.warning(
                    "%s: events() took longer than %ss to close",
                    view.describe(),
                    view.disconnect_timeout,
                )

    # -- the teardown, in the request task -------------------------------------------

    async def _teardown(self, reason: DisconnectReason) -> None:
        """Run `on_disconnect`, then close the session, shielded and bounded, in this task."""
        counters = self.counters
        if counters is not None:
            counters.open -= 1
            counters.disconnects[reason] += 1
        # Views that keep the no-op hook and open no session have nothing to bound.
        if self.session is not None or self.hooked:
            await self._run_on_disconnect(reason)
        self.task = None
        level = logging.WARNING if reason is DisconnectReason.SEND_TIMEOUT else logging.DEBUG
        if logger.isEnabledFor(level):  # describe() formats a string: only for a line logged
            logger.log(level, "%s: stream ended (%s)", self.view.describe(), reason.value)

    async def _run_on_disconnect(self, reason: DisconnectReason) -> None:
        view = self.view
        timeout = view.disconnect_timeout
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(timeout) as bounded:
                try:
                    await view.on_disconnect(reason)
                except Exception:
                    logger.exception("%s: on_disconnect() raised", view.describe())
            if bounded.cancelled_caught:
                logger.warning(
                    "%s: on_disconnect() took longer than %ss and was cancelled",
                    view.describe(),
                    timeout,
                )
            session, self.session = self.session, None
            if session is not None:
                with anyio.move_on_after(timeout):
                    try:
                        await session.close()
                    except Exception:
                        logger.exception("%s: closing the session failed", view.describe())

    async def _leave_presence(self, presence: tuple[str, bytes, list[str]]) -> None:
        """Remove the stream from its groups' presence: shielded, bounded, in this task."""
        member, entry, groups = presence
        self.presence = None
        view = self.view
        broadcast = view.broadcast
        assert broadcast is not None
        with anyio.CancelScope(shield=True), anyio.move_on_after(view.disconnect_timeout):
            try:
                await broadcast.live.presence_leave(member, groups, entry, view.announce_presence)
            except BackendError as exc:
                logger.warning("%s: leaving presence failed: %s", view.describe(), exc)

    # -- called from any task of the event loop thread -----------------------------------

    def stop(self, reason: DisconnectReason) -> None:
        """End the stream for `reason` (the first reason given wins)."""
        if self.reason is None:
            self.reason = reason
        if self.events_scope is not None:
            self.events_scope.cancel()
        scope = self._scope
        if scope is not None and self._sending:
            if reason in DROP_REASONS:
                scope.cancel()  # nobody to write to
            else:
                # A write stuck on a client that stopped reading must not hold
                # the stream (or the server's shutdown) for the whole send_timeout.
                limit = self.clock() + SHUTDOWN_WRITE_TIMEOUT
                self._limit_send(min(self._send_deadline, limit))
        self._writer.wake()

    def end_at(self, when: float, reason: DisconnectReason, farewell: bytes = b"") -> None:
        """End the stream cleanly at `when` (anyio's clock) for `reason`; call before `run()`.

        The earliest of several calls wins. What is buffered is written first, then
        `farewell` (complete messages) with the terminal chunk, so the stream ends on
        an event boundary. The writer watches for it, so a stream that never
        starts leaves nothing behind.
        """
        ending = self._ending
        if ending is None or when < ending[0]:
            self._ending = (when, reason, farewell)

    def _end_now(self) -> None:
        ending = self._ending
        if ending is not None and self.reason is None:
            self.stop(ending[1])

    def begin_shutdown(self) -> None:
        """Start ending this stream because the server is shutting down."""
        if self.shutting_down:
            return
        self.shutting_down = True
        grace = self.view.shutdown_grace_period
        if grace > 0 and self.source is None:  # a view with events() of its own
            # events() may go on for the grace period to send a farewell and return.
            limit = self._shutdown_deadline = self.clock() + grace
            if self.events_scope is not None:
                self.events_scope.deadline = min(self.events_scope.deadline, limit)
            if self._scope is not None and self._sending:
                # ... but a write stuck on a client that stopped reading may not.
                self._limit_send(min(self._send_deadline, limit + SHUTDOWN_WRITE_TIMEOUT))
        else:
            self.stop(DisconnectReason.SHUTDOWN)

    # -- the listener ---------------------------------------------------------------

    async def _listen(self) -> None:
        """Wait on `receive()` until the client goes away, then stop the stream."""
        receive = self.receive
        try:
            while True:
                message = await receive()
                if message.get("type") != "http.request":  # a body chunk: read on
                    break
        except Exception:
            logger.exception("%s: receive() failed; ending the stream", self.view.describe())
            self.stop(DisconnectReason.ERROR)
            return
        self.stop(DisconnectReason.CLIENT_CLOSED)

    # -- the writer -------------------------------------------------------------------

    async def _write(self) -> None:
        """Write what is ready, and pings, until the stream ends; then end the response."""
        ping_interval = self.ping_interval
        source = self.source if self.source is not None else self
        writer = self._writer
        ending = self._ending
        end_at = math.inf if ending is None else ending[0]
        # Whether the last wait ended at its deadline: only then can a ping be due.
        # Woken by wake(), the writer has just written, or was told to stop.
        timed_out = True
        try:
            # Cancelled when a send times out, or when nobody reads any more.
            with self._runtime.region() as scope:
                self._scope = scope
                while True:
                    if ending is not None and self.reason is None and self.clock() >= end_at:
                        self._end_now()
                    reason = self.reason
                    if reason in DROP_REASONS:
                        break
                    if data := source.take(HIGH_WATER):
                        count = source.taken
                    elif self._finishing or reason is not None:
                        if ending is not None and reason is ending[1]:
                            last = ending[2]
                        else:
                            last = self.farewell
                        if self.encoder is not None:
                            last = self.encoder.finish(last)
                        end: Message = {"type": "http.response.body", "body": last}
                        if await self._send(end):
                            self._count(0, len(last))
                        break
                    elif source.pending_history:
                        await source.fill()  # the replay's next page, read in this task
                        continue
                    elif (
                        ping_interval is not None
                        and timed_out
                        and self.clock() - self.last_write >= ping_interval - 0.001
                    ):
                        ping = self.view.ping_message()
                        # A str is a comment line with no blank line after it, which no
                        # client takes for an event; an Event is sent as an event.
                        data = ping.encode() if isinstance(ping, Event) else encode_comment(ping)
                        count = 0
                        counters = self.counters
                        if counters is not None:
                            counters.pings += 1
                    else:  # idle until woken, or until the next ping or the planned end
                        due = math.inf if ping_interval is None else self.last_write + ping_interval
                        timed_out = not await writer.wait(due if due < end_at else end_at)
                        continue
                    encoder = self.encoder
                    if encoder is not None:
                        data = encoder.encode(data, not count)  # a ping (no event): idle
                    body: Message = {"type": "http.response.body", "body": data, "more_body": True}
                    if not await self._send(body):
                        break
                    counters = self.counters
                    if counters is not None:
                        counters.events += count
                        counters.bytes += len(data)
            if scope.cancelled_caught and self.reason is None:
                self.reason = DisconnectReason.SEND_TIMEOUT
        except Exception:
            logger.exception("%s: the stream's writer failed", self.view.describe())
            self.stop(DisconnectReason.ERROR)
        finally:
            self._scope = None
            self._written = True
            listening = self._listening
            if listening is not None:
                listening.cancel()  # the request task waits on receive(): the stream is over
            writer.close()
            if self.reason is DisconnectReason.SEND_TIMEOUT:
                self.stop(DisconnectReason.SEND_TIMEOUT)  # stops events() too
            self._request.wake()

    async def _send(self, message: Message) -> bool:
        """Send one message under `send_timeout`; False (the stream stopped) if it failed."""
        timeout = self.send_timeout
        if self.shutting_down or self.reason is not None:
            timeout = min(timeout or math.inf, SHUTDOWN_WRITE_TIMEOUT)
        now = self._writer.clock()
        if timeout is not None:
            self._limit_send(now + timeout)
        self._sending = True
        try:
            await self.send(message)
        except Exception as error:
            self._sending = False  # stop() must not cancel the writer for a send that is over
            if isinstance(error, OSError):
                # Some servers raise once the peer is gone; uvicorn just drops the write.
                self.stop(DisconnectReason.CLIENT_CLOSED)
            else:
                logger.error(
                    "%s: sending to the client failed; ending the stream",
                    self.view.describe(),
                    exc_info=error,
                )
                self.stop(DisconnectReason.ERROR)
            return False
        finally:
            self._sending = False
        if timeout is not None:
            scope = self._scope
            if scope is not None:
                scope.set_deadline(math.inf)  # no send in flight: nothing to bound
        # From the start of the write: a ping is due an interval after it, which
        # saves reading the clock again on every write (the fan-out's hot path).
        self.last_write = now
        return True

    def _limit_send(self, deadline: float) -> None:
        """Let the send in flight run until `deadline` at most; then the writer's scope is
        cancelled (SEND_TIMEOUT, unless the stream already ended for another reason)."""
        self._send_deadline = deadline
        scope = self._scope
        if scope is not None:
            scope.set_deadline(deadline)

    def _count(self, events: int, size: int) -> None:
        counters = self.counters
        if counters is not None:
            counters.events += events
            counters.bytes += size
