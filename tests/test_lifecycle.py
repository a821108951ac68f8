"""`ShutdownMiddleware(handle_signals=True)`, in-process: the chain in front of the
server's SIGTERM/SIGINT handlers, with real signals sent to this process.

Each test installs a recording handler first, as a server would, so a signal never
reaches Python's default action, and restores the process's handlers afterwards.
The behaviour under real servers is in `tests/test_server_matrix.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from types import FrameType

import anyio
import pytest

from sseviews import ShutdownMiddleware, ShutdownSignal
from sseviews import _lifecycle as lifecycle
from sseviews._reserved import SHUTDOWN_KEY

pytestmark = pytest.mark.anyio


class ServerHandler:
    """Stands in for the handler a server installs with `signal.signal()`."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)


class Stream:
    """Stands in for an open stream registered with a `ShutdownSignal`."""

    def __init__(self) -> None:
        self.stopping = False

    def begin_shutdown(self) -> None:
        self.stopping = True


@pytest.fixture
def server_handler() -> Iterator[ServerHandler]:
    """A recording handler for SIGTERM and SIGINT; the previous handlers come back after."""
    handler = ServerHandler()
    saved = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield handler
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)


async def _noop_app(scope: object, receive: object, send: object) -> None:
    pass


async def _install(middleware: ShutdownMiddleware) -> None:
    """Make the middleware's first ASGI call, as a server's lifespan startup would."""
    await middleware({"type": "lifespan"}, _noop_receive, _noop_send)


async def _noop_receive() -> dict[str, str]:
    return {"type": "lifespan.startup"}


async def _noop_send(message: object) -> None:
    pass


async def _deliver(signum: int) -> None:
    """Send `signum` to this process and let the event loop run what it scheduled."""
    os.kill(os.getpid(), signum)
    await anyio.sleep(0.05)


async def test_shutdown_middleware_signal_ends_streams_before_the_server_hears_it(
    server_handler: ServerHandler,
) -> None:
    middleware = ShutdownMiddleware(_noop_app, handle_signals=True)
    await _install(middleware)
    stream = Stream()
    lifecycle.register_stream(middleware.signal, stream)

    await _deliver(signal.SIGTERM)
    assert middleware.signal.is_set
    assert stream.stopping
    assert server_handler.received == []  # held back while a stream is open

    lifecycle.unregister_stream(middleware.signal, stream)
    assert server_handler.received == [signal.SIGTERM]

    # Later signals go straight to the server.
    await _deliver(signal.SIGINT)
    assert server_handler.received == [signal.SIGTERM, signal.SIGINT]


async def test_shutdown_middleware_signal_with_no_stream_open_passes_on_at_once(
    server_handler: ServerHandler,
) -> None:
    middleware = ShutdownMiddleware(_noop_app, handle_signals=True)
    await _install(middleware)
    await _deliver(signal.SIGINT)
    assert middleware.signal.is_set
    assert server_handler.received == [signal.SIGINT]


async def test_shutdown_middleware_second_signal_passes_both_on_at_once(
    server_handler: ServerHandler,
) -> None:
    middleware = ShutdownMiddleware(_noop_app, handle_signals=True)
    await _install(middleware)
    lifecycle.register_stream(middleware.signal, Stream())  # never ends

    await _deliver(signal.SIGTERM)
    assert server_handler.received == []
    await _deliver(signal.SIGINT)
    # As the server would have heard them: in order (uvicorn forces its exit on a
    # second SIGINT, for example).
    assert server_handler.received == [signal.SIGTERM, signal.SIGINT]


async def test_shutdown_middleware_signal_passes_on_after_the_drain_limit(
    server_handler: ServerHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifecycle, "_DRAIN_LIMIT", 0.1)
    middleware = ShutdownMiddleware(_noop_app, handle_signals=True)
    await _install(middleware)
    lifecycle.register_stream(middleware.signal, Stream())  # never ends

    await _deliver(signal.SIGTERM)
    assert server_handler.received == []
    with anyio.fail_after(2):
        while not server_handler.received:  # noqa: ASYNC110 - set by a loop timer
            await anyio.sleep(0.02)
    assert server_handler.received == [signal.SIGTERM]


async def test_shutdown_middleware_installs_once_and_keeps_the_signal_in_the_scope(
    server_handler: ServerHandler,
) -> None:
    shutdown = ShutdownSignal()
    seen: list[object] = []

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        seen.append(scope["extensions"][SHUTDOWN_KEY])  # type: ignore[index]

    middleware = ShutdownMiddleware(app, shutdown, handle_signals=True)
    await middleware({"type": "http"}, _noop_receive, _noop_send)
    chained = signal.getsignal(signal.SIGTERM)
    await middleware({"type": "http"}, _noop_receive, _noop_send)
    assert signal.getsignal(signal.SIGTERM) is chained  # not chained twice
    assert seen == [shutdown, shutdown]


async def test_shutdown_middleware_leaves_ignored_signals_alone(
    server_handler: ServerHandler,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as hypercorn's worker processes do
    middleware = ShutdownMiddleware(_noop_app, handle_signals=True)
    await _install(middleware)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is not server_handler  # chained

    await _deliver(signal.SIGINT)  # ignored: nothing happens
    assert not middleware.signal.is_set


async def test_shutdown_middleware_without_handle_signals_installs_nothing(
    server_handler: ServerHandler,
) -> None:
    middleware = ShutdownMiddleware(_noop_app)
    await _install(middleware)
    assert signal.getsignal(signal.SIGTERM) is server_handler
    assert signal.getsignal(signal.SIGINT) is server_handler


async def test_shutdown_middleware_off_the_main_thread_logs_and_installs_nothing(
    server_handler: ServerHandler, caplog: pytest.LogCaptureFixture
) -> None:
    middleware = ShutdownMiddleware(_noop_app, handle_signals=True)
    with caplog.at_level(logging.WARNING, logger="sseviews"):
        await anyio.to_thread.run_sync(asyncio.run, _install(middleware))
    assert "not served from the main thread" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is server_handler


async def test_shutdown_middleware_lifespan_shutdown_reaches_the_app_after_the_streams() -> None:
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    received: list[str] = []

    async def server_receive() -> dict[str, str]:
        return next(messages)

    async def app(
        scope: object, receive: Callable[[], Awaitable[dict[str, str]]], send: object
    ) -> None:
        received.append((await receive())["type"])
        received.append((await receive())["type"])

    middleware = ShutdownMiddleware(app)
    stream = Stream()
    lifecycle.register_stream(middleware.signal, stream)
    async with anyio.create_task_group() as tg:
        tg.start_soon(middleware, {"type": "lifespan"}, server_receive, _noop_send)
        await anyio.sleep(0.05)
        # The server is stopping: the streams end first (nothing had triggered the signal).
        assert middleware.signal.is_set
        assert stream.stopping
        assert received == ["lifespan.startup"]
        lifecycle.unregister_stream(middleware.signal, stream)
        with anyio.fail_after(2):
            while len(received) < 2:  # noqa: ASYNC110 - the app's task appends
                await anyio.sleep(0.01)
    assert received == ["lifespan.startup", "lifespan.shutdown"]


# -- uvicorn, found through its own handler ----------------------------------------


@pytest.fixture
def uvicorn_handler() -> Iterator[object]:
    """A real `uvicorn.Server` whose `handle_exit` is the SIGTERM/SIGINT handler, as
    `Server.serve()` installs it; the previous handlers come back after."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(_noop_app))
    saved = {
        signum: signal.signal(signum, server.handle_exit)
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield server
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_uvicorn_streams_are_told_before_uvicorn_hears_the_signal(
    uvicorn_handler: object,
) -> None:
    server: object = uvicorn_handler
    found = lifecycle.find_shutdown_signal({"type": "http"})
    assert found is not None
    assert lifecycle.find_shutdown_signal({"type": "http"}) is found  # one per server
    stream = Stream()
    seen_at_exit: list[bool] = []

    def handle_exit(signum: int, frame: FrameType | None) -> None:
        seen_at_exit.append(stream.stopping)

    lifecycle.register_stream(found, stream)
    # uvicorn's handler, behind sseviews': what it saw when it was called.
    chain = signal.getsignal(signal.SIGTERM)
    assert getattr(chain, "__self__", None) is not server
    chain.__self__._previous[signal.SIGTERM] = handle_exit  # type: ignore[union-attr]

    await _deliver(signal.SIGTERM)
    # uvicorn heard the signal right away, with the stream still open (uvicorn waits
    # for open connections by itself, after it stops accepting new ones), and after
    # the stream was told to end.
    assert seen_at_exit == [True]
    lifecycle.unregister_stream(found, stream)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_uvicorn_should_exit_set_by_code_is_heard_while_streams_are_open(
    uvicorn_handler: object,
) -> None:
    server = uvicorn_handler
    found = lifecycle.find_shutdown_signal({"type": "http"})
    assert found is not None
    stopping = anyio.Event()
    stream = Stream()
    stream.begin_shutdown = stopping.set  # type: ignore[method-assign]
    lifecycle.register_stream(found, stream)
    server.should_exit = True  # type: ignore[attr-defined]
    with anyio.fail_after(1):  # the watcher looks every 0.05 s
        await stopping.wait()
    assert found.is_set
    lifecycle.unregister_stream(found, stream)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_uvicorn_outside_the_main_thread_gets_no_signal(uvicorn_handler: object) -> None:
    def in_a_thread() -> ShutdownSignal | None:
        async def find() -> ShutdownSignal | None:
            return lifecycle.find_shutdown_signal({"type": "http"})

        return asyncio.run(find())

    assert await anyio.to_thread.run_sync(in_a_thread) is None
    assert lifecycle.find_shutdown_signal({"type": "http"}) is not None


async def test_no_uvicorn_no_signal() -> None:
    # No uvicorn handler installed (and, on trio, no asyncio loop at all).
    assert lifecycle.find_shutdown_signal({"type": "http"}) is None
