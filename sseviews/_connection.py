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

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from starlette.types import Message, Receive, Send

from ._lifecycle import DisconnectReason

if TYPE_CHECKING:
    from ._views import EventStreamView

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


class Connection:
    """The state of one open stream, shared by its request task and its writer task."""

    __slots__ = (
        "_finishing",
        "_space",
        "_wake",
        "buffer",
        "buffered",
        "events_scope",
        "last_write",
        "on_stop",
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
        self.events_scope = anyio.CancelScope()
        self.last_write = 0.0
        self.shutting_down = False
        self.on_stop: Callable[[DisconnectReason], None] | None = None
        self._wake: anyio.CancelScope | None = None
        self._space: anyio.Event | None = None
        self._finishing = False

    # -- called by the request task -------------------------------------------------

    def push(self, data: bytes) -> bool:
        """Buffer one encoded message; return True when the caller must `wait_for_space()`."""
        self.buffer.append(data)
        self.buffered += len(data)
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.cancel()
        return self.buffered >= HIGH_WATER

    async def wait_for_space(self) -> None:
        """Wait until the writer has taken the buffer."""
        if self.buffered < HIGH_WATER:
            return
        space = self._space = anyio.Event()
        await space.wait()

    def finish(self) -> None:
        """Ask the writer to send what is buffered, end the response and return."""
        self._finishing = True
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.cancel()

    # -- called from anywhere in the event loop thread ---------------------------------

    def stop(self, reason: DisconnectReason) -> None:
        """End the stream for `reason` (the first reason given wins)."""
        if self.reason is None:
            self.reason = reason
            if self.on_stop is not None:
                self.on_stop(reason)
        self.events_scope.cancel()

    def begin_shutdown(self) -> None:
        """Start ending this stream because the server is shutting down."""
        if self.shutting_down:
            return
        self.shutting_down = True
        grace = self.view.shutdown_grace_period
        if grace > 0:
            # events() may go on for the grace period to send a farewell and return.
            self.events_scope.deadline = min(
                self.events_scope.deadline, anyio.current_time() + grace
            )
        else:
            self.stop(DisconnectReason.SHUTDOWN)

    # -- the writer task ----------------------------------------------------------

    async def send_body(self, data: bytes, *, more_body: bool = True) -> bool:
        """Send one body chunk; return False (and stop the stream) if it could not be sent."""
        message: Message = {"type": "http.response.body", "body": data, "more_body": more_body}
        timeout = self.send_timeout
        if self.shutting_down or self.reason is not None:
            timeout = min(timeout or math.inf, SHUTDOWN_WRITE_TIMEOUT)
        try:
            if timeout is None:
                await self.send(message)
            else:
                with anyio.move_on_after(timeout) as scope:
                    await self.send(message)
                if scope.cancelled_caught:
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
        self.last_write = anyio.current_time()
        return True

    async def flush(self) -> bool:
        buffer = self.buffer
        data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self.buffered = 0
        space = self._space
        if space is not None:
            self._space = None
            space.set()
        return await self.send_body(data)

    async def run_writer(self) -> None:
        """Write buffered events and pings until the stream ends."""
        receive = self.receive
        ping_interval = self.ping_interval
        while True:
            if self.reason in DROP_REASONS:
                return
            if self.buffer:
                if not await self.flush():
                    return
                continue
            if self._finishing:
                await self.send_body(b"", more_body=False)
                return
            deadline = math.inf if ping_interval is None else self.last_write + ping_interval
            with anyio.CancelScope(deadline=deadline) as wait:
                self._wake = wait
                message = await receive()
                self._wake = None
                if message["type"] == "http.disconnect":
                    self.stop(DisconnectReason.CLIENT_CLOSED)
                    return
                continue  # a request body chunk: nothing to do with it
            self._wake = None
            if (
                ping_interval is not None
                and not self.buffer
                and not self._finishing
                and anyio.current_time() - self.last_write >= ping_interval
            ):
                if not await self.send_body(self.view.ping_message().encode()):
                    return
