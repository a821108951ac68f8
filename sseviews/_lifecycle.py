"""Why a stream ended, and how a server tells its open streams that it is shutting down.

Shutdown state belongs to one server, never to the process: a `ShutdownSignal`
is found per request, either in the ASGI scope (put there by `ShutdownMiddleware`
or by the test client) or, under uvicorn, on the running `uvicorn.Server` itself.
Two servers started one after another in one process each get their own.

Under uvicorn, sseviews chains a handler in front of the server's SIGTERM/SIGINT
handler at the first request, so the streams are told to end before uvicorn
starts its own shutdown (which then waits for them). Under other servers,
`ShutdownMiddleware(app, handle_signals=True)` chains one with its own signal, and
holds the server's handler until the streams have ended; its state lives on the
middleware instance.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

import anyio
import sniffio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._reserved import SHUTDOWN_KEY

__all__ = [
    "DisconnectReason",
    "ShutdownMiddleware",
    "ShutdownSignal",
    "Stoppable",
    "find_shutdown_signal",
    "register_stream",
    "unregister_stream",
]

logger = logging.getLogger("sseviews")

# How often the uvicorn watcher looks at `Server.should_exit`, in seconds. uvicorn
# waits 0.1 s after should_exit before it starts waiting on connections, so polling
# at half that ends the streams before it looks.
_UVICORN_POLL = 0.05
_UVICORN_ATTR = "_sseviews_shutdown_signal"


class DisconnectReason(enum.StrEnum):
    """Why a stream ended; passed to `EventStreamView.on_disconnect`."""

    #: The client closed the connection (or the test client left its `stream` block).
    CLIENT_CLOSED = "client_closed"
    #: `events()` returned.
    COMPLETED = "completed"
    #: The server is shutting down.
    SHUTDOWN = "shutdown"
    #: One write blocked for longer than `send_timeout`: the client stopped reading.
    SEND_TIMEOUT = "send_timeout"
    #: The client fell further behind its group events than the connection's buffer allows.
    SLOW_CONSUMER = "slow_consumer"
    #: `events()` raised, or an event could not be encoded.
    ERROR = "error"
    #: The stream's token expired (see `EventStreamView.tokens`); the last message
    #: sent was an `EXPIRED_EVENT`.
    EXPIRED = "expired"
    #: The stream reached its `max_lifetime`; the browser reconnects with its
    #: `Last-Event-ID`, maybe to another worker.
    LIFETIME = "lifetime"


class Stoppable(Protocol):
    """What a shutdown signal needs of an open stream."""

    def begin_shutdown(self) -> None: ...


class ShutdownSignal:
    """The shutdown state of one server.

    Call `trigger()` when the server starts shutting down: every stream that uses
    this signal ends (after its view's `shutdown_grace_period`), and a stream
    requested after that gets `200` and an immediate clean end, so that the
    browser's `EventSource` reconnects (to a server that is still running) instead
    of giving up, as it would on `503`. Under uvicorn sseviews finds and triggers
    one automatically; with other servers, use `ShutdownMiddleware`.

    `trigger()` must be called from the event loop thread; from a signal handler or
    another thread use `loop.call_soon_threadsafe(signal.trigger)`.
    """

    __slots__ = ("__weakref__", "_drained", "_streams", "_triggered")

    def __init__(self) -> None:
        self._streams: set[Stoppable] = set()
        self._triggered = False
        self._drained: list[Callable[[], object]] = []

    @property
    def is_set(self) -> bool:
        """Whether shutdown has started."""
        return self._triggered

    @property
    def open_streams(self) -> int:
        """How many streams are registered with this signal right now."""
        return len(self._streams)

    def trigger(self) -> None:
        """Start shutdown: end every open stream that uses this signal."""
        if self._triggered:
            return
        self._triggered = True
        if self._streams:
            logger.info("shutdown: ending %d open stream(s)", len(self._streams))
        for stream in list(self._streams):
            stream.begin_shutdown()
        self._notify_drained()

    def _when_drained(self, callback: Callable[[], object]) -> None:
        """Call `callback` once shutdown has started and every stream has ended."""
        self._drained.append(callback)
        self._notify_drained()

    def _notify_drained(self) -> None:
        if self._triggered and not self._streams:
            callbacks, self._drained = self._drained, []
            for callback in callbacks:
                callback()


class ShutdownMiddleware:
    """ASGI middleware that hands a `ShutdownSignal` to every stream below it.

    Use it with ASGI servers other than uvicorn (hypercorn, granian, daphne, ...).
    With `handle_signals=True` it triggers the signal itself when the process gets
    SIGTERM or SIGINT, and hands the signal on to the server once the streams have
    ended:

        app = ShutdownMiddleware(app, handle_signals=True)

    Otherwise trigger the signal from the server's own shutdown hook:

        shutdown = ShutdownSignal()
        app = ShutdownMiddleware(app, shutdown)

    Either way, the ASGI lifespan shutdown triggers the signal too (if nothing did
    before), and reaches the app only once every stream has ended (or 30 s later),
    so the app's own shutdown code runs after the streams' `on_disconnect`.

    Args:
        app: The ASGI app to wrap.
        signal: The signal to hand out; a new one when omitted (see `.signal`).
        handle_signals: Put a handler in front of the SIGTERM and SIGINT handlers
            that the server installed. On the first of those signals it triggers
            `signal`, and calls the server's handler once every stream has ended
            (so `shutdown_grace_period` works under every server), or at the
            latest 30 s later; a second signal is handed on at once. It is installed
            once, at lifespan startup or else at the first request, in the process
            that serves the app (each worker has its own), on asyncio. A signal
            that the server leaves at its default action, or ignores, is left alone.
    """

    def __init__(
        self, app: ASGIApp, signal: ShutdownSignal | None = None, *, handle_signals: bool = False
    ) -> None:
        self.app = app
        self.signal = signal if signal is not None else ShutdownSignal()
        self.handle_signals = handle_signals
        self._chain: _SignalChain | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.handle_signals and self._chain is None:
            # By its first ASGI call the server has installed its own handlers.
            self._chain = _SignalChain(self.signal)
        if scope["type"] == "http":
            extensions = scope.get("extensions")
            if extensions is None:
                extensions = scope["extensions"] = {}
            extensions[SHUTDOWN_KEY] = self.signal
        elif scope["type"] == "lifespan":
            receive = self._lifespan_receive(receive)
        await self.app(scope, receive, send)

    def _lifespan_receive(self, receive: Receive) -> Receive:
        shutdown = self.signal

        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                # The server is stopping: end the streams if nothing has yet, and hand
                # the app its shutdown (which may close what the streams use) after
                # them. Some servers (granian) exit right after the lifespan shutdown.
                shutdown.trigger()
                drained = anyio.Event()
                shutdown._when_drained(drained.set)
                with anyio.move_on_after(_DRAIN_LIMIT):
                    await drained.wait()
            return message

        return lifespan_receive


# The signals that `handle_signals` chains: the ones servers shut down on.
_SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The longest the server's handler is held back while the streams end, in seconds.
# Each stream's end is bounded already (grace period, 1 s writes, disconnect_timeout);
# this bounds the wait should a stream never unregister.
_DRAIN_LIMIT = 30.0


class _SignalChain:
    """Triggers a `ShutdownSignal` on SIGTERM/SIGINT, then calls the server's handler.

    A server hears its signals in one of two ways, and both go on working:

    - a handler installed with `signal.signal()` (uvicorn, Twisted under daphne,
      gunicorn's and hypercorn's parent processes) is called by this chain, with
      the signal's arguments, once the streams have ended. Under daphne that matters:
      Twisted cancels every request at once when it stops;
    - `loop.add_signal_handler()` (hypercorn's `--workers 0`, granian's workers)
      installs a no-op Python handler, and the loop hears the signal through its
      wakeup fd, which the C-level handler writes to whichever Python handler is
      installed: such a server starts its shutdown at once, beside this chain,
      and waits for its open connections, which the trigger ends.
    """

    __slots__ = ("_held", "_loop", "_passed", "_previous", "_shutdown", "_timer", "server")

    def __init__(self, shutdown: ShutdownSignal, *, server: Any = None) -> None:
        self._shutdown = shutdown
        #: The uvicorn `Server` whose handler this chain calls (None: any server's).
        #: uvicorn's shutdown waits for open connections by itself, and stops
        #: accepting new ones first: it hears the signal right after the streams are
        #: told to end, not once they have ended.
        self.server = server
        self._previous: dict[int, Callable[[int, FrameType | None], object]] = {}
        self._held: list[tuple[int, FrameType | None]] = []
        self._passed = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if sniffio.current_async_library() != "asyncio":
            logger.warning(
                "ShutdownMiddleware(handle_signals=True) works on asyncio only; "
                "call ShutdownSignal.trigger() from the server's shutdown hook instead"
            )
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "ShutdownMiddleware(handle_signals=True): the app is not served from the "
                "main thread, where signal handlers live; call ShutdownSignal.trigger() "
                "from the server's shutdown hook instead"
            )
            return
        self._loop = asyncio.get_running_loop()
        for signum in _SHUTDOWN_SIGNALS:
            previous = signal.getsignal(signum)
            if callable(previous):  # not SIG_DFL, SIG_IGN, or a handler set outside Python
                self._previous[signum] = previous
                signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # A Python signal handler runs between two bytecodes of the main thread,
        # maybe inside the event loop's own code: it only hands the work over.
        loop = self._loop
        assert loop is not None
        if loop.is_closed():
            self._previous[signum](signum, frame)
        else:
            loop.call_soon_threadsafe(self._received, signum, frame)

    def _received(self, signum: int, frame: FrameType | None) -> None:
        if self._passed:
            self._previous[signum](signum, frame)
            return
        self._held.append((signum, frame))
        if len(self._held) > 1:
            self._pass_on()  # a second signal: the server hears both, in order, now
            return
        self._shutdown.trigger()
        if self.server is not None:
            self._pass_on()
            return
        assert self._loop is not None
        self._timer = self._loop.call_later(_DRAIN_LIMIT, self._pass_on)
        self._shutdown._when_drained(self._pass_on)

    def _pass_on(self) -> None:
        if self._passed:
            return
        self._passed = True
        if self._timer is not None:
            self._timer.cancel()
        held, self._held = self._held, []
        for signum, frame in held:
            self._previous[signum](signum, frame)


def register_stream(signal: ShutdownSignal, stream: Stoppable) -> None:
    """List an open stream: `signal` calls its `begin_shutdown()` (at once if triggered)."""
    signal._streams.add(stream)
    if signal._triggered:
        stream.begin_shutdown()


def unregister_stream(signal: ShutdownSignal, stream: Stoppable) -> None:
    """Unlist a stream that has ended (after its `on_disconnect()`)."""
    streams = signal._streams
    streams.discard(stream)
    if not streams and signal._drained:
        signal._notify_drained()


def find_shutdown_signal(scope: Scope) -> ShutdownSignal | None:
    """Return the `ShutdownSignal` of the server that runs this request, if any."""
    extensions = scope.get("extensions")
    if extensions:
        found = extensions.get(SHUTDOWN_KEY)
        if found is not None:
            return found  # type: ignore[no-any-return]
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: not uvicorn either
        return None
    watched = _watched
    if watched is not None and watched.loop is loop:
        return watched.signal
    return _uvicorn_signal(loop)


class _UvicornShutdown:
    """The shutdown of the uvicorn `Server` that serves this process's requests.

    uvicorn's `Server.serve()` installs its bound method `handle_exit` as the
    SIGTERM and SIGINT handler for as long as it runs (in the main thread), and
    restores the previous handlers afterwards: the handler leads to the server.
    sseviews chains a handler in front of it (see `_SignalChain`), so the streams
    are told to end on the signal itself, in the loop step before uvicorn hears
    it; and it watches `Server.should_exit`, which code that runs uvicorn may also
    set directly.
    """

    __slots__ = ("chain", "loop", "server", "signal", "watcher")

    def __init__(self, server: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.signal = ShutdownSignal()
        self.chain: _SignalChain | None = None
        self.watcher: asyncio.Task[None] | None = None

    def installed(self) -> bool:
        """Whether uvicorn's SIGTERM handler, or the chain in front of it, is still installed."""
        handler = signal.getsignal(signal.SIGTERM)
        chain = self.chain
        if chain is not None:
            return handler == chain._handle
        return bool(handler == self.server.handle_exit)

    def watch(self) -> None:
        """Watch `should_exit` while streams are open (from a task of the server's loop)."""
        global _watched
        if self.server.should_exit:
            self.signal.trigger()
        elif self.watcher is None:
            self.watcher = self.loop.create_task(self._watch())
            # While the watcher runs, requests on this loop find this signal without
            # reading the signal handler (see find_shutdown_signal).
            _watched = self

    async def _watch(self) -> None:
        global _watched
        found = self.signal
        try:
            # Let the stream that started us register before the first look.
            await asyncio.sleep(_UVICORN_POLL)
            while not self.server.should_exit:
                if not found._streams or not self.installed():
                    return  # the next stream looks again, and starts a new watcher
                await asyncio.sleep(_UVICORN_POLL)
            found.trigger()
        finally:
            self.watcher = None
            if _watched is self:
                _watched = None


# The uvicorn server whose streams are being watched, found without reading the signal
# handler while its watcher runs.
_watched: _UvicornShutdown | None = None


def _uvicorn_signal(loop: asyncio.AbstractEventLoop) -> ShutdownSignal | None:
    if threading.current_thread() is not threading.main_thread():
        return None  # uvicorn handles signals only when it runs in the main thread
    handler = signal.getsignal(signal.SIGTERM)
    owner = getattr(handler, "__self__", None)
    if isinstance(owner, _SignalChain):
        owner = owner.server  # sseviews' chain, in front of uvicorn's handler
    if owner is None or not hasattr(owner, "should_exit") or not hasattr(owner, "handle_exit"):
        return None
    shutdown: _UvicornShutdown | None = owner.__dict__.get(_UVICORN_ATTR)
    if shutdown is None or shutdown.loop is not loop:
        shutdown = owner.__dict__[_UVICORN_ATTR] = _UvicornShutdown(owner, loop)
    if shutdown.chain is None and handler == owner.handle_exit:
        # First request: put the streams' shutdown in front of uvicorn's. This is
        # the main thread, on asyncio, and uvicorn's handler is a callable one: the
        # chain always installs itself here.
        shutdown.chain = _SignalChain(shutdown.signal, server=owner)
    shutdown.watch()
    return shutdown.signal
