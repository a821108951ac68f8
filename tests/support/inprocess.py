"""A real uvicorn served in the test's own event loop, and a raw socket SSE client.

In-process, so a test reads what the app and its middleware recorded directly.
The client is a plain non-blocking socket, so a test can make a slow reader: a
small `SO_RCVBUF`, small reads with pauses, or no reading at all for a while.

Their coroutines take no timeout: the tests bound them with `anyio.fail_after`.
"""

from __future__ import annotations

import asyncio
import socket
import zlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import uvicorn
from starlette.types import ASGIApp

from sseviews import Event
from sseviews.testing import EventParser

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


class RawEventStream:
    """One `GET` of an event stream over a raw non-blocking socket, parsed as a browser
    would (chunked transfer decoding, gzip if the server chose it)."""

    def __init__(self, sock: socket.socket, status: int, headers: dict[str, str]) -> None:
        self.sock = sock
        self.status = status
        self.headers = headers
        self.parser = EventParser()
        self.events: list[Event] = []
        self.ended = False  # the terminal chunk came, or the server closed the connection
        self._raw = bytearray()
        self._gunzip = (
            zlib.decompressobj(16 + zlib.MAX_WBITS)
            if headers.get("content-encoding") == "gzip"
            else None
        )

    @property
    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    @classmethod
    async def open(
        cls,
        port: int,
        target: str,
        *,
        rcvbuf: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> RawEventStream:
        """Connect, send the request, and read the response head."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                # Before connect(), so the TCP window is negotiated for it.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await loop.sock_connect(sock, (HOST, port))
            lines = [f"GET {target} HTTP/1.1", f"Host: {HOST}:{port}", "Accept: text/event-stream"]
            lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
            await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            raw = bytearray()
            while (end := raw.find(b"\r\n\r\n")) < 0:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    raise EOFError("the server closed the connection before the response head")
                raw += data
            status_line, *header_lines = raw[:end].decode("latin-1").split("\r\n")
            found = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                found[name.strip().lower()] = value.strip()
            stream = cls(sock, int(status_line.split(" ", 2)[1]), found)
            stream._raw += raw[end + 4 :]
            stream._decode()
            return stream
        except BaseException:
            sock.close()
            raise

    async def read_events(self, count: int, *, slow: bool = False) -> list[Event]:
        """Read until `count` events have arrived in all, or the stream ended.

        A slow reader takes 4 KiB at a time and pauses 1 ms between reads.
        """
        loop = asyncio.get_running_loop()
        size = 4096 if slow else 1 << 20
        while len(self.events) < count and not self.ended:
            data = await loop.sock_recv(self.sock, size)
            if not data:
                self.ended = True
                break
            self._raw += data
            self._decode()
            if slow:
                await asyncio.sleep(0.001)
        return self.events

    def _decode(self) -> None:
        raw = self._raw
        while not self.ended:
            line_end = raw.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(raw[:line_end]).split(b";")[0], 16)
            chunk_end = line_end + 2 + size
            if len(raw) < chunk_end + 2:
                return
            chunk = bytes(raw[line_end + 2 : chunk_end])
            assert raw[chunk_end : chunk_end + 2] == b"\r\n", "bad chunk framing"
            del raw[: chunk_end + 2]
            if size == 0:
                self.ended = True
            if self._gunzip is not None:
                chunk = self._gunzip.decompress(chunk)
            self.events += self.parser.feed(chunk)

    def close(self) -> None:
        self.sock.close()


async def raw_head(port: int, target: str) -> tuple[int, socket.socket]:
    """Send `HEAD target` on a new keep-alive connection; the status and the open socket.

    The caller closes the socket: until then the connection stays open and idle, as a
    browser keeps one in its pool.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, (HOST, port))
        request = f"HEAD {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n"
        await loop.sock_sendall(sock, request.encode("latin-1"))
        raw = bytearray()
        while raw.find(b"\r\n\r\n") < 0:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                raise EOFError("the server closed the connection before the response head")
            raw += data
        return int(raw.split(b" ", 2)[1]), sock
    except BaseException:
        sock.close()
        raise
