"""A real uvicorn served in the test's own event loop.

In-process, so a test reads what the app and its middleware recorded directly. Read
its streams with `support.raw.RawEventStream`, a plain non-blocking socket, so a test
can make a slow reader.

`serve_in_process()` takes no timeout: the tests bound what they do inside it with
`anyio.fail_after`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import uvicorn
from starlette.types import ASGIApp

HOST = "127.0.0.1"


@dataclass
class RunningServer:
    server: uvicorn.Server
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def write_paused(self, client_port: int) -> bool:
        """Whether uvicorn has paused writing to the connection from `client_port`.

        uvicorn pauses once its transport holds more than the write high-water
        mark (64 KiB) that the socket would not take: the client is not keeping
        up, and the next ASGI `send` on that connection waits. (Read from
        uvicorn's own connection state: there is no public way to ask.)
        """
        for protocol in self.server.server_state.connections:
            client = getattr(protocol, "client", None)
            if client is not None and client[1] == client_port:
                flow = getattr(protocol, "flow", None)
                return flow is not None and bool(flow.write_paused)
        return False


@asynccontextmanager
async def serve_in_process(
    app: ASGIApp, *, sndbuf: int | None = None
) -> AsyncIterator[RunningServer]:
    """Serve `app` (lifespan on) with uvicorn on a loopback port, in this event loop.

    `sndbuf` sets `SO_SNDBUF` on the listening socket, which accepted connections
    inherit: a fixed, small send buffer (no autotuning) makes a client that stops
    reading fill the server's socket after a few tens of KiB.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind((HOST, 0))
    port = int(sock.getsockname()[1])
    # log_config=None: leave the test process's logging configuration alone.
    config = uvicorn.Config(
        app, lifespan="on", log_config=None, access_log=False, timeout_graceful_shutdown=3
    )
    server = uvicorn.Server(config)
    # A plain task rather than a task group, so that a failed assertion in the body
    # reaches pytest as itself and not inside an ExceptionGroup. It is awaited below,
    # whatever happens.
    serving = asyncio.get_running_loop().create_task(server.serve([sock]))
    try:
        with anyio.fail_after(5):
            # uvicorn offers a flag, not an event, for "listening".
            while not server.started:
                if serving.done():
                    raise RuntimeError("uvicorn stopped before it started serving")
                await anyio.sleep(0.005)
        yield RunningServer(server, port)
    finally:
        server.should_exit = True
        try:
            # serve() returns within its graceful shutdown timeout (plus its 0.1 s
            # tick): bounded anyway, so that a hang fails the test.
            with anyio.fail_after(6, shield=True):
                await asyncio.wait([serving])
        finally:
            sock.close()
            if not serving.done():
                serving.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([serving])
        if not serving.cancelled() and serving.exception() is not None:
            raise RuntimeError("uvicorn's serve() failed") from serving.exception()
