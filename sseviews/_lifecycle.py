"""Why a stream ended, and how a server tells its open streams that it is shutting down.

Shutdown state belongs to one server, never to the process: a `ShutdownSignal`
is found per request, either in the ASGI scope (put there by `ShutdownMiddleware`
or by the test client) or, under uvicorn, on the running `uvicorn.Server` itself.
Two servers started one after another in one process each get their own.
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import logging
import signal
import threading
from types import FrameType
from typing import Any, Protocol

import sniffio
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["DisconnectReason", "ShutdownMiddleware", "ShutdownSignal", "find_shutdown_signal"]

logger = logging.getLogger("sseviews")

#: The ASGI scope extension under which a `ShutdownSignal` is looked up.
SCOPE_KEY = "sseviews.shutdown"

# How often the uvicorn watcher looks at `Server.should_exit`, in seconds. uvicorn
# waits 0.1 s after should_exit before it starts waiting on connections, so polling
# at half that ends the streams before it looks.
_UVICORN_POLL = 0.05
_UVICORN_ATTR = "_sseviews_shutdown_signal"

# signal.getsignal() turns every handler into a `Handlers` enum member when it can,
# and for a bound method the failed lookup raises and catches an exception (~2.5 us)
# on every stream opened; the C function it wraps returns the handler as it is.
try:
    _getsignal: Any = importlib.import_module("_signal").getsignal
except ImportError:  # pragma: no cover - CPython has _signal
    _getsignal = signal.getsignal


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


class _Stoppable(Protocol):
    def begin_shutdown(self) -> None: ...


class ShutdownSignal:
    """The shutdown state of one server.

    Call `trigger()` when the server starts shutting down: every stream that uses
    this signal ends (after its view's `shutdown_grace_period`), and new streams are
    refused with 503. Under uvicorn sseviews finds and triggers one automatically;
    with other servers, give one to `ShutdownMiddleware` and trigger it from the
    server's shutdown hook.

    `trigger()` must be called from the event loop thread; from a signal handler or
    another thread use `loop.call_soon_threadsafe(signal.trigger)`.
    """

    __slots__ = ("__weakref__", "_streams", "_triggered", "_watcher")

    def __init__(self) -> None:
        self._streams: set[_Stoppable] = set()
        self._triggered = False
        self._watcher: asyncio.Task[None] | None = None

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

    def _register(self, stream: _Stoppable) -> None:
        self._streams.add(stream)
        if self._triggered:
            stream.begin_shutdown()

    def _unregister(self, stream: _Stoppable) -> None:
        self._streams.discard(stream)


class ShutdownMiddleware:
    """ASGI middleware that hands a `ShutdownSignal` to every stream below it.

    Use it with ASGI servers other than uvicorn (hypercorn, granian, daphne, ...).
    With `handle_signals=True` the middleware triggers the signal itself when the
    process gets SIGTERM or SIGINT, and then hands the signal on to the server:

        app = ShutdownMiddleware(app, handle_signals=True)

    Otherwise trigger the signal from the server's own shutdown hook:

        shutdown = ShutdownSignal()
        app = ShutdownMiddleware(app, shutdown)

    Args:
        app: The ASGI app to wrap.
        signal: The signal to hand out; a new one when omitted (see `.signal`).
        handle_signals: Chain a handler in front of the SIGTERM and SIGINT handlers
            that the server installed: on the signal it triggers `signal`, then calls
            the server's handler, so the server shuts down as it always does. It is
            installed once, at lifespan startup or else at the first request, in the
            process that serves the app (each worker has its own). A signal the server
            leaves at its default action or ignores is left alone.
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
            # By the first ASGI call the server has installed its own handlers.
            self._chain = _SignalChain(self.signal)
        if scope["type"] == "http":
            extensions = scope.get("extensions")
            if extensions is None:
                extensions = scope["extensions"] = {}
            extensions[SCOPE_KEY] = self.signal
        await self.app(scope, receive, send)


# The signals a server shuts down on, and so the ones `handle_signals` chains.
_SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _SignalChain:
    """Triggers a `ShutdownSignal` on SIGTERM/SIGINT, then calls the server's handler.

    A server learns of its signals in one of two ways, and both keep working:

    - a Python handler installed with `signal.signal()` (uvicorn, gunicorn's arbiter,
      Twisted under daphne, hypercorn's parent process): it is called after the
      trigger, with the same arguments;
    - `loop.add_signal_handler()` (hypercorn's single-process mode, granian's
      workers): the Python handler it installs is a no-op, and the loop hears the
      signal through its wakeup fd, which the C-level handler writes to whichever
      Python handler is installed; calling the no-op is harmless.

    The trigger is scheduled with `call_soon_threadsafe`, so it runs in the event
    loop before anything the server's handler schedules there.
    """

    __slots__ = ("_previous", "_schedule", "_shutdown")

    def __init__(self, shutdown: ShutdownSignal) -> None:
        self._shutdown = shutdown
        self._previous: dict[int, Any] = {}
        self._schedule: Any = None
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "ShutdownMiddleware(handle_signals=True): the app is not served from the "
                "main thread, so no signal handler can be installed; call "
                "ShutdownSignal.trigger() from the server's shutdown hook instead"
            )
            return
        if sniffio.current_async_library() == "trio":
            import trio

            self._schedule = trio.lowlevel.current_trio_token().run_sync_soon
        else:
            self._schedule = asyncio.get_running_loop().call_soon_threadsafe
        for signum in _SHUTDOWN_SIGNALS:
            previous = signal.getsignal(signum)
            if callable(previous):  # not SIG_DFL, SIG_IGN, or a handler set outside Python
                self._previous[signum] = previous
                signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._schedule(self._shutdown.trigger)
        self._previous[signum](signum, frame)


def find_shutdown_signal(scope: Scope) -> ShutdownSignal | None:
    """Return the `ShutdownSignal` of the server that runs this request, if any."""
    extensions = scope.get("extensions")
    if extensions:
        found = extensions.get(SCOPE_KEY)
        if found is not None:
            return found  # type: ignore[no-any-return]
    return _uvicorn_signal()


def _uvicorn_server() -> Any | None:
    # uvicorn's Server.serve() installs its bound method `handle_exit` as the
    # SIGTERM/SIGINT handler for as long as it runs, and restores the previous
    # handler afterwards, so the handler leads to the server running right now.
    handler = _getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    if server is None or not hasattr(server, "should_exit") or not hasattr(server, "handle_exit"):
        return None
    return server


def _uvicorn_signal() -> ShutdownSignal | None:
    server = _uvicorn_server()
    if server is None:
        return None
    found: ShutdownSignal | None = server.__dict__.get(_UVICORN_ATTR)
    if found is None:
        found = ShutdownSignal()
        server.__dict__[_UVICORN_ATTR] = found
    if server.should_exit:
        found.trigger()
    elif found._watcher is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - uvicorn always runs asyncio
            return found
        found._watcher = loop.create_task(_watch_uvicorn(server, found))
    return found


async def _watch_uvicorn(server: Any, found: ShutdownSignal) -> None:
    """Trigger `found` when `server.should_exit` flips; live only while streams are open."""
    try:
        # Let the stream that started us register before the first look.
        await asyncio.sleep(_UVICORN_POLL)
        while not server.should_exit:
            if not found._streams:
                return  # the next stream starts a new watcher
            await asyncio.sleep(_UVICORN_POLL)
        found.trigger()
    finally:
        found._watcher = None
