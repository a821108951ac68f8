"""Load and soak of sseviews against a real uvicorn, runnable on its own.

From the repo root::

    python -m tests.load.run                                          # the CI size
    python -m tests.load.run --streams 1000 --seconds 60 --rate 50
    python -m tests.load.run --streams 10000 --seconds 300 --rate 5 --churn-mean 30 --warm-up 60
    python -m tests.load.run --scenario shutdown --streams 1000

The server is `tests/load/app.py` under uvicorn (uvloop, httptools) on 127.0.0.1,
in its own process; the clients are raw-socket `asyncio.Protocol`s in this process
(no HTTP library, no task per stream), which parse every event's id.

**soak** (the default). A tenth of the streams ("stayers") connect and stay; the
rest ("churners") connect, hold their stream for a random time (exponential, mean
`--churn-mean` s), leave, with FIN or (`--rst-fraction` of the time) with a TCP
RST, and come back after a short random pause; 5% of their visits leave right
after sending the request, before the response head. Once about as many streams
as expected are open, the server publishes `--rate` events per second for
`--seconds` seconds while the churn goes on; then every client leaves.

This runs twice: first for `--warm-up` seconds, then the soak proper. The server's
RSS and asyncio task count are read, after a `gc.collect()`, between the two and
after the soak, once the server reports no open stream. CPython keeps the memory
of its peak (pymalloc's arenas stay mapped while any block in them lives), so RSS
is compared with the warmed-up level, and what the soak adds beyond it is memory
the load does not give back; `--warm-up 0` compares with the fresh process
instead (its RSS is always reported). It is checked that:

1. every `on_connect` was matched by exactly one `on_disconnect`;
2. the server's asyncio task count is back to its baseline (within 2);
3. its RSS, after a `gc.collect()`, is within 10% of the baseline;
4. every stayer received every event published while it was connected, in order,
   with no duplicate (against the ids the server says it published);
5. every churner's stream was contiguous (no event missing between the first and
   the last it received, none repeated), no stream was ended by the server, and
   every request got its 200.

Checks 4 and 5 cover the warm-up's streams too.

**shutdown**: `--streams` streams are opened, events are published to them for a
second, and the server gets SIGTERM. It must exit within 2 s (the view's default
grace period is 0) without uvicorn's "Waiting for connections to close", every
stream must get its terminal chunk, and the counters the app writes at lifespan
shutdown must show one `on_disconnect(SHUTDOWN)` per stream.

A table of figures is printed; the exit status is 1 if any check failed.

The third command is the manual size (about 7 minutes). At 10k streams the
client and the server share the machine, so keep the delivery
rate (streams x rate events per second) near the CI size's 50k/s, hence `--rate 5`,
and the reconnection rate near 300/s (the client opens ~1000 streams/s at most
there), hence `--churn-mean 30`; the allocator reaches its peak more slowly with
that churn, hence `--warm-up 60`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import struct
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from .app import RECORD_ENV, raise_nofile_limit

try:  # under pytest, tests/ is on sys.path
    from support.processes import clean_env
    from support.servers import ServerProcess as Server
    from support.servers import start_server, uvicorn
except ImportError:  # `python -m tests.load.run` from the repo root
    from tests.support.processes import clean_env
    from tests.support.servers import ServerProcess as Server
    from tests.support.servers import start_server, uvicorn

T = TypeVar("T")

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
APP = "tests.load.app:create_app"
WAITING_HANG = "Waiting for connections to close"
WAITING_TASKS = "Waiting for background tasks to complete"

# Tasks the server may have beyond its baseline once idle again (none expected).
TASK_TOLERANCE = 2
# How far RSS may be from its baseline after the load, as a fraction of it.
RSS_TOLERANCE = 0.10
# Bounds, in seconds.
CONNECT_TIMEOUT = 10.0  # one stream's connect + response head
DEBUG_TIMEOUT = 10.0  # one debug request
RAMP_TIMEOUT = 30.0  # until about --streams streams are open
SETTLE_TIMEOUT = 30.0  # until the server reports no open stream, after the clients left
SHUTDOWN_LIMIT = 2.0  # SIGTERM to exit, with streams open
MAX_ERRORS_KEPT = 20
# Of the streams expected open at once, how many must be on average for the load to
# count (fewer: the clients could not reconnect as fast as the churn asks). The
# client shares the machine's 2 cores with the server: on the 2026-12-07 machine it
# held 569 to 674 of 981 on average, the code before and after that day's changes
# alike, where the machine of 2026-12-02 held over 80%.
HELD_FRACTION = 0.5


# -- the server process ---------------------------------------------------------------


#: The load app under uvicorn as production runs it: uvloop, httptools, a deep backlog.
UVICORN = uvicorn(
    APP, "--factory", "--loop", "uvloop", "--http", "httptools",
    "--no-access-log", "--backlog", "4096",
)  # fmt: skip


@contextmanager
def uvicorn_server(workdir: Path, record: Path | None = None) -> Iterator[Server]:
    """Run the load app under uvicorn until the block ends; it is always stopped."""
    # The server inherits the raised limit too (and raises its own in create_app()).
    raise_nofile_limit()
    extra = {RECORD_ENV: str(record)} if record is not None else {}
    env = clean_env(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **extra
    )
    with start_server(UVICORN, workdir, env, health="/debug/stats", seconds=20) as server:
        yield server


async def request_json(port: int, method: str, path: str) -> Any:
    """One debug request on its own connection; its JSON body."""
    async with asyncio.timeout(DEBUG_TIMEOUT):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            data = await reader.read()
        finally:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if not 200 <= status < 300:
        raise RuntimeError(f"{method} {path}: {status} {body[:200]!r}")
    return json.loads(body)


# -- one stream ----------------------------------------------------------------------


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass(frozen=True, slots=True)
class StreamSummary:
    """What one stream received, in a form cheap to keep for every connection."""

    first: int | None
    last: int | None
    count: int
    disorder: int  # ids not greater than the one before: duplicates or out of order
    jumps: tuple[tuple[int, int], ...]  # (previous, next) where next != previous + 1
    foreign: int  # ids of another epoch, or not ids of this server at all
    ended_by_server: bool


class Pool:
    """The client side: every stream, the counters, and the rules of the churn."""

    def __init__(self, port: int, prefix: bytes, concurrency: int) -> None:
        self.port = port
        self.prefix = prefix
        self.connecting = asyncio.Semaphore(concurrency)
        self.stopping = asyncio.Event()
        self.live: set[StreamClient] = set()
        self.held = 0  # streams with a 200 head, not yet closed
        self.connections = 0  # TCP connections made
        self.closed = {"FIN": 0, "RST": 0}  # streams closed by us, by how
        self.early = {"FIN": 0, "RST": 0}  # connections left right after the request
        self.dropped = 0  # connections reset after an error
        self.error_count = 0
        self.errors: list[str] = []
        self.summaries: list[StreamSummary] = []  # of closed churner streams

    def error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(message)

    async def connect(self, *, keep_ids: bool = False) -> StreamClient | None:
        """Connect and send the request; None (and an error counted) if that failed."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, client = await loop.create_connection(
                    lambda: StreamClient(self, keep_ids=keep_ids), HOST, self.port
                )
        except (OSError, TimeoutError) as exc:
            self.error(f"connect: {type(exc).__name__}: {exc}")
            return None
        self.connections += 1
        self.live.add(client)
        client.send_request()
        return client

    async def open(self, *, keep_ids: bool = False) -> StreamClient | None:
        """Open one stream up to its 200 head; None (and an error counted) if that failed."""
        async with self.connecting:
            client = await self.connect(keep_ids=keep_ids)
            if client is None:
                return None
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    status = await client.status
            except (OSError, TimeoutError, ProtocolError) as exc:
                self.error(f"head: {type(exc).__name__}: {exc}")
                self.drop(client)
                return None
        if status != 200:
            self.error(f"head: status {status}")
            self.drop(client)
            return None
        return client

    def drop(self, client: StreamClient) -> None:
        """Reset a connection that is not counted as a stream."""
        client.close(rst=True)
        self.live.discard(client)
        self.dropped += 1

    async def open_and_drop(self, *, rst: bool, delay: float) -> None:
        """Connect, send the request and leave `delay` s later, before reading anything."""
        async with self.connecting:
            client = await self.connect()
        if client is not None:
            await asyncio.sleep(delay)
            self.early["RST" if rst else "FIN"] += 1
            client.close(rst=rst)
            self.live.discard(client)

    def close(self, client: StreamClient, *, rst: bool) -> StreamSummary:
        summary = client.summary()
        client.close(rst=rst)
        self.live.discard(client)
        self.closed["RST" if rst else "FIN"] += 1
        return summary

    def close_all(self) -> None:
        for client in list(self.live):
            client.close(rst=True)
        self.live.clear()

    async def pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less if the churn stops meanwhile."""
        with suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stopping.wait()

    async def churn(self, rng: random.Random, config: LoadConfig) -> None:
        """One churner: connect, hold, leave (FIN or RST), pause; until the churn stops."""
        mean = config.churn_mean
        while not self.stopping.is_set():
            rst = rng.random() < config.rst_fraction
            if rng.random() < config.early_fraction:
                await self.open_and_drop(rst=rst, delay=rng.uniform(0, 0.01))
            else:
                client = await self.open()
                if client is not None:
                    await self.pause(min(rng.expovariate(1 / mean), 4 * mean))
                    self.summaries.append(self.close(client, rst=rst))
            await self.pause(rng.uniform(0, 2 * config.gap_mean))


class ProtocolError(Exception):
    """The server's response could not be parsed."""


class StreamClient(asyncio.Protocol):
    """One SSE stream on its own connection; checks the ids as they arrive.

    Every event of the load app starts with its `id:` line; the id must be of this
    server's epoch and greater than the one before. Gaps are kept as `jumps`, to be
    checked against the ids the server published.
    """

    def __init__(self, pool: Pool, *, keep_ids: bool) -> None:
        loop = asyncio.get_running_loop()
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.status: asyncio.Future[int] = loop.create_future()
        self.status.add_done_callback(_retrieve)
        self.finished: asyncio.Future[None] = loop.create_future()  # the server ended it
        self.finished.add_done_callback(_retrieve)
        self.closed_by_us = False
        self.clean_end = False  # the terminal chunk came
        self.ended_by_server = False  # ... or the connection was lost, while we held it
        self.seqs: array[int] | None = array("q") if keep_ids else None
        self.first: int | None = None
        self.last: int | None = None
        self.count = 0
        self.disorder = 0
        self.foreign = 0
        self.comments = 0
        self.jumps: list[tuple[int, int]] = []
        self._prefix = pool.prefix
        self._held = False
        self._in_body = False
        self._ignore = False  # not a stream: the rest of the response is not parsed
        self._raw = b""
        self._pending = b""

    def send_request(self) -> None:
        assert self.transport is not None
        self.transport.write(
            b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
        )

    def close(self, *, rst: bool) -> None:
        if self.closed_by_us:
            return
        self.closed_by_us = True
        self._release()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if rst:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with suppress(OSError):
                    # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()

    def summary(self) -> StreamSummary:
        return StreamSummary(
            self.first,
            self.last,
            self.count,
            self.disorder,
            tuple(self.jumps),
            self.foreign,
            self.ended_by_server,
        )

    def _release(self) -> None:
        if self._held:
            self._held = False
            self.pool.held -= 1

    def _ended(self, *, clean: bool) -> None:
        self.clean_end = clean
        if not self.closed_by_us:
            self.ended_by_server = True
        self._release()
        if not self.status.done():
            self.status.set_exception(ProtocolError("the connection ended before the head"))
        if not self.finished.done():
            self.finished.set_result(None)

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self._ended(clean=False)

    def data_received(self, data: bytes) -> None:
        if self.finished.done() or self._ignore:
            return
        try:
            self._parse(data)
        except (ProtocolError, ValueError) as exc:
            self.pool.error(f"parse: {type(exc).__name__}: {exc}")
            self._ended(clean=False)
            self.close(rst=True)

    # -- parsing -------------------------------------------------------------------

    def _parse(self, data: bytes) -> None:
        if self._raw:
            data = self._raw + data
            self._raw = b""
        pos = 0
        if not self._in_body:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > 65536:
                    raise ProtocolError("response head too large")
                self._raw = data
                return
            head = data[:end].decode("latin-1")
            status = int(head.split(" ", 2)[1])
            if status == 200 and "transfer-encoding: chunked" not in head.lower():
                raise ProtocolError("a 200 stream that is not chunked")
            self._in_body = True
            if status == 200:
                self._held = True
                self.pool.held += 1
            self.status.set_result(status)
            if status != 200:
                self._ignore = True
                return
            pos = end + 4
        size_of = int
        length = len(data)
        while pos < length:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                break
            size = size_of(data[pos:eol].split(b";", 1)[0], 16)
            start = eol + 2
            if size == 0:
                # Only ping lines (comments) may follow the last message.
                if any(not line.startswith(b":") for line in self._pending.split(b"\n") if line):
                    raise ProtocolError(f"the body ends mid-message: {self._pending[:80]!r}")
                self.comments += sum(1 for line in self._pending.split(b"\n") if line)
                self._ended(clean=True)
                return
            stop = start + size
            if stop + 2 > length:
                break
            if data[stop : stop + 2] != b"\r\n":
                raise ProtocolError("a chunk not followed by CRLF")
            self._feed(data[start:stop])
            pos = stop + 2
        if pos < length:
            self._raw = data[pos:]

    def _feed(self, body: bytes) -> None:
        if self._pending:
            body = self._pending + body
        messages = body.split(b"\n\n")
        self._pending = messages.pop()
        prefix = self._prefix
        for message in messages:
            # A ping is one comment line with no blank line after it: it comes at
            # the start of the next message (or alone, at the end of a stream).
            while message.startswith(b":"):
                self.comments += 1
                end = message.find(b"\n")
                message = message[end + 1 :] if end >= 0 else b""
            if not message:
                continue
            if message.startswith(b"id: "):
                end = message.find(b"\n")
                value = message[4:end] if end >= 0 else message[4:]
            else:
                value = b""
                for line in message.split(b"\n"):
                    if line.startswith(b"id:"):
                        value = line[3:].removeprefix(b" ")
                if not value:
                    self.foreign += 1  # an event without an id: not one of ours
                    continue
            if not value.startswith(prefix):
                self.foreign += 1
                continue
            seq = int(value[len(prefix) :])
            self.count += 1
            if self.seqs is not None:
                self.seqs.append(seq)
            last = self.last
            if last is None:
                self.first = seq
            elif seq <= last:
                self.disorder += 1
                continue
            elif seq != last + 1:
                self.jumps.append((last, seq))
            self.last = seq


# -- checking what streams received --------------------------------------------------


def stream_problem(summary: StreamSummary, position: dict[int, int]) -> str | None:
    """Why `summary` is not a contiguous run of published events; None if it is."""
    if summary.foreign:
        return f"{summary.foreign} event(s) with an id this server did not publish"
    if summary.disorder:
        return f"{summary.disorder} duplicate or out-of-order event(s)"
    if summary.first is None or summary.last is None:
        return None
    if summary.first not in position or summary.last not in position:
        return f"ids {summary.first}..{summary.last} were not all published"
    for previous, following in summary.jumps:
        if previous not in position or following not in position:
            return f"ids {previous} and {following} were not both published"
        missing = position[following] - position[previous] - 1
        if missing:
            return f"{missing} event(s) missing between ids {previous} and {following}"
    expected = position[summary.last] - position[summary.first] + 1
    if summary.count != expected:
        return f"{summary.count} events received, {expected} published over that span"
    return None


def stayer_problem(client: StreamClient, published: list[int]) -> str | None:
    """Why a stayer did not receive exactly `published`; None if it did."""
    if client.ended_by_server:
        return "the server ended the stream"
    received = list(client.seqs or ())
    if received == published:
        return None
    seen = set(received)
    missing = [seq for seq in published if seq not in seen]
    duplicates = len(received) - len(seen)
    extra = sorted(seen - set(published))
    return (
        f"received {len(received)} of {len(published)} events: {len(missing)} missing "
        f"(first {missing[:5]}), {duplicates} duplicate(s), {len(extra)} never published "
        f"(first {extra[:5]}), in order: {received == sorted(seen)}"
    )


# -- reports -------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    """Figures and checks of one run."""

    scenario: str
    figures: list[tuple[str, str]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    def figure(self, name: str, value: object) -> None:
        self.figures.append((name, str(value)))

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def failures(self) -> list[str]:
        return [f"{check.name}: {check.detail}" for check in self.checks if not check.ok]

    def table(self) -> str:
        width = max(len(name) for name, _ in self.figures) if self.figures else 0
        lines = [f"sseviews load: {self.scenario}", ""]
        lines += [f"  {name:<{width}}  {value}" for name, value in self.figures]
        lines.append("")
        lines += [
            f"  [{'ok' if check.ok else 'FAIL'}] {check.name}: {check.detail}"
            for check in self.checks
        ]
        lines.append(f"\n{'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _span(values: Sequence[int]) -> str:
    if not values:
        return "-"
    return f"min {min(values)} / mean {sum(values) / len(values):.0f} / max {max(values)}"


async def _bounded(coro: Coroutine[Any, Any, T], seconds: float) -> T:
    async with asyncio.timeout(seconds):
        return await coro


def _run(coro: Coroutine[Any, Any, T], *, seconds: float) -> T:
    """Run `coro` on a fresh uvloop loop, for `seconds` at most."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_bounded(coro, seconds))


# -- soak ----------------------------------------------------------------------------


@dataclass
class LoadConfig:
    """The sizes and the randomness of a soak run."""

    streams: int = 1000  # streams held at once
    seconds: float = 40.0  # of publishing and churn (warm-up, setup and checks come on top)
    rate: float = 50.0  # events published per second
    stayer_fraction: float = 0.1  # of the streams, connected for the whole run
    churn_mean: float = 5.0  # mean seconds a churner holds its stream
    gap_mean: float = 0.1  # mean seconds before a churner comes back
    rst_fraction: float = 0.3  # of the closes, with a TCP RST instead of FIN
    early_fraction: float = 0.05  # of the churner's visits, left before the response head
    concurrency: int = 200  # handshakes in flight at once
    seed: int | None = None
    warm_up: float = 15.0  # seconds of the same load before the baseline is read; 0: none

    @property
    def stayers(self) -> int:
        return max(1, round(self.streams * self.stayer_fraction))

    @property
    def expected_held(self) -> float:
        """Streams open at once on average: churners are away for part of the time."""
        held = (1 - self.early_fraction) * self.churn_mean  # per visit, on average
        churners = self.streams - self.stayers
        return self.stayers + churners * held / (held + self.gap_mean)


async def _wait_for(probe: Callable[[], Any], *, seconds: float, interval: float = 0.1) -> bool:
    """Poll `probe` (a function, sync or async) until it returns something true;
    False if `seconds` pass first. For state no event can wake us for: another
    process's counters, or many streams at once."""
    with suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                value = probe()
                if asyncio.iscoroutine(value):
                    value = await value
                if value:
                    return True
                await asyncio.sleep(interval)
    return False


async def _settle(port: int) -> bool:
    """Wait until the server has no open stream and every on_connect had its on_disconnect."""

    async def settled() -> bool:
        stats = await request_json(port, "GET", "/debug/stats")
        return bool(stats["open"] == 0 and stats["connects"] == stats["disconnects"]["total"])

    return await _wait_for(settled, seconds=SETTLE_TIMEOUT)


async def _tasks_back(port: int, tasks: int) -> bool:
    """Wait (5 s at most) until the server runs no more than `tasks` asyncio tasks.

    The last streams' tasks may still be finishing their teardown, and the shutdown
    watcher of sseviews lives until its next poll (50 ms) after the last stream.
    """

    async def back() -> bool:
        stats = await request_json(port, "GET", "/debug/stats")
        return bool(stats["tasks"] <= tasks)

    return await _wait_for(back, seconds=5)


async def _publish(port: int, count: int, rate: float) -> list[int]:
    """Have the server publish `count` events at `rate`; the seqs it published, in order."""
    started = await request_json(port, "POST", f"/debug/publish?n={count}&rate={rate}")
    answer: dict[str, Any] = {}

    async def done() -> bool:
        answer.update(await request_json(port, "GET", "/debug/published"))
        return bool(answer["done"])

    if not await _wait_for(done, seconds=count / rate + 30):
        raise RuntimeError(f"the server did not publish {count} events in time")
    if answer["error"]:
        raise RuntimeError(f"publishing failed: {answer['error']}")
    first = started["first"]
    return [int(event_id.rsplit("-", 1)[1]) for event_id in answer["ids"][first : first + count]]


@dataclass
class Phase:
    """What the clients of one churn phase saw."""

    pool: Pool
    stayers: list[StreamClient]
    published: list[int]
    caught_up: bool  # every stayer got the last event published
    samples: list[tuple[int, int, int, int]]  # server open, client held, rss, tasks; 1 s apart
    seconds: float
    ramp: float  # seconds until about as many streams as expected were open


async def _churn_phase(
    config: LoadConfig, port: int, prefix: bytes, rng: random.Random, seconds: float
) -> Phase:
    """Stayers connect; churners come and go; events are published for `seconds`.

    Returns once every client has left (the server may still be tearing down).
    """
    pool = Pool(port, prefix, config.concurrency)
    phase = Phase(pool, [], [], False, [], 0.0, 0.0)
    count = max(1, round(config.rate * seconds))

    async def sample() -> None:
        while not pool.stopping.is_set():
            stats = await request_json(port, "GET", "/debug/stats")
            if not pool.stopping.is_set():  # not one taken while the clients leave
                phase.samples.append((stats["open"], pool.held, stats["rss"], stats["tasks"]))
            await pool.pause(1.0)

    async def publish() -> None:
        phase.published = await _publish(port, count, config.rate)

    try:
        ramp_started = time.monotonic()
        opened = await asyncio.gather(*(pool.open(keep_ids=True) for _ in range(config.stayers)))
        phase.stayers = [client for client in opened if client is not None]
        async with asyncio.TaskGroup() as tasks:
            for _ in range(config.streams - config.stayers):
                tasks.create_task(pool.churn(rng, config))
            target = 0.95 * config.expected_held
            if not await _wait_for(lambda: pool.held >= target, seconds=RAMP_TIMEOUT):
                pool.error(f"only {pool.held} of ~{target:.0f} streams open after the ramp")
            started = time.monotonic()
            phase.ramp = started - ramp_started
            publisher = tasks.create_task(publish())
            sampler = tasks.create_task(sample())
            await asyncio.sleep(seconds)
            pool.stopping.set()
            await sampler
            await publisher
        phase.seconds = time.monotonic() - started
        final = phase.published[-1] if phase.published else None
        phase.caught_up = await _wait_for(
            lambda: all(c.last == final or c.ended_by_server for c in phase.stayers), seconds=15
        )
        for client in phase.stayers:
            pool.close(client, rst=False)
    finally:
        pool.close_all()
    return phase


def _check_streams(report: Report, config: LoadConfig, phases: list[Phase]) -> None:
    """Checks 4 and 5: what every stayer and every churner received."""
    stayers = bad = 0
    first_bad = ""
    for phase in phases:
        for client in phase.stayers:
            stayers += 1
            problem = stayer_problem(client, phase.published)
            if problem or not phase.published or not phase.caught_up:
                bad += 1
                first_bad = first_bad or (problem or "did not get the last event in 15 s")
    expected = config.stayers * len(phases)
    report.check(
        "every stayer got every event, in order, once",
        stayers == expected and bad == 0,
        f"{stayers - bad} of {expected} stayers got all "
        f"{' + '.join(str(len(phase.published)) for phase in phases)} events"
        + (f"; first problem: {first_bad}" if first_bad else ""),
    )
    streams = problems = ended = errors = 0
    first_problem = ""
    messages: list[str] = []
    for phase in phases:
        position = {seq: index for index, seq in enumerate(phase.published)}
        for summary in phase.pool.summaries:
            streams += 1
            ended += summary.ended_by_server
            if problem := stream_problem(summary, position):
                problems += 1
                first_problem = first_problem or problem
        errors += phase.pool.error_count
        messages += phase.pool.errors
    report.check(
        "every churner stream intact",
        problems == ended == errors == 0,
        f"{streams} streams: {problems} with a gap or duplicate, {ended} ended by the "
        f"server, {errors} request error(s)"
        + (f"; first problem: {first_problem}" if first_problem else "")
        + (f"; first error: {messages[0]}" if messages else ""),
    )


async def _soak(config: LoadConfig, server: Server, report: Report, seed: int) -> None:
    port = server.port
    rng = random.Random(seed)
    cold = await request_json(port, "POST", "/debug/gc")
    prefix = f"{cold['epoch']}-".encode()
    phases: list[Phase] = []
    warm_settled = True
    if config.warm_up:
        # CPython does not give back to the system the memory it used at its peak
        # (pymalloc's arenas stay mapped while any block in them is alive), so the
        # same load first runs for a while: RSS is then compared with that level, and
        # what the soak adds beyond it is memory the load does not give back.
        phases.append(await _churn_phase(config, port, prefix, rng, config.warm_up))
        warm_settled = await _settle(port)
        await _tasks_back(port, cold["tasks"])
    baseline = await request_json(port, "POST", "/debug/gc")
    main = await _churn_phase(config, port, prefix, rng, config.seconds)
    phases.append(main)
    all_closed = await _settle(port)
    await _tasks_back(port, baseline["tasks"])
    after = await request_json(port, "POST", "/debug/gc")

    # -- figures (of the soak proper; the server's counters cover the whole run) --
    pool, samples = main.pool, main.samples
    reasons = after["disconnects"]["by_reason"]
    streams = sum(pool.closed.values())
    early = sum(pool.early.values())
    if config.warm_up:
        warm = phases[0]
        report.figure(
            "warm-up (same load)",
            f"{warm.seconds:.1f} s, {warm.pool.connections} connections, "
            f"{len(warm.published)} events",
        )
    report.figure("soak", f"{main.seconds:.1f} s (after a ramp of {main.ramp:.1f} s)")
    report.figure("streams (target)", f"{config.streams} ({len(main.stayers)} stayers)")
    report.figure("streams held, server (1 s samples)", _span([s[0] for s in samples]))
    report.figure("streams held, client (1 s samples)", _span([s[1] for s in samples]))
    report.figure(
        "connections opened / closed (client)",
        f"{pool.connections} / {streams + early + pool.dropped}: "
        f"{streams} streams (FIN {pool.closed['FIN']}, RST {pool.closed['RST']}), "
        f"{early} left before the head (FIN {pool.early['FIN']}, RST {pool.early['RST']})"
        + (f", {pool.dropped} reset after an error" if pool.dropped else ""),
    )
    report.figure(
        "on_connect / on_disconnect (server, whole run)",
        f"{after['connects']} / {after['disconnects']['total']} "
        f"({', '.join(f'{k} {v}' for k, v in reasons.items() if v) or '-'})",
    )
    report.figure("events published", f"{len(main.published)} at {config.rate:g}/s")
    delivered = sum(s.count for s in pool.summaries) + sum(c.count for c in main.stayers)
    report.figure(
        "events delivered",
        f"{delivered} received by the clients "
        f"({after['metrics'].get('events', 0)} written by the server in the whole run)",
    )
    peak_rss = max((s[2] for s in samples), default=after["rss"])
    peak_tasks = max((s[3] for s in samples), default=after["tasks"])
    report.figure("server RSS, fresh process", _mib(cold["rss"]))
    report.figure(
        "server RSS before / peak / after",
        f"{_mib(baseline['rss'])} / {_mib(peak_rss)} / {_mib(after['rss'])} "
        f"({(after['rss'] - baseline['rss']) / baseline['rss']:+.1%})",
    )
    step = max(1, len(samples) // 9)
    report.figure(
        "server RSS during the soak (MiB)",
        " ".join(f"{s[2] / 2**20:.0f}" for s in samples[::step]) or "-",
    )
    report.figure(
        "Python blocks / gc objects before -> after",
        f"{baseline['blocks']} / {baseline['objects']} -> {after['blocks']} / {after['objects']}",
    )
    report.figure(
        "server tasks before / peak / after",
        f"{baseline['tasks']} / {peak_tasks} / {after['tasks']}",
    )

    # -- checks --
    report.check(
        "every on_connect has one on_disconnect",
        all_closed
        and warm_settled
        and after["connects"] == after["disconnects"]["total"]
        and after["open"] == 0,
        f"{after['connects']} on_connect, {after['disconnects']['total']} on_disconnect, "
        f"{after['open']} open" + ("" if all_closed else f" (not settled in {SETTLE_TIMEOUT:g} s)"),
    )
    held = [s[0] for s in samples]
    mean_held = sum(held) / len(held) if held else 0.0
    report.check(
        "the load was held",
        mean_held >= HELD_FRACTION * config.expected_held,
        f"{mean_held:.0f} streams open on average, {config.expected_held:.0f} expected "
        f"(at least {HELD_FRACTION:.0%} of it)",
    )
    report.check(
        "asyncio tasks back to baseline",
        abs(after["tasks"] - baseline["tasks"]) <= TASK_TOLERANCE,
        f"{baseline['tasks']} before, {after['tasks']} after (tolerance {TASK_TOLERANCE})",
    )
    change = (after["rss"] - baseline["rss"]) / baseline["rss"]
    report.check(
        "RSS within 10% of its pre-load level",
        abs(change) <= RSS_TOLERANCE,
        f"{_mib(baseline['rss'])} before, {_mib(after['rss'])} after gc ({change:+.1%})",
    )
    _check_streams(report, config, phases)


def run_soak(config: LoadConfig, workdir: Path) -> Report:
    """Run the soak against a fresh server; the report says what held."""
    started = time.monotonic()
    seed = config.seed if config.seed is not None else random.randrange(2**32)
    report = Report("soak")
    report.figure("seed", seed)
    with uvicorn_server(workdir) as server:
        _run(_soak(config, server, report, seed), seconds=config.seconds + 300)
    report.figure("duration (whole run)", f"{time.monotonic() - started:.1f} s")
    return report


# -- shutdown under load ---------------------------------------------------------------


@dataclass
class ShutdownConfig:
    """The sizes of a shutdown-under-load run."""

    streams: int = 1000
    rate: float = 50.0
    publish_before: float = 1.0  # seconds of publishing to the open streams before SIGTERM
    concurrency: int = 200
    exit_limit: float = SHUTDOWN_LIMIT  # seconds from SIGTERM to exit


async def _shutdown(config: ShutdownConfig, server: Server) -> dict[str, Any]:
    port = server.port
    baseline = await request_json(port, "GET", "/debug/stats")
    pool = Pool(port, f"{baseline['epoch']}-".encode(), config.concurrency)
    result: dict[str, Any] = {}
    try:
        opened = await asyncio.gather(*(pool.open() for _ in range(config.streams)))
        clients = [client for client in opened if client is not None]
        result["opened"] = len(clients)
        # Publishing goes on for longer than the test: it is still going at SIGTERM.
        count = round(config.rate * 120)
        await request_json(port, "POST", f"/debug/publish?n={count}&rate={config.rate}")
        result["all_received"] = await _wait_for(
            lambda: all(c.count for c in clients), seconds=10, interval=0.02
        )
        await asyncio.sleep(config.publish_before)
        stats = await request_json(port, "GET", "/debug/stats")
        result["open_at_signal"] = stats["open"]
        result["published_at_signal"] = stats["published"]
        result["publishing_at_signal"] = stats["publishing"]
        received = sum(c.count for c in clients)

        signalled = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        exited = await _wait_for(lambda: server.proc.poll() is not None, seconds=10, interval=0.01)
        result["exit_seconds"] = time.monotonic() - signalled if exited else None
        result["exit_code"] = server.proc.poll()
        await _wait_for(lambda: all(c.finished.done() for c in clients), seconds=5, interval=0.01)
        result["clean_ends"] = sum(c.clean_end for c in clients)
        result["received_during_shutdown"] = sum(c.count for c in clients) - received
    finally:
        pool.close_all()
    result["errors"] = pool.errors
    return result


def run_shutdown(config: ShutdownConfig, workdir: Path) -> Report:
    """SIGTERM a server holding `config.streams` streams while it publishes."""
    started = time.monotonic()
    report = Report("shutdown under load")
    record = workdir / "shutdown-record.json"
    with uvicorn_server(workdir, record) as server:
        result = _run(_shutdown(config, server), seconds=120)
    log = server.log()  # complete: the server has exited, or been stopped
    try:
        counts: dict[str, Any] | None = json.loads(record.read_text())
    except FileNotFoundError:
        counts = None
    seconds = result["exit_seconds"]
    reasons = counts["disconnects"]["by_reason"] if counts else {}
    report.figure("streams open at SIGTERM", f"{result['open_at_signal']} of {config.streams}")
    report.figure(
        "events published before SIGTERM", f"{result['published_at_signal']} at {config.rate:g}/s"
    )
    report.figure(
        "SIGTERM to exit", f"{seconds:.2f} s" if seconds is not None else "no exit in 10 s"
    )
    report.figure("exit code", result["exit_code"])
    report.figure("terminal chunks received", f"{result['clean_ends']} of {result['opened']}")
    report.figure("events received after SIGTERM", result["received_during_shutdown"])
    if counts:
        report.figure(
            "on_connect / on_disconnect", f"{counts['connects']} / {counts['disconnects']['total']}"
        )
        report.figure(
            "disconnects by reason", ", ".join(f"{k} {v}" for k, v in reasons.items() if v) or "-"
        )
    report.figure("uvicorn waited for connections", WAITING_HANG in log)
    report.figure("uvicorn waited for tasks", WAITING_TASKS in log)
    report.figure("duration (whole run)", f"{time.monotonic() - started:.1f} s")

    report.check(
        "every stream opened and was receiving events",
        result["opened"] == config.streams
        and result["all_received"]
        and result["publishing_at_signal"]
        and not result["errors"],
        f"{result['opened']} of {config.streams} opened, all receiving: {result['all_received']}"
        f", still publishing at SIGTERM: {result['publishing_at_signal']}"
        + (f"; first error: {result['errors'][0]}" if result["errors"] else ""),
    )
    report.check(
        f"exits within {config.exit_limit:g} s of SIGTERM",
        seconds is not None and seconds < config.exit_limit,
        f"{seconds:.2f} s" if seconds is not None else "still running after 10 s",
    )
    report.check(
        "a graceful exit",
        result["exit_code"] in (0, -signal.SIGTERM) and "Finished server process" in log,
        f"exit code {result['exit_code']}, 'Finished server process' logged: "
        f"{'Finished server process' in log}",
    )
    report.check(
        "uvicorn did not wait for connections",
        WAITING_HANG not in log,
        f"{WAITING_HANG!r} {'logged' if WAITING_HANG in log else 'not logged'}",
    )
    report.check(
        "one on_disconnect(SHUTDOWN) per stream",
        counts is not None
        and counts["connects"] == config.streams
        and reasons.get("shutdown") == config.streams
        and counts["disconnects"]["total"] == config.streams,
        "the lifespan wrote no counters (no graceful shutdown)"
        if counts is None
        else f"{counts['connects']} on_connect, {reasons.get('shutdown')} on_disconnect(shutdown) "
        f"of {counts['disconnects']['total']}",
    )
    report.check(
        "every stream got its terminal chunk",
        result["clean_ends"] == result["opened"],
        f"{result['clean_ends']} of {result['opened']}",
    )
    return report


# -- command line ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.load.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = LoadConfig()
    parser.add_argument("--scenario", choices=("soak", "shutdown"), default="soak")
    parser.add_argument("--streams", type=int, default=defaults.streams)
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="soak only")
    parser.add_argument("--rate", type=float, default=defaults.rate, help="events per second")
    parser.add_argument("--stayers", type=float, default=defaults.stayer_fraction, help="fraction")
    parser.add_argument("--churn-mean", type=float, default=defaults.churn_mean)
    parser.add_argument("--rst-fraction", type=float, default=defaults.rst_fraction)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--warm-up",
        type=float,
        default=defaults.warm_up,
        help="seconds of load before the baseline is read (0: the fresh process's)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the server's log here")
    args = parser.parse_args(argv)
    if args.streams < 2 or args.seconds <= 0 or args.rate <= 0:
        parser.error("--streams must be >= 2, --seconds and --rate > 0")
    with tempfile.TemporaryDirectory(prefix="sseviews-load-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.scenario == "shutdown":
            report = run_shutdown(ShutdownConfig(streams=args.streams, rate=args.rate), workdir)
        else:
            config = LoadConfig(
                streams=args.streams,
                seconds=args.seconds,
                rate=args.rate,
                stayer_fraction=args.stayers,
                churn_mean=args.churn_mean,
                rst_fraction=args.rst_fraction,
                seed=args.seed,
                warm_up=args.warm_up,
            )
            report = run_soak(config, workdir)
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
