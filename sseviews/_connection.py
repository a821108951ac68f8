"""The per-connection writer: the one place that writes a stream to the socket.

Each open stream has two tasks:

- the request task, which iterates the view's `events()`, encodes what it yields
  and appends the bytes to this connection's buffer;
- the writer task (`Connection.run_writer`), which sends everything buffered in
  one ASGI `send`, sends keep-alive pings when nothing else was sent for
  `ping_interval`, and waits on `receive()` in between, so a client that goes
  away is noticed even while the stream is idle.

Only the writer sends while the stream runs, so two sends never overlap. When the
buffer passes `high_water` bytes the request task waits for the writer to take
it (backpressure: a view never gets further ahead of a slow client than that).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import sniffio
from starlette.types import Message, Receive, Send

from ._lifecycle import DisconnectReason

if TYPE_CHECKING:
    from ._broadcast import Attachment
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


class _Resume:
    """Finish, in the writer task, a `send` coroutine that suspended when it was
    started synchronously by a publisher (the socket's buffer was full)."""

    __slots__ = ("coro", "first", "size")

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any, size: int) -> None:
        self.coro = coro
        self.first = first
        self.size = size  # the event's bytes, counted once the send completes

    def __await__(self) -> Generator[Any, Any, None]:
        coro = self.coro
        pending = self.first
        while True:
            try:
                value = yield pending
            except BaseException as exc:  # cancellation thrown into the writer
                try:
                    pending = coro.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                pending = coro.send(value)
            except StopIteration:
                return


class Connection:
    """The state of one open stream, shared by its request task and its writer task."""

    __slots__ = (
        "_finishing",
        "_held",
        "_listened",
        "_loop",
        "_pending_send",
        "_send_scope",
        "_shutdown_deadline",
        "_space",
        "_wake",
        "backlog",
        "buffer",
        "buffered",
        "clock",
        "counters",
        "direct",
        "events_scope",
        "floor",
        "last_write",
        "max_bytes",
        "max_events",
        "max_pending",
        "ping_interval",
        "reason",
        "receive",
        "send",
        "send_timeout",
        "shutting_down",
        "view",
    )

    def __init__(self, view: EventStreamView, receive: Receive, send: Send) -> None:
        self.view = view
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
        self._wake: anyio.CancelScope | None = None
        self._space: anyio.Event | None = None
        self._finishing = False
        self._listened = 0.0  # when the writer last waited on receive()
        self._loop = (
            asyncio.get_running_loop() if sniffio.current_async_library() == "asyncio" else None
        )
        # The clock of anyio's deadlines. On asyncio that is loop.time(), read
        # directly: self.clock() costs ~20x more, once per fan-out write.
        self.clock: Callable[[], float] = (
            self._loop.time if self._loop is not None else anyio.current_time
        )
        # Broadcast state: set when this connection is a sink of its view's groups.
        self.direct = False  # no events() task: group events go straight to the writer
        self.floor = 0  # highest seq sent (or replayed); older offers are duplicates
        self.backlog: list[bytes] = []  # the replay, written paced, outside the bound
        self._held: list[tuple[int, bytes]] | None = None  # live events during attach
        self._pending_send: _Resume | None = None
        self._send_scope: anyio.CancelScope | None = None  # the write in flight
        self.max_events: int = view.max_buffer_events
        self.max_bytes: int = view.max_buffer_bytes
        self.counters = view._counters
        # Events events() may get ahead of the client (lowered to max_events when
        # events() relays a subscription, so that group events stay bounded).
        self.max_pending = 1 << 30

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
            self._loop.call_soon(wake.cancel)
        else:
            self._wake_now()

    def _wake_now(self) -> None:
        """Wake the writer if it is idle, waiting on `receive()`."""
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.cancel()

    async def wait_for_space(self) -> None:
        """Wait until the writer has taken the buffer."""
        if self.buffered < HIGH_WATER and len(self.buffer) < self.max_pending:
            return
        space = self._space = anyio.Event()
        await space.wait()

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
        if attachment.reset is not None:
            self.backlog.append(attachment.reset.encode())
        self.backlog.extend(attachment.backlog)
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

    def _start_send(self, sending: Any, size: int) -> _Resume | bool:
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
            self._count(1 if size else 0, size)
            return True
        except OSError:
            # Some servers raise once the peer is gone; uvicorn just drops the write.
            self.stop(DisconnectReason.CLIENT_CLOSED)
            return False
        except Exception:
            logger.exception("sending to the client failed; ending the stream")
            self.stop(DisconnectReason.ERROR)
            return False
        return _Resume(sending, first, size)

    def _write_now(self, wire: bytes) -> None:
        # The writer is idle, so nobody else is sending: start the send right here,
        # which saves waking a task per event when the socket has room.
        started = self._start_send(
            self.send({"type": "http.response.body", "body": wire, "more_body": True}), len(wire)
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
        """Release what the stream still holds (a half-finished send)."""
        pending, self._pending_send = self._pending_send, None
        if pending is not None:
            pending.coro.close()

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

    async def send_bounded(self, sending: Any, size: int = 0) -> bool:
        """Send under `send_timeout`; False (and the stream stopped) if it failed.

        `sending` is a send coroutine not yet started, or a `_Resume`; `size` is
        the event bytes it carries, counted once it completes.
        """
        if not isinstance(sending, _Resume):
            started = self._start_send(sending, size)
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
                if self.reason is None:
                    self.stop(DisconnectReason.SEND_TIMEOUT)
                return False
        except OSError:
            # Some servers raise once the peer is gone; uvicorn just drops the write.
            self.stop(DisconnectReason.CLIENT_CLOSED)
            return False
        except Exception:
            logger.exception("sending to the client failed; ending the stream")
            self.stop(DisconnectReason.ERROR)
            return False
        self.last_write = self.clock()
        self._count(1 if sending.size else 0, sending.size)
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

    async def flush(self) -> bool:
        buffer = self.buffer
        events = len(buffer)
        data = buffer[0] if events == 1 else b"".join(buffer)
        buffer.clear()
        self.buffered = 0
        space = self._space
        if space is not None:
            self._space = None
            space.set()
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

    async def run_writer(self) -> None:
        """Write buffered events and pings until the stream ends."""
        ping_interval = self.ping_interval
        self._listened = self.clock()
        while True:
            reason = self.reason
            if reason in DROP_REASONS:
                return
            pending = self._pending_send
            if pending is not None:
                self._pending_send = None
                if not await self.send_bounded(pending):  # counts its event
                    return
                continue
            if (
                (self.buffer or self.backlog)
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
            if self._finishing or (reason is not None and self.direct):
                await self.send_body(b"", more_body=False)
                return
            deadline = math.inf if ping_interval is None else self.last_write + ping_interval
            if not await self._listen(deadline, wakeable=True):
                return
            if (
                ping_interval is not None
                and not self.buffer
                and not self._finishing
                and self.clock() - self.last_write >= ping_interval
            ):
                ping = self.view.ping_message().encode()
                if not await self.send_body(ping):
                    return
                if self.counters is not None:
                    self.counters.pings += 1
                    self.counters.bytes += len(ping)
