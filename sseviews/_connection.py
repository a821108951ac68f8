"""The per-connection writer: the one place that writes a stream to the socket.

A stream is served in one of two ways.

**Lean** (asyncio, with a server `receive()` known to wait on plain asyncio
futures: uvicorn's, and `sseviews.testing`'s). The request task is the only task:

- it iterates the view's `events()`, appends what it yields to the buffer, and
  writes the buffer, synchronously, just before `events()` would wait (so
  every event already available goes out in one ASGI `send`);
- `receive()` is driven by future callbacks rather than by a task (`_watch`), so
  a client that goes away is noticed while `events()` waits;
- keep-alive pings come from one timer handle.

A write the socket cannot take at once (the client reads slowly) is finished by
a short-lived writer task that exits once the buffer is written; so does a ping.

**With a writer task** (any other server or middleware that wraps `receive()`,
and trio): the writer task (`Connection.run_writer`) sends everything buffered,
sends the pings, and waits on `receive()` in between.

Either way one writer sends at a time, so two sends never overlap. When the
buffer passes `HIGH_WATER` bytes the request task waits for the writer to take
it (backpressure: a view never gets further ahead of a slow client than that).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.lowlevel
import sniffio
from starlette.types import Message, Receive, Send

from ._lifecycle import DisconnectReason

if TYPE_CHECKING:
    from ._broadcast import Attachment
    from ._lifecycle import ShutdownSignal
    from ._views import EventStreamView

logger = logging.getLogger("sseviews")

# Bytes buffered before the producer waits for the writer. Large enough that a
# view yielding small events as fast as it can is written in few sends.
HIGH_WATER = 64 * 1024
# A writer that has not waited on receive() for LISTEN_INTERVAL, because it always
# had something to flush (events() never waits and each send yields, as under
# Starlette's BaseHTTPMiddleware), listens for up to LISTEN_WAIT before flushing
# again, so a disconnect is still noticed: at most a 2.5% pause (seconds).
LISTEN_INTERVAL = 0.2
LISTEN_WAIT = 0.005
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
# Servers whose receive() only awaits plain asyncio futures, so it can be driven by
# callbacks, outside any task (see Connection._watch).
_CALLBACK_SAFE_RECEIVERS = frozenset(
    {
        "uvicorn.protocols.http.httptools_impl.RequestResponseCycle",
        "uvicorn.protocols.http.h11_impl.RequestResponseCycle",
    }
)


def callback_safe(receive: Receive) -> bool:
    """Whether `receive` can be driven by future callbacks instead of a task.

    True for the bound `receive` of a known server cycle, or of a class that
    declares `_sseviews_callback_safe = True`; a middleware that wraps
    `receive()` makes it False, so the stream gets a writer task.
    """
    owner = getattr(receive, "__self__", None)
    if owner is None or getattr(receive, "__name__", None) != "receive":
        return False
    cls = type(owner)
    if getattr(cls, "_sseviews_callback_safe", False):
        return True
    return f"{cls.__module__}.{cls.__qualname__}" in _CALLBACK_SAFE_RECEIVERS


class _Resume:
    """Finish awaiting a coroutine that was stepped once synchronously and suspended.

    A `send` started by a publisher or by the request task is finished this way
    in the writer task (the socket's buffer was full); a step of `events()` is
    finished this way in the request task, after the buffer was written.
    """

    __slots__ = ("coro", "events", "first", "size")

    def __init__(self, coro: Any, first: Any, events: int = 0, size: int = 0) -> None:
        self.coro = coro
        self.first = first
        self.events = events  # the events it carries, counted once the send completes
        self.size = size  # ... and their bytes

    def __await__(self) -> Generator[Any, Any, Any]:
        # The object is its own iterator: no generator (and frame) per await.
        return cast("Generator[Any, Any, Any]", self)

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        first = self.first
        if first is not _TAKEN:  # the step already taken: hand its result up first
            self.first = _TAKEN
            return first
        return self.coro.send(value)

    def throw(self, error: Any, value: Any = None, traceback: Any = None) -> Any:
        try:
            if value is None and traceback is None:
                return self.coro.throw(error)
            return self.coro.throw(error, value, traceback)
        finally:
            # The error goes on up with this frame in its traceback: holding it
            # here too would make a reference cycle that only the GC can free.
            del error, value, traceback

    def close(self) -> None:
        self.coro.close()


_TAKEN: Any = object()

_NO_BACKLOG: list[bytes] = []


def _fire(wake: anyio.CancelScope | asyncio.Future[None]) -> None:
    if isinstance(wake, asyncio.Future):
        if not wake.done():
            wake.set_result(None)
    else:
        wake.cancel()


class Connection:
    """The state of one open stream, shared by its request task and its writer task."""

    __slots__ = (
        "_broken",
        "_finishing",
        "_held",
        "_listened",
        "_loop",
        "_pending_send",
        "_ping_due",
        "_ping_timer",
        "_send_scope",
        "_shutdown_deadline",
        "_space",
        "_wake",
        "_watching",
        "_writer",
        "backlog",
        "buffer",
        "buffered",
        "counters",
        "direct",
        "events_scope",
        "floor",
        "last_write",
        "lean",
        "max_bytes",
        "max_events",
        "max_pending",
        "ping_interval",
        "reason",
        "receive",
        "send",
        "send_timeout",
        "shutdown",
        "shutting_down",
        "view",
    )

    def __init__(
        self,
        view: EventStreamView,
        receive: Receive,
        send: Send,
        shutdown: ShutdownSignal | None = None,
    ) -> None:
        self.view = view
        self.shutdown = shutdown  # the server's, when it has one
        self.receive = receive
        self.send = send
        self.ping_interval: float | None = view.ping_interval
        self.send_timeout: float | None = view.send_timeout
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.reason: DisconnectReason | None = None
        # The scope that stops events(); made only by open_events_scope(), since a
        # view that streams its groups directly never runs events().
        self.events_scope: anyio.CancelScope | None = None
        self._shutdown_deadline = math.inf
        self.last_write = 0.0
        self.shutting_down = False
        # What wakes the idle writer: its listen scope, or (lean) the future it awaits.
        self._wake: anyio.CancelScope | asyncio.Future[None] | None = None
        self._space: anyio.Event | None = None
        self._finishing = False
        self._broken = False  # a write failed or timed out: nothing more is written
        self._listened = 0.0  # when the writer last waited on receive()
        self._loop = (
            asyncio.get_running_loop() if sniffio.current_async_library() == "asyncio" else None
        )
        # Lean: no writer task while the stream idles (see the module docstring).
        self.lean = self._loop is not None and callback_safe(receive)
        self._watching: Any = None  # the receive() coroutine in flight (lean)
        self._writer: asyncio.Task[None] | None = None  # lean: the short-lived writer
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_due = False
        # Broadcast state: set when this connection is a sink of its view's groups.
        self.direct = False  # no events() task: group events go straight to the writer
        self.floor = 0  # highest seq sent (or replayed); older offers are duplicates
        # The replay, written paced, outside the bound: a shared empty list until
        # start_live() gives this stream its own (never mutated while empty).
        self.backlog: list[bytes] = _NO_BACKLOG
        self._held: list[tuple[int, bytes]] | None = None  # live events during attach
        self._pending_send: _Resume | None = None
        self._send_scope: anyio.CancelScope | None = None  # the write in flight
        self.max_events: int = view.max_buffer_events
        self.max_bytes: int = view.max_buffer_bytes
        self.counters = view._counters
        # Events events() may get ahead of the client (lowered to max_events when
        # events() relays a subscription, so that group events stay bounded).
        self.max_pending = 1 << 30

    def clock(self) -> float:
        """The clock of anyio's deadlines, read cheaply.

        On asyncio it is loop.time(), read directly: anyio.current_time() costs
        ~20x more, once per fan-out write. (A method rather than a stored bound
        method: one object less for the garbage collector on every open stream.)
        """
        loop = self._loop
        return loop.time() if loop is not None else anyio.current_time()

    # -- called by the request task -------------------------------------------------

    def push(self, data: bytes) -> bool:
        """Buffer one encoded message; return True when the caller must `wait_for_space()`."""
        buffer = self.buffer
        buffer.append(data)
        self.buffered += len(data)
        if self._wake is not None:
            self._wake_later()
        return self.buffered >= HIGH_WATER or len(buffer) >= self.max_pending

    def _wake_later(self) -> None:
        """Wake the idle writer once the producer yields to the event loop.

        Deferring by one loop iteration lets a `receive()` that is already
        completing (a disconnect) win over the wake-up, so a view that yields
        without ever waiting cannot keep the writer from noticing that its client
        left. The producer yields before events sit anywhere, so no latency is added.
        """
        wake = self._wake
        if wake is not None and self._loop is not None:
            self._wake = None
            self._loop.call_soon(_fire, wake)
        else:
            self._wake_now()

    def _wake_now(self) -> None:
        """Wake the writer if it is idle (waiting on `receive()`, or lean: on its future)."""
        wake = self._wake
        if wake is not None:
            self._wake = None
            _fire(wake)

    async def wait_for_space(self) -> None:
        """Wait until the writer has taken the buffer."""
        if self.buffered < HIGH_WATER and len(self.buffer) < self.max_pending:
            return
        if self.lean and self._writer is None:
            self.flush_now()
            if self._writer is None:
                # Written at once; still yield, so that a view that never waits
                # cannot hold the event loop (and a disconnect is still noticed).
                await asyncio.sleep(0)
                return
        space = self._space = anyio.Event()
        await space.wait()

    def flush_now(self) -> None:
        """(lean) Write the buffer from the request task, just before `events()` waits.

        On a socket with room the write completes within this call. Otherwise a
        short-lived writer task finishes it, under `send_timeout`, and writes what
        is buffered meanwhile.
        """
        buffer = self.buffer
        if not buffer or self._writer is not None:
            return
        if self.reason in DROP_REASONS:  # nobody to write to
            buffer.clear()
            self.buffered = 0
            return
        events, data = self._take_buffer()
        message: Message = {"type": "http.response.body", "body": data, "more_body": True}
        started = self._start_send(self.send(message), events, len(data))
        if isinstance(started, _Resume):
            self._pending_send = started
            self._start_writer()

    def _start_writer(self) -> None:
        assert self._loop is not None
        self._writer = self._loop.create_task(self._write_on())

    async def _write_on(self) -> None:
        """(lean) The short-lived writer task: finish the write in flight, write the rest."""
        try:
            await self.run_writer(on_demand=True)
        finally:
            self._writer = None
            self._release_space()

    async def end(self) -> None:
        """(lean) After `events()`: wait for the writer task, then end the response."""
        writer = self._writer
        if writer is not None:
            await asyncio.wait((writer,))
        await self.run_writer()

    async def stop_writer(self) -> None:
        """(lean) Cancel the writer task, if one is still running, and wait for it."""
        writer = self._writer
        if writer is not None and not writer.done():
            writer.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait((writer,))

    # -- lean: receive() by callbacks, pings by a timer ---------------------------

    def watch(self) -> None:
        """(lean) Wait on `receive()` by future callbacks: a disconnect stops the stream."""
        self._watching = self.receive()
        self._watch_step()

    def _watch_step(self, _: object = None) -> None:
        assert self._loop is not None
        for _turn in range(8):
            watching = self._watching
            if watching is None:  # stopped: a stale callback
                return
            try:
                waiting = watching.send(None)
            except StopIteration as done:
                message = done.value
                if not isinstance(message, dict) or message.get("type") != "http.request":
                    self._watching = None
                    self.stop(DisconnectReason.CLIENT_CLOSED)
                    return
                # A request body chunk: nothing to do with it; read on.
                self._watching = self.receive()
                continue
            except Exception:
                self._watching = None
                logger.exception("%s: receive() failed; ending the stream", self.view.describe())
                self.stop(DisconnectReason.ERROR)
                return
            if waiting is None:  # a bare yield (sleep(0)): step again on the next turn
                self._loop.call_soon(self._watch_step)
            elif getattr(waiting, "_asyncio_future_blocking", False):
                waiting._asyncio_future_blocking = False
                waiting.add_done_callback(self._watch_step)
            else:
                self._watching = None
                watching.close()
                logger.error(
                    "%s: receive() awaited %r, not an asyncio future; ending the stream",
                    self.view.describe(),
                    waiting,
                )
                self.stop(DisconnectReason.ERROR)
            return
        self._loop.call_soon(self._watch_step)  # chunk after chunk: let the loop breathe

    def _unwatch(self) -> None:
        watching, self._watching = self._watching, None
        if watching is not None:
            watching.close()

    def arm_ping(self) -> None:
        """(lean) Schedule the next keep-alive check, `ping_interval` after the last write."""
        interval = self.ping_interval
        if interval is not None and self._loop is not None:
            self._ping_timer = self._loop.call_at(self.last_write + interval, self._ping_fire)

    def _ping_fire(self) -> None:
        self._ping_timer = None
        if self.reason is not None or self._finishing:
            return
        assert self.ping_interval is not None
        if self.last_write + self.ping_interval - self.clock() > 0.001:
            self.arm_ping()  # written since: a whole interval from that write
            return
        self._ping_due = True
        if self.direct:
            self._wake_now()  # the request task is the writer
        elif self._writer is None:
            self._start_writer()

    def finish(self) -> None:
        """Ask the writer to send what is buffered, end the response and return."""
        self._finishing = True
        self._wake_now()

    # -- called from anywhere in the event loop thread ---------------------------------

    def stop(self, reason: DisconnectReason) -> None:
        """End the stream for `reason` (the first reason given wins)."""
        if self.reason is None:
            self.reason = reason
        if self.events_scope is not None:
            self.events_scope.cancel()
        self._wake_now()
        sending = self._send_scope
        if sending is not None:
            if reason in DROP_REASONS:
                sending.cancel()
            else:
                # A write stuck on a client that stopped reading must not hold
                # the stream (or the server's shutdown) for the whole send_timeout.
                sending.deadline = min(sending.deadline, self.clock() + SHUTDOWN_WRITE_TIMEOUT)

    # -- the broadcast sink ---------------------------------------------------------

    def hold(self) -> None:
        """Hold back live events until `start_live()` (while the replay is read)."""
        self._held = []

    def start_live(self, attachment: Attachment) -> None:
        """Queue the replay (or reset event), then the held live events after it."""
        backlog = [attachment.reset.encode()] if attachment.reset is not None else []
        backlog.extend(attachment.backlog)
        self.backlog = backlog
        self.floor = attachment.floor
        held, self._held = self._held or [], None
        for seq, wire in held:
            self.offer(seq, wire)

    def offer(self, seq: int, wire: bytes) -> None:
        """Take one group event (called synchronously by the broadcast's fan-out)."""
        if seq <= self.floor or self.reason is not None:
            return
        held = self._held
        if held is not None:
            held.append((seq, wire))
            if len(held) > self.max_events:
                self._slow()
            return
        self.floor = seq
        if (
            self._wake is not None
            and not self.buffer
            and not self.backlog
            and self._pending_send is None
            and not self._finishing
        ):
            self._write_now(wire)
            return
        self.buffer.append(wire)
        self.buffered += len(wire)
        if len(self.buffer) > self.max_events or self.buffered > self.max_bytes:
            self._slow()
            return
        self._wake_now()

    def _start_send(self, sending: Any, events: int = 0, size: int = 0) -> _Resume | bool:
        """Run a send until it first has to wait.

        On a socket with room, ASGI servers write synchronously and the send's
        coroutine finishes in this one step: no timeout scope, no task switch.
        Returns True when it is done, False when it failed (the stream is then
        stopped), or the `_Resume` that finishes it where waiting is allowed.
        """
        try:
            first = sending.send(None)
        except StopIteration:
            self.last_write = self.clock()
            self._count(events, size)
            return True
        except Exception as exc:
            return self._send_failed(exc)
        return _Resume(sending, first, events, size)

    def _send_failed(self, error: Exception) -> bool:
        """A send raised: end the stream, with nothing more written; return False."""
        self._broken = True
        if isinstance(error, OSError):
            # Some servers raise once the peer is gone; uvicorn just drops the write.
            self.stop(DisconnectReason.CLIENT_CLOSED)
        else:
            logger.error("sending to the client failed; ending the stream", exc_info=error)
            self.stop(DisconnectReason.ERROR)
        return False

    def _write_now(self, wire: bytes) -> None:
        # The writer is idle, so nobody else is sending: start the send right here,
        # which saves waking a task per event when the socket has room.
        started = self._start_send(
            self.send({"type": "http.response.body", "body": wire, "more_body": True}), 1, len(wire)
        )
        if isinstance(started, _Resume):
            # The socket is full: the writer task finishes this send, under send_timeout.
            self._pending_send = started
            self._wake_now()

    def _slow(self) -> None:
        logger.warning(
            "%s: slow consumer: more than %d events or %d bytes waiting; disconnecting "
            "(the client resumes from its Last-Event-ID)",
            self.view.describe(),
            self.max_events,
            self.max_bytes,
        )
        self.buffer.clear()
        self.buffered = 0
        self._held = None
        self.stop(DisconnectReason.SLOW_CONSUMER)

    def fail(self, error: BaseException) -> None:
        """End the stream because the broadcast backend failed."""
        self.stop(DisconnectReason.ERROR)

    def close(self) -> None:
        """Release what the stream still holds: a half-finished send, the listener, the timer."""
        pending, self._pending_send = self._pending_send, None
        if pending is not None:
            pending.coro.close()
        self._unwatch()
        timer, self._ping_timer = self._ping_timer, None
        if timer is not None:
            timer.cancel()

    def open_events_scope(self) -> anyio.CancelScope:
        """Make the scope that stops events(), already stopped if the stream was."""
        scope = self.events_scope = anyio.CancelScope(deadline=self._shutdown_deadline)
        if self.reason is not None:
            scope.cancel()
        return scope

    def begin_shutdown(self) -> None:
        """Start ending this stream because the server is shutting down."""
        if self.shutting_down:
            return
        self.shutting_down = True
        grace = self.view.shutdown_grace_period
        if grace > 0 and not self.direct:
            # events() may go on for the grace period to send a farewell and return.
            limit = self._shutdown_deadline = self.clock() + grace
            if self.events_scope is not None:
                self.events_scope.deadline = min(self.events_scope.deadline, limit)
            sending = self._send_scope
            if sending is not None:
                # ... but a write stuck on a client that stopped reading may not.
                sending.deadline = min(sending.deadline, limit + SHUTDOWN_WRITE_TIMEOUT)
        else:
            self.stop(DisconnectReason.SHUTDOWN)

    # -- the writer task ----------------------------------------------------------

    async def send_body(self, data: bytes, *, more_body: bool = True) -> bool:
        """Send one body chunk; return False (and stop the stream) if it could not be sent."""
        message: Message = {"type": "http.response.body", "body": data, "more_body": more_body}
        return await self.send_bounded(self.send(message))

    async def send_bounded(self, sending: Any) -> bool:
        """Send under `send_timeout`; False (and the stream stopped) if it failed.

        `sending` is a send coroutine not yet started, or a `_Resume` (which
        counts the events it carries once it completes).
        """
        if not isinstance(sending, _Resume):
            started = self._start_send(sending)
            if not isinstance(started, _Resume):
                return started
            sending = started
        timeout = self.send_timeout
        if self.shutting_down or self.reason is not None:
            timeout = min(timeout or math.inf, SHUTDOWN_WRITE_TIMEOUT)
        try:
            with anyio.move_on_after(math.inf if timeout is None else timeout) as scope:
                self._send_scope = scope
                try:
                    await sending
                finally:
                    self._send_scope = None
            if scope.cancelled_caught:
                self._broken = True
                if self.reason is None:
                    self.stop(DisconnectReason.SEND_TIMEOUT)
                return False
        except Exception as exc:
            return self._send_failed(exc)
        self.last_write = self.clock()
        self._count(sending.events, sending.size)
        return True

    async def _send_backlog(self) -> bool:
        # The replay goes out in slices, so it is paced by the client's reading
        # (send_timeout applies) and never held twice in memory.
        backlog = self.backlog
        size = 0
        count = 0
        for wire in backlog:
            size += len(wire)
            count += 1
            if size >= HIGH_WATER:
                break
        chunk = b"".join(backlog[:count])
        del backlog[:count]
        if not await self.send_body(chunk):
            return False
        self._count(count, len(chunk))
        await anyio.lowlevel.checkpoint()
        return True

    def _count(self, events: int, size: int) -> None:
        counters = self.counters
        if counters is not None:
            counters.events += events
            counters.bytes += size

    def _take_buffer(self) -> tuple[int, bytes]:
        """Empty the buffer: how many events it held, and their bytes joined."""
        buffer = self.buffer
        events = len(buffer)
        data = buffer[0] if events == 1 else b"".join(buffer)
        buffer.clear()
        self.buffered = 0
        return events, data

    def _release_space(self) -> None:
        """Wake a producer waiting in `wait_for_space()`."""
        space = self._space
        if space is not None:
            self._space = None
            space.set()

    async def flush(self) -> bool:
        events, data = self._take_buffer()
        self._release_space()
        if not await self.send_body(data):
            return False
        self._count(events, len(data))
        return True

    async def _listen(self, deadline: float, *, wakeable: bool) -> bool:
        """Wait on `receive()` until `deadline` (or a wake-up); False once disconnected."""
        try:
            with anyio.CancelScope(deadline=deadline) as wait:
                self._wake = wait if wakeable else None
                message = await self.receive()
                self._wake = None
                if message["type"] == "http.disconnect":
                    self.stop(DisconnectReason.CLIENT_CLOSED)
                    return False
                # Anything else is a request body chunk: nothing to do with it.
        finally:
            self._wake = None
            # Measured from the end: on a loop so busy that a turn takes longer than
            # LISTEN_INTERVAL, a listen measured from its start would be due again
            # at once, and the writer would never get back to writing.
            self._listened = self.clock()
        return True

    async def run_writer(self, *, on_demand: bool = False) -> None:
        """Write buffered events and pings until the stream ends.

        With `on_demand` (lean: the short-lived writer task) it returns as soon as
        nothing is left to write, and never ends the response.
        """
        ping_interval = self.ping_interval
        lean = self.lean
        self._listened = self.clock()
        while True:
            reason = self.reason
            if reason in DROP_REASONS or self._broken:
                return
            pending = self._pending_send
            if pending is not None:
                self._pending_send = None
                if not await self.send_bounded(pending):  # counts its events
                    return
                continue
            if (
                not lean
                and (self.buffer or self.backlog)
                and not self._finishing
                and self.clock() - self._listened >= LISTEN_INTERVAL
            ):
                # Busy flushing for LISTEN_INTERVAL without waiting on receive().
                if not await self._listen(self.clock() + LISTEN_WAIT, wakeable=False):
                    return
                continue
            if self.backlog:
                if not await self._send_backlog():
                    return
                continue
            if self.buffer:
                if not await self.flush():
                    return
                continue
            if lean:
                if self._ping_due:
                    self._ping_due = False
                    if not await self._send_ping():
                        return
                    self.arm_ping()
                    continue
                if on_demand:
                    return
            if self._finishing or (reason is not None and self.direct):
                await self.send_body(b"", more_body=False)
                return
            if lean:
                # The listener and the ping timer run by callbacks: just wait to be woken.
                assert self._loop is not None
                waiting = self._wake = self._loop.create_future()
                try:
                    await waiting
                finally:
                    self._wake = None
                continue
            deadline = math.inf if ping_interval is None else self.last_write + ping_interval
            if not await self._listen(deadline, wakeable=True):
                return
            if (
                ping_interval is not None
                and not self.buffer
                and not self._finishing
                and self.clock() - self.last_write >= ping_interval
            ):
                if not await self._send_ping():
                    return

    async def _send_ping(self) -> bool:
        ping = self.view.ping_message().encode()
        if not await self.send_body(ping):
            return False
        counters = self.counters
        if counters is not None:
            counters.pings += 1
            counters.bytes += len(ping)
        return True
