"""Raw HTTP/1.1 clients for the tests against real servers: the test writes and sees
every byte, the framing, and what the server does to the connection.

- `RawConnection`: one non-blocking loopback socket, with the socket options a test
  needs (a small receive buffer, a reset instead of a clean close). Its readers undo
  the framing (the head, chunks) and raise `EOFError` once the server closed.
- `LenientConnection`: the same for requests a server may refuse at any byte: a
  send the server cut short stops quietly, a reset reads as a close, every byte
  received is kept, and `read_head_or_none()` is None for a head that never came.
- `RawEventStream`: one `GET` of an event stream over a raw non-blocking socket,
  read with asyncio's socket calls in small or large reads (a slow reader), parsed
  as a browser would; `raw_head()` sends a `HEAD` and keeps the connection idle.
- `SSEClient`: one `GET` of an event stream over an anyio socket (a read cancelled by
  a timeout loses no byte), its chunked body parsed as a browser would.

Their coroutines take no timeout: the tests bound them with `anyio.fail_after`,
except `SSEClient`, whose waits for an event fail the test after `TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import anyio.abc

from sseviews import Event
from sseviews.testing import EventParser

HOST = "127.0.0.1"
#: `SSEClient`'s bound on any single wait for an event, a response head or a close.
TIMEOUT = 5.0
#: How long `SSEClient.expect_quiet()` waits to show that nothing else follows.
QUIET = 0.3


@dataclass
class Head:
    """A response's status line and headers (names in lower case)."""

    status: int
    headers: dict[str, str]


class RawConnection:
    """HTTP/1.1 over one non-blocking loopback socket."""

    def __init__(self, sock: socket.socket, *, read_size: int = 65536) -> None:
        self.sock = sock
        self.read_size = read_size
        self.buffer = bytearray()  # received, not yet read
        self.received = 0  # bytes received in all
        self.eof = False  # the server closed the connection

    @property
    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    @classmethod
    async def connect(
        cls, port: int, *, rcvbuf: int | None = None, read_size: int = 65536
    ) -> RawConnection:
        """Connect to `port`; `rcvbuf` sets `SO_RCVBUF` first, `read_size` is the most
        one `recv()` takes."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                # Before connect(), so the TCP window is negotiated for it.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            err = sock.connect_ex((HOST, port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            await anyio.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        except BaseException:
            sock.close()
            raise
        return cls(sock, read_size=read_size)

    @classmethod
    async def request(
        cls, port: int, method: str, path: str, *, rcvbuf: int | None = None
    ) -> RawConnection:
        """Connect and send `method path` (no body); the caller must `close()` it."""
        conn = await cls.connect(port, rcvbuf=rcvbuf)
        try:
            await conn.send(f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        except BaseException:
            conn.close()
            raise
        return conn

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            await anyio.wait_writable(self.sock)
            view = view[self.sock.send(view) :]

    async def _fill(self) -> None:
        """Read what arrives; EOFError once the server has closed the connection."""
        if self.eof:
            raise EOFError("the server closed the connection")
        await anyio.wait_readable(self.sock)
        data = self.sock.recv(self.read_size)
        if not data:
            self.eof = True
            raise EOFError("the server closed the connection")
        self.buffer += data
        self.received += len(data)

    async def _read_until(self, separator: bytes) -> bytes:
        while (end := self.buffer.find(separator)) < 0:
            await self._fill()
        data = bytes(self.buffer[: end + len(separator)])
        del self.buffer[: end + len(separator)]
        return data

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def read_head(self) -> Head:
        """The response head."""
        raw = await self._read_until(b"\r\n\r\n")
        status_line, *lines = raw.decode("latin-1").split("\r\n")[:-2]
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return Head(int(status_line.split(" ", 2)[1]), headers)

    async def read_chunk(self) -> bytes:
        """The next chunk of a chunked body; b"" is the terminal 0-size chunk."""
        size_line = await self._read_until(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        data = await self.read_exactly(size + 2)
        assert data[-2:] == b"\r\n", f"bad chunk framing: {data[-2:]!r}"
        return data[:-2]

    async def read_to_end(self) -> bytes:
        """The rest of a chunked body, up to and including its terminal chunk."""
        body = b""
        while chunk := await self.read_chunk():
            body += chunk
        return body

    async def read_until_closed(self) -> bytes:
        """Whatever the server sends before it closes the connection."""
        with suppress(EOFError):
            while True:
                await self._fill()
        rest = bytes(self.buffer)
        self.buffer.clear()
        return rest

    async def drain(self) -> None:
        """Read and discard everything, until the server closes the connection."""
        with suppress(EOFError):
            while True:
                self.buffer.clear()
                await self._fill()

    def close(self, *, reset: bool = False) -> None:
        if reset:
            # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class LenientConnection(RawConnection):
    """A `RawConnection` for requests the server may refuse at any byte."""

    def __init__(self, sock: socket.socket, *, read_size: int = 65536) -> None:
        super().__init__(sock, read_size=read_size)
        self.raw = bytearray()  # every byte received

    async def send(self, data: bytes) -> None:
        """Send `data`; stop quietly if the server closes the connection meanwhile."""
        try:
            await super().send(data)
        except (BrokenPipeError, ConnectionResetError):
            return  # the server refused early; its answer may be readable

    async def _fill(self) -> None:
        start = len(self.buffer)
        try:
            await super()._fill()
        except ConnectionResetError:
            self.eof = True
            raise EOFError("the server reset the connection") from None
        self.raw += self.buffer[start:]

    async def read_head_or_none(self) -> Head | None:
        """The response head; None if the server closed the connection without one."""
        try:
            return await self.read_head()
        except EOFError:
            return None


# -- an event stream over asyncio's socket calls ---------------------------------------


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


# -- an event stream over anyio ----------------------------------------------------


class _Listening(Protocol):
    """A server `SSEClient` connects to (`support.servers.ServerProcess`)."""

    @property
    def name(self) -> str: ...

    @property
    def port(self) -> int: ...


def seq_of(event_id: str | None) -> int:
    """The sequence number of a one-group id (`<epoch>-<seq>`)."""
    assert event_id is not None
    return int(event_id.rsplit("-", 1)[1])


def summary(events: list[Event]) -> list[tuple[str | None, Any]]:
    return [(event.id, event.json()) for event in events]


class SSEClient:
    """One `GET <path>` over a raw socket: the chunked body, parsed as a browser would."""

    def __init__(self, name: str, stream: anyio.abc.SocketStream) -> None:
        self.name = name
        self._stream = stream
        self._buffer = bytearray()
        self._state = "size"  # size -> data -> crlf -> size ...; "done" after the 0 chunk
        self._chunk_left = 0
        self._parser = EventParser()
        self._ready: deque[Event] = deque()
        #: Every event received so far, in order.
        self.received: list[Event] = []
        #: The connection is closed (by the server, or by us).
        self.closed = False
        #: The body ended with the terminal chunk (a clean end, not a dead server).
        self.completed = False
        self.status = 0
        self.headers: dict[str, str] = {}

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, server: _Listening, room: str, *, last_event_id: str | None = None
    ) -> AsyncIterator[SSEClient]:
        """Stream `GET /rooms/{room}` from `server`."""
        with anyio.fail_after(TIMEOUT):
            stream = await anyio.connect_tcp(HOST, server.port)
        client = cls(f"{server.name}:{room}", stream)
        try:
            request = f"GET /rooms/{room} HTTP/1.1\r\nHost: {HOST}:{server.port}\r\n"
            request += "Accept: text/event-stream\r\n"
            if last_event_id is not None:
                request += f"Last-Event-ID: {last_event_id}\r\n"
            await stream.send((request + "\r\n").encode())
            await client._read_head()
            yield client
        finally:
            await client.aclose()

    async def aclose(self) -> None:
        self.closed = True
        await self._stream.aclose()

    async def _receive(self) -> bool:
        """Read what the socket has; False once it is closed."""
        if self.closed:
            return False
        try:
            data = await self._stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.closed = True
            return False
        self._buffer += data
        return True

    async def _read_head(self) -> None:
        with anyio.fail_after(TIMEOUT):
            while b"\r\n\r\n" not in self._buffer:
                if not await self._receive():
                    raise AssertionError(f"{self.name}: closed before the response head")
            head, _, rest = bytes(self._buffer).partition(b"\r\n\r\n")
            self._buffer = bytearray(rest)
            status_line, *lines = head.decode("latin-1").split("\r\n")
            self.status = int(status_line.split(" ", 2)[1])
            for line in lines:
                key, _, value = line.partition(":")
                self.headers[key.strip().lower()] = value.strip()
            if self.status != 200:
                length = int(self.headers.get("content-length", "0"))
                while len(self._buffer) < length and await self._receive():
                    pass
                body = bytes(self._buffer[:length]).decode(errors="replace")
                raise AssertionError(f"{self.name}: status {self.status}: {body!r}")
        assert self.headers.get("content-type") == "text/event-stream; charset=utf-8"
        assert self.headers.get("transfer-encoding") == "chunked"
        self._decode()

    def _decode(self) -> None:
        """Undo the chunked framing of what is buffered; parse the SSE bytes it holds."""
        buffer = self._buffer
        while True:
            if self._state == "size":
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buffer[:end]).split(b";")[0], 16)
                del buffer[: end + 2]
                if size == 0:
                    self._state = "done"
                    self.completed = True
                    return
                self._chunk_left = size
                self._state = "data"
            elif self._state == "data":
                take = min(len(buffer), self._chunk_left)
                if not take:
                    return
                for event in self._parser.feed(bytes(buffer[:take])):
                    self._ready.append(event)
                    self.received.append(event)
                del buffer[:take]
                self._chunk_left -= take
                if not self._chunk_left:
                    self._state = "crlf"
            elif self._state == "crlf":
                if len(buffer) < 2:
                    return
                assert buffer[:2] == b"\r\n", f"{self.name}: bad chunk framing {bytes(buffer)!r}"
                del buffer[:2]
                self._state = "size"
            else:
                return

    @property
    def retry(self) -> int | None:
        return self._parser.retry

    async def next_event(self) -> Event:
        """The next event; AssertionError if none comes in TIMEOUT or the stream ends."""
        with anyio.move_on_after(TIMEOUT):
            while not self._ready:
                if not await self._receive():
                    raise AssertionError(
                        f"{self.name}: stream closed while waiting for an event; "
                        f"received {summary(self.received)}"
                    )
                self._decode()
            return self._ready.popleft()
        raise AssertionError(
            f"{self.name}: no event within {TIMEOUT}s; received {summary(self.received)}"
        )

    async def next_named(self, name: str, seconds: float = TIMEOUT) -> Event:
        """The next event named `name`, skipping the others; fails after `seconds`."""
        with anyio.fail_after(seconds):
            while True:
                event = await self.next_event()
                if event.event == name:
                    return event

    async def next_events(self, count: int) -> list[Event]:
        with anyio.fail_after(TIMEOUT):
            return [await self.next_event() for _ in range(count)]

    async def events_until(self, last_id: str) -> list[Event]:
        """Events up to and including the one with id `last_id`."""
        events: list[Event] = []
        with anyio.fail_after(TIMEOUT):
            while not events or events[-1].id != last_id:
                event = await self.next_event()
                events.append(event)
                assert seq_of(event.id) <= seq_of(last_id), (
                    f"{self.name}: {event.id} came, but {last_id} never did: {summary(events)}"
                )
        return events

    async def expect_quiet(self, seconds: float = QUIET) -> None:
        """Nothing more arrives for `seconds` (so no duplicate and no stray event)."""
        with anyio.move_on_after(seconds):
            while not self._ready and await self._receive():
                self._decode()
        extra = list(self._ready)
        assert not extra, f"{self.name}: unexpected extra events {summary(extra)}"

    async def wait_closed(self) -> None:
        """Read (keeping every whole event) until the server side closes the connection."""
        with anyio.fail_after(TIMEOUT):
            while await self._receive():
                self._decode()
