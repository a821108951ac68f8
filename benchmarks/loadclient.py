"""Raw-socket load client for Server-Sent Events benchmarks.

No HTTP library is involved: each stream is an ``asyncio.Protocol`` on a plain
TCP connection (run it under uvloop for speed). It writes::

    GET <path> HTTP/1.1\\r\\nHost: <host>\\r\\nAccept: text/event-stream\\r\\n\\r\\n

parses the status line and headers, then decodes the body (chunked transfer
coding, ``Content-Length`` or close-delimited) and counts SSE events as
``\\n\\n`` terminators in the *decoded* body. Terminators split across socket
reads or across chunks are counted exactly once. A chunked stream ends at the
terminal ``0\\r\\n\\r\\n`` chunk.

Building blocks (reusable for fan-out benchmarks):

* :class:`EventCounter` -- incremental ``\\n\\n`` counter.
* :class:`SSEStreamProtocol` -- one stream; futures for the head and the end.
* :func:`connect` / :func:`open_stream` -- one connection, optionally up to the
  response head.
* :func:`open_many` -- N idle streams opened with bounded concurrency, timed
  from the first connect to the last response head.
* :func:`burst` -- K concurrent streams read to their end, aggregate events/s.

Command line (ad-hoc use against a running server)::

    python benchmarks/loadclient.py --port 8000 burst --path '/burst?n=100000' --streams 10
    python benchmarks/loadclient.py --port 8000 idle --path /idle --count 1000 --hold 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

__all__ = [
    "BurstResult",
    "EventCounter",
    "OpenManyResult",
    "ProtocolError",
    "ResponseHead",
    "SSEStreamProtocol",
    "burst",
    "connect",
    "open_many",
    "open_stream",
    "raise_nofile_limit",
    "run",
]

T = TypeVar("T")

MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE_BYTES = 4 * 1024
_NL = 0x0A


class ProtocolError(Exception):
    """The server's response could not be parsed or ended unexpectedly."""


@dataclass(frozen=True)
class ResponseHead:
    """Status line and headers of a response (header names lower-cased)."""

    status: int
    reason: str
    headers: dict[str, str]


class EventCounter:
    """Counts ``\\n\\n`` event terminators in a byte stream fed piecewise.

    The count equals ``whole_stream.count(b"\\n\\n")`` however the stream is
    split: a newline that ends one piece and is not already part of a counted
    pair is remembered and paired with a newline starting the next piece.
    """

    __slots__ = ("_pending_newline", "body_bytes", "events")

    def __init__(self) -> None:
        self.events = 0
        self.body_bytes = 0
        self._pending_newline = False

    def feed(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        """Count the terminators in ``data[start:end]`` (no copy is made)."""
        if end is None:
            end = len(data)
        if start >= end:
            return
        self.body_bytes += end - start
        if self._pending_newline and data[start] == _NL:
            self.events += 1
            start += 1
            if start == end:
                self._pending_newline = False
                return
        self.events += data.count(b"\n\n", start, end)
        # bytes.count pairs newlines left to right, so the last newline of a
        # trailing run is left unpaired exactly when the run has odd length.
        run_length = 0
        index = end - 1
        while index >= start and data[index] == _NL:
            run_length += 1
            index -= 1
        self._pending_newline = run_length % 2 == 1


class SSEStreamProtocol(asyncio.Protocol):
    """One SSE request/response on its own connection.

    Await :attr:`head` for the response head and :attr:`done` for the end of
    the body. Timestamps are ``time.perf_counter()`` values.
    """

    _HEAD, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _LENGTH, _UNTIL_CLOSE, _DONE = range(8)
    _CHUNKED_STATES = frozenset((_CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER))

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.counter = EventCounter()
        self.chunks = 0  # non-empty body chunks received (chunked coding only)
        self.head: asyncio.Future[ResponseHead] = self._loop.create_future()
        self.done: asyncio.Future[None] = self._loop.create_future()
        for future in (self.head, self.done):
            # Mark exceptions as retrieved: an idle stream may never be awaited
            # to its end. Whoever awaits the future still gets the exception.
            future.add_done_callback(_swallow_unretrieved)
        self.t_request_sent = 0.0
        self.t_head = 0.0
        self.t_done = 0.0
        self._state = self._HEAD
        self._buffer = b""
        self._remaining = 0
        self._closing = False

    # -- public API -------------------------------------------------------

    @property
    def events(self) -> int:
        return self.counter.events

    @property
    def body_bytes(self) -> int:
        return self.counter.body_bytes

    def send_request(self, path: str, host: str = "127.0.0.1") -> None:
        """Write the GET request; records :attr:`t_request_sent`."""
        if self.transport is None:
            raise RuntimeError("not connected")
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode("latin-1")
        self.t_request_sent = time.perf_counter()
        self.transport.write(request)

    def close(self, *, abort: bool = True) -> None:
        """Drop the connection; ``abort`` resets it (no TIME_WAIT left behind)."""
        self._closing = True
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parse(data)
        except ProtocolError as exc:
            self._fail(exc)
            self.close()

    def eof_received(self) -> bool:
        if self._state == self._UNTIL_CLOSE:
            self._finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == self._UNTIL_CLOSE:
            self._finish()
        if self._closing:  # closed on purpose: nobody is owed an error
            for future in (self.head, self.done):
                future.cancel()
            return
        reason = f"connection lost ({exc!r})" if exc else "connection closed by server"
        self._fail(ProtocolError(f"{reason} before the end of the response"))

    # -- parsing ----------------------------------------------------------

    def _parse(self, data: bytes) -> None:
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        pos = 0
        if self._state == self._HEAD:
            pos = self._parse_head(data)
            if pos < 0:
                return
        if self._state in self._CHUNKED_STATES:
            self._parse_chunked(data, pos)
        elif self._state == self._LENGTH:
            take = min(self._remaining, len(data) - pos)
            self.counter.feed(data, pos, pos + take)
            self._remaining -= take
            if self._remaining == 0:
                self._finish()
        elif self._state == self._UNTIL_CLOSE:
            self.counter.feed(data, pos)
        # _DONE: bytes after the end of the response are ignored.

    def _parse_head(self, data: bytes) -> int:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HEAD_BYTES:
                raise ProtocolError("response head too large")
            self._buffer = data
            return -1
        lines = data[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line: {lines[0]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ProtocolError(f"bad header line: {line!r}")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        head = ResponseHead(int(parts[1]), parts[2] if len(parts) > 2 else "", headers)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = self._CHUNK_SIZE
        elif "content-length" in headers:
            self._state = self._LENGTH
            self._remaining = int(headers["content-length"])
        else:
            self._state = self._UNTIL_CLOSE
        self.t_head = time.perf_counter()
        if not self.head.done():
            self.head.set_result(head)
        if self._state == self._LENGTH and self._remaining == 0:
            self._finish()
        return end + 4

    def _parse_chunked(self, data: bytes, pos: int) -> None:
        counter = self.counter
        size_state, data_state, crlf_state = self._CHUNK_SIZE, self._CHUNK_DATA, self._CHUNK_CRLF
        n = len(data)
        state = self._state
        while pos < n:
            if state == size_state:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > MAX_CHUNK_LINE_BYTES:
                        raise ProtocolError("chunk size line too long")
                    self._buffer = data[pos:]
                    break
                try:
                    size = int(data[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size line: {data[pos:eol]!r}") from None
                pos = eol + 2
                if size == 0:
                    state = self._TRAILER
                    continue
                self.chunks += 1
                if n - pos >= size + 2:  # fast path: the whole chunk is here
                    counter.feed(data, pos, pos + size)
                    pos += size
                    if data[pos : pos + 2] != b"\r\n":
                        raise ProtocolError("chunk not followed by CRLF")
                    pos += 2
                    continue
                self._remaining = size
                state = data_state
            elif state == data_state:
                take = min(self._remaining, n - pos)
                counter.feed(data, pos, pos + take)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    state = crlf_state
            elif state == crlf_state:
                if n - pos < 2:
                    self._buffer = data[pos:]
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise ProtocolError("chunk not followed by CRLF")
                pos += 2
                state = size_state
            else:  # trailer section, ended by an empty line
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > MAX_CHUNK_LINE_BYTES:
                        raise ProtocolError("trailer line too long")
                    self._buffer = data[pos:]
                    break
                if eol == pos:
                    self._state = state
                    self._finish()
                    return
                pos = eol + 2
        self._state = state

    def _finish(self) -> None:
        if self._state == self._DONE:
            return
        self._state = self._DONE
        self.t_done = time.perf_counter()
        if not self.done.done():
            self.done.set_result(None)

    def _fail(self, exc: Exception) -> None:
        for future in (self.head, self.done):
            if not future.done():
                future.set_exception(exc)


def _swallow_unretrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


# -- helpers -------------------------------------------------------------


async def connect(
    host: str, port: int, *, time_limit: float = 10.0, local_host: str | None = None
) -> SSEStreamProtocol:
    """Open a TCP connection carrying a fresh :class:`SSEStreamProtocol`.

    ``local_host`` binds the client's end to that address (127.0.0.x), so more
    streams than one address has ephemeral ports can be open at once.
    """
    loop = asyncio.get_running_loop()
    local_addr = None if local_host is None else (local_host, 0)
    async with asyncio.timeout(time_limit):
        _, protocol = await loop.create_connection(
            lambda: SSEStreamProtocol(loop), host, port, local_addr=local_addr
        )
    return protocol


async def open_stream(
    host: str,
    port: int,
    path: str,
    *,
    time_limit: float = 10.0,
    local_host: str | None = None,
) -> tuple[SSEStreamProtocol, ResponseHead]:
    """Connect, send the request and wait for the response head."""
    async with asyncio.timeout(time_limit):
        protocol = await connect(host, port, time_limit=time_limit, local_host=local_host)
        try:
            protocol.send_request(path, host)
            head = await protocol.head
        except BaseException:
            protocol.close()
            raise
    return protocol, head


@dataclass
class OpenManyResult:
    """Outcome of :func:`open_many`; the caller owns (and must close) ``streams``."""

    streams: list[SSEStreamProtocol]
    heads: list[ResponseHead]
    errors: list[str]
    t_first_connect: float
    t_last_head: float

    @property
    def elapsed(self) -> float:
        """Seconds from the first connect to the last response head."""
        return self.t_last_head - self.t_first_connect

    def close_all(self) -> None:
        for stream in self.streams:
            stream.close()
        self.streams.clear()


async def open_many(
    host: str,
    port: int,
    path: str,
    count: int,
    *,
    concurrency: int = 200,
    time_limit: float = 30.0,
    local_hosts: Sequence[str] = (),
) -> OpenManyResult:
    """Open ``count`` streams, at most ``concurrency`` handshakes in flight.

    Each stream is done once its response head arrived; ``time_limit`` bounds each
    stream's connect + head. Failures are collected, not raised. ``local_hosts``
    (loopback addresses such as ``127.0.0.2``) are the client's source addresses,
    taken in turn; none: the system picks one.
    """
    semaphore = asyncio.Semaphore(concurrency)
    result = OpenManyResult([], [], [], 0.0, 0.0)

    async def one(index: int) -> None:
        local_host = local_hosts[index % len(local_hosts)] if local_hosts else None
        async with semaphore:
            try:
                protocol, head = await open_stream(
                    host, port, path, time_limit=time_limit, local_host=local_host
                )
            except (OSError, ProtocolError, TimeoutError) as exc:
                result.errors.append(f"{type(exc).__name__}: {exc}")
                return
        result.streams.append(protocol)
        result.heads.append(head)
        result.t_last_head = max(result.t_last_head, protocol.t_head)

    result.t_first_connect = time.perf_counter()
    try:
        await asyncio.gather(*(one(index) for index in range(count)))
    except BaseException:  # e.g. cancelled by an outer timeout: leak nothing
        result.close_all()
        raise
    return result


@dataclass
class BurstResult:
    """Outcome of :func:`burst`."""

    events: list[int]
    body_bytes: list[int]
    chunks: list[int]
    heads: list[ResponseHead]
    t_first_request: float
    t_last_done: float
    per_stream_seconds: list[float] = field(default_factory=list)

    @property
    def total_events(self) -> int:
        return sum(self.events)

    @property
    def total_chunks(self) -> int:
        return sum(self.chunks)

    @property
    def elapsed(self) -> float:
        """Seconds from the first request written to the last terminal chunk."""
        return self.t_last_done - self.t_first_request

    @property
    def events_per_second(self) -> float:
        return self.total_events / self.elapsed


async def burst(
    host: str, port: int, path: str, *, streams: int = 1, time_limit: float = 120.0
) -> BurstResult:
    """Read ``streams`` concurrent responses of ``path`` to their end.

    All connections are established first; the clock starts when the first
    request is written and stops at the last terminal chunk.
    """
    protocols: list[SSEStreamProtocol] = []
    heads: list[ResponseHead] = []
    try:
        async with asyncio.timeout(time_limit):
            for _ in range(streams):
                protocols.append(await connect(host, port, time_limit=time_limit))
            for protocol in protocols:
                protocol.send_request(path, host)
            heads = list(await asyncio.gather(*(p.head for p in protocols)))
            await asyncio.gather(*(p.done for p in protocols))
    finally:
        for protocol in protocols:
            protocol.close(abort=False)
    return BurstResult(
        events=[p.events for p in protocols],
        body_bytes=[p.body_bytes for p in protocols],
        chunks=[p.chunks for p in protocols],
        heads=heads,
        t_first_request=min(p.t_request_sent for p in protocols),
        t_last_done=max(p.t_done for p in protocols),
        per_stream_seconds=[p.t_done - p.t_request_sent for p in protocols],
    )


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def run(coro: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``coro`` on a fresh event loop (uvloop when available and wanted)."""
    loop_factory = None
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


# -- command line ----------------------------------------------------------


async def _cli_burst(args: argparse.Namespace) -> None:
    result = await burst(
        args.host, args.port, args.path, streams=args.streams, time_limit=args.timeout
    )
    print(
        f"{result.total_events} events ({sum(result.body_bytes)} body bytes, "
        f"{result.total_chunks} chunks) over "
        f"{args.streams} stream(s) in {result.elapsed:.3f} s: "
        f"{result.events_per_second:,.0f} events/s; status {result.heads[0].status}"
    )


async def _cli_idle(args: argparse.Namespace) -> None:
    result = await open_many(
        args.host,
        args.port,
        args.path,
        args.count,
        concurrency=args.concurrency,
        time_limit=args.timeout,
    )
    try:
        print(
            f"{len(result.streams)} streams open ({len(result.errors)} failed) "
            f"in {result.elapsed:.3f} s; holding {args.hold} s"
        )
        for error in sorted(set(result.errors))[:5]:
            print(f"  error: {error}")
        await asyncio.sleep(args.hold)
        ended = sum(1 for s in result.streams if s.done.done())
        print(f"{ended} streams ended while held")
    finally:
        result.close_all()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument(
        "--asyncio", action="store_true", help="use the stock asyncio loop, not uvloop"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    burst_parser = commands.add_parser("burst", help="read streams to their end, report events/s")
    burst_parser.add_argument("--path", default="/burst?n=100000")
    burst_parser.add_argument("--streams", type=int, default=1)
    idle_parser = commands.add_parser("idle", help="open idle streams and hold them")
    idle_parser.add_argument("--path", default="/idle")
    idle_parser.add_argument("--count", type=int, default=1000)
    idle_parser.add_argument("--concurrency", type=int, default=200)
    idle_parser.add_argument("--hold", type=float, default=2.0)
    args = parser.parse_args(argv)
    raise_nofile_limit()
    command = _cli_burst if args.command == "burst" else _cli_idle
    with contextlib.suppress(KeyboardInterrupt):
        run(command(args), use_uvloop=not args.asyncio)


if __name__ == "__main__":
    main()
