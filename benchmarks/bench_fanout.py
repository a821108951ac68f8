"""Fan-out benchmark: one event to many subscribers, through memory and Redis, and replay.

Every server is a real uvicorn subprocess (uvloop + httptools, one worker) on
127.0.0.1, driven by the raw-socket client of ``benchmarks/loadclient.py``
running in this process. The apps are in ``benchmarks/apps/fanout_*.py``.

Cases (side by side, in one run):

1. **Memory layer** -- ``--subscribers`` (2000) streams, opened in batches of
   ``--batch`` (200), receive ``--events`` (20) events published
   ``--interval-ms`` (20) ms apart by a task inside the server (started with one
   ``GET /start`` once every subscriber is registered). Contenders: a raw ASGI
   app with an ``asyncio.Queue`` per connection, the Starlette floor (the raw
   app's own functions routed by a ``Starlette`` app: what Starlette's ``send``
   wrappers cost per delivery, with no SSE code), sse-starlette with a queue per
   client (its broadcasting example), and sseviews with ``Broadcast("memory://")``
   and a view streaming the group. Each event's data is ``{"t": <server
   time.time() at publish>, "i": n}``; the client stamps every event's arrival,
   and the latency p50/p99 is taken over all subscriber x event samples twice:
   from the publish call (the stamp) and from the time the event was scheduled
   (``t0 + i x interval``, ``t0`` reported by the server), which also counts
   any delay of the publisher itself.
2. **Redis** -- sseviews with ``Broadcast("redis://127.0.0.1:6379/0",
   prefix=<unique>)`` in two uvicorn processes, ``--redis-subscribers`` (1000)
   on each, events published through the first one. Reported against the
   memory sseviews case of the same run set.
3. **Replay rate** -- one sseviews server (memory, retention 50000): a client
   connected live receives ``--replay-events`` (10k) events published as fast as
   ``publish`` allows (events/s from its first event to its last); then a client
   reconnecting with the ``Last-Event-ID`` of the event before those 10k gets
   them replayed (events/s from its request to its last event).

Every case runs ``--runs`` times (fresh servers each time, contenders rotated)
and the medians are reported as a markdown table, with the ratios against the
targets of issue 10 (the same columns as ``bench_core.py``), and written with
every per-run figure to ``benchmarks/results/fanout-<timestamp>.json``.

Usage (from anywhere; paths are resolved from this file)::

    python benchmarks/bench_fanout.py                 # full size, 3 runs
    python benchmarks/bench_fanout.py --quick         # smoke test
    python benchmarks/bench_fanout.py --cases memory --servers raw,sseviews --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.dont_write_bytecode = True  # keep __pycache__ out of the work tree

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from benchmarks import harness  # noqa: E402
from benchmarks.harness import HOST, BenchError, ServerSpec, UvicornServer  # noqa: E402
from benchmarks.loadclient import EventCounter, ResponseHead, SSEStreamProtocol, run  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/0"
SSEVIEWS_APP = "benchmarks.apps.fanout_sseviews:app"

REQUEST_TIMEOUT = 10.0  # one plain GET (/start, /stats, /publish-burst is longer)
OPEN_TIMEOUT = 120.0  # opening all the subscribers of one measurement
REGISTER_TIMEOUT = 30.0  # until the server reports every subscriber registered
DELIVERY_GRACE = 60.0  # on top of the publishing schedule, for every event to arrive
BURST_TIMEOUT = 120.0  # one publish-burst / replay, request to last event
POLL_SECONDS = 0.05
WARMUP_SUBSCRIBERS = 20  # per server
WARMUP_EVENTS = 5
REPLAY_RETENTION = 50_000


# -- contenders -----------------------------------------------------------------------

MEMORY_SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("raw", "raw ASGI", "benchmarks.apps.fanout_raw:app"),
    ServerSpec("floor", "Starlette floor", "benchmarks.apps.fanout_floor:app"),
    ServerSpec("sse-starlette", "sse-starlette", "benchmarks.apps.fanout_sse_starlette:app"),
    ServerSpec("sseviews", "sseviews", SSEVIEWS_APP),
)
MEMORY_BY_KEY = {spec.key: spec for spec in MEMORY_SERVERS}
REDIS_SPEC = ServerSpec("sseviews-redis", "sseviews (Redis)", SSEVIEWS_APP)
REPLAY_SPEC = ServerSpec("sseviews-replay", "sseviews (replay)", SSEVIEWS_APP)
CASES = ("memory", "redis", "replay")


@dataclass(frozen=True)
class Sizes:
    runs: int
    subscribers: int
    events: int
    interval_ms: float
    batch: int
    redis_subscribers: int  # per process
    replay_events: int
    replay_warmup: int
    settle_seconds: float


FULL = Sizes(
    runs=3,
    subscribers=2000,
    events=20,
    interval_ms=20.0,
    batch=200,
    redis_subscribers=1000,
    replay_events=10_000,
    replay_warmup=1000,
    settle_seconds=1.0,
)
QUICK = replace(
    FULL,
    runs=1,
    subscribers=200,
    batch=100,
    redis_subscribers=100,
    replay_events=1000,
    replay_warmup=100,
    settle_seconds=0.3,
)


# -- client ---------------------------------------------------------------------------


class Completion:
    """Set once ``expected`` streams have each received their target event count."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.event = asyncio.Event()

    def reached(self) -> None:
        self.count += 1
        if self.count >= self.expected:
            self.event.set()


class RecordingCounter(EventCounter):
    """An `EventCounter` that also keeps each decoded body piece with its arrival time.

    Arrival is ``time.time()`` (the clock the servers stamp events with) taken when
    the piece is fed, i.e. in ``data_received``. Events are parsed after the
    measurement, so the client does as little as possible while it runs.
    """

    __slots__ = ("_completion", "_reached", "pieces", "target")

    def __init__(self, target: int = 0, completion: Completion | None = None) -> None:
        super().__init__()
        self.pieces: list[tuple[float, bytes]] = []
        self.target = target
        self._completion = completion
        self._reached = False

    def feed(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        now = time.time()
        if end is None:
            end = len(data)
        if start >= end:
            return
        super().feed(data, start, end)
        self.pieces.append((now, data[start:end]))
        if not self._reached and self.target and self.events >= self.target:
            self._reached = True
            if self._completion is not None:
                self._completion.reached()


class RecordingStream(SSEStreamProtocol):
    """An `SSEStreamProtocol` with a `RecordingCounter` and optional request headers."""

    def __init__(self, loop: asyncio.AbstractEventLoop, counter: RecordingCounter) -> None:
        super().__init__(loop)
        self.counter = counter
        self.t_request_wall = 0.0

    @property
    def recorder(self) -> RecordingCounter:
        assert isinstance(self.counter, RecordingCounter)
        return self.counter

    def send_request(
        self, path: str, host: str = HOST, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        if self.transport is None:
            raise RuntimeError("not connected")
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n{extra}\r\n"
        ).encode("latin-1")
        self.t_request_sent = time.perf_counter()
        self.t_request_wall = time.time()
        self.transport.write(request)

    def body(self) -> bytes:
        return b"".join(piece for _, piece in self.recorder.pieces)


# The client's source addresses, taken in turn by the subscribers (--source-hosts):
# more subscribers than one address has ephemeral ports need several.
SOURCE_HOSTS: list[str] = [HOST]


async def _connect(
    port: int, counter: RecordingCounter, local_host: str | None = None
) -> RecordingStream:
    loop = asyncio.get_running_loop()
    _, stream = await loop.create_connection(
        lambda: RecordingStream(loop, counter),
        HOST,
        port,
        local_addr=None if local_host is None else (local_host, 0),
    )
    return stream


async def get_json(port: int, path: str, *, time_limit: float = REQUEST_TIMEOUT) -> Any:
    """GET ``path`` on a fresh connection and decode the JSON body (status must be 200)."""
    async with asyncio.timeout(time_limit):
        stream = await _connect(port, RecordingCounter())
        try:
            stream.send_request(path)
            head = await stream.head
            await stream.done
        finally:
            stream.close(abort=False)
    body = stream.body()
    if head.status != 200:
        raise BenchError(f"GET {path} answered {head.status}: {body[:200]!r}")
    return json.loads(body)


async def open_stream(
    port: int,
    path: str,
    counter: RecordingCounter,
    headers: Sequence[tuple[str, str]] = (),
    *,
    time_limit: float = REQUEST_TIMEOUT,
    local_host: str | None = None,
) -> RecordingStream:
    """Connect, request ``path`` and wait for a 200 ``text/event-stream`` head."""
    async with asyncio.timeout(time_limit):
        stream = await _connect(port, counter, local_host)
        try:
            stream.send_request(path, HOST, headers)
            head: ResponseHead = await stream.head
        except BaseException:
            stream.close()
            raise
    if head.status != 200 or not head.headers.get("content-type", "").startswith(
        "text/event-stream"
    ):
        stream.close()
        raise BenchError(f"GET {path}: status {head.status}, {head.headers.get('content-type')}")
    return stream


def _events_path(index: int) -> str:
    return "/events"


async def open_subscribers(
    port: int,
    count: int,
    batch: int,
    target: int,
    completion: Completion | None,
    path: Callable[[int], str] = _events_path,
    headers: Sequence[tuple[str, str]] = (),
    counter: Callable[[int, Completion | None], RecordingCounter] = RecordingCounter,
) -> list[RecordingStream]:
    """Open ``count`` streams, ``batch`` at a time (each batch up to its heads).

    Stream ``index`` (0 to count - 1) requests ``path(index)``, ``/events`` by default,
    with ``headers``, and counts its events with ``counter(target, completion)``.
    """
    streams: list[RecordingStream] = []
    try:
        async with asyncio.timeout(OPEN_TIMEOUT):
            for first in range(0, count, batch):
                size = min(batch, count - first)
                opened = await asyncio.gather(
                    *(
                        open_stream(
                            port,
                            path(index),
                            counter(target, completion),
                            headers,
                            local_host=SOURCE_HOSTS[index % len(SOURCE_HOSTS)],
                        )
                        for index in range(first, first + size)
                    ),
                    return_exceptions=True,
                )
                errors = [item for item in opened if isinstance(item, BaseException)]
                streams.extend(item for item in opened if isinstance(item, RecordingStream))
                if errors:
                    raise BenchError(
                        f"{len(errors)} of {size} subscribers failed to open: {errors[0]!r}"
                    )
    except BaseException:
        close_all(streams)
        raise
    return streams


def close_all(streams: list[RecordingStream]) -> None:
    for stream in streams:
        stream.close()
    streams.clear()


async def wait_subscribers(port: int, expected: int) -> dict[str, Any]:
    """Poll ``/stats`` until the server has exactly ``expected`` subscribers and is idle."""
    stats: dict[str, Any] = {}
    try:
        async with asyncio.timeout(REGISTER_TIMEOUT):
            while True:
                stats = await get_json(port, "/stats")
                if stats["subscribers"] == expected and not stats["publishing"]:
                    return stats
                await asyncio.sleep(POLL_SECONDS)
    except TimeoutError:
        raise BenchError(
            f"server on port {port} reports {stats.get('subscribers')} subscribers "
            f"(publishing={stats.get('publishing')}), expected {expected}"
        ) from None


def run_queue_wait(pid: int) -> float:
    """Seconds the main thread of ``pid`` has waited for a CPU (Linux schedstat), or NaN."""
    try:
        with open(f"/proc/{pid}/schedstat") as file:
            return int(file.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return float("nan")


def server_pid(server: UvicornServer) -> int:
    if server.process is None:
        raise BenchError(f"{server.spec.label} server is not running")
    return server.process.pid


@contextmanager
def client_gc_paused() -> Iterator[None]:
    """Keep the client's own collector out of the measured window."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


# -- parsing and statistics ------------------------------------------------------------------


def split_events(pieces: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
    """Complete SSE messages with the arrival time of the piece that completed each."""
    events: list[tuple[float, bytes]] = []
    rest = b""
    for arrival, piece in pieces:
        parts = (rest + piece if rest else piece).split(b"\n\n")
        rest = parts.pop()
        events.extend((arrival, part) for part in parts)
    return events


def message_fields(message: bytes) -> tuple[str | None, Any]:
    """The ``id`` and the JSON-decoded ``data`` of one message."""
    event_id: str | None = None
    data: list[bytes] = []
    for line in message.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"id:"):
            event_id = (line[4:] if line[3:4] == b" " else line[3:]).decode()
    if not data:
        raise BenchError(f"message without data: {message[:200]!r}")
    return event_id, json.loads(b"\n".join(data))


def percentile(ordered: list[float], fraction: float) -> float:
    """Linear-interpolated percentile of an already sorted list."""
    if not ordered:
        raise BenchError("no samples")
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def deliveries(
    streams: list[RecordingStream], expected_events: int
) -> list[tuple[int, float, float]]:
    """``(index, publish time, arrival)`` of every delivery; checks each stream got 0..n-1."""
    samples: list[tuple[int, float, float]] = []
    expected = list(range(expected_events))
    for stream in streams:
        got = []
        for arrival, message in split_events(stream.recorder.pieces):
            _, data = message_fields(message)
            got.append(data["i"])
            samples.append((data["i"], data["t"], arrival))
        if got != expected:
            raise BenchError(
                f"a subscriber received events {got[:5]}...{got[-3:]} "
                f"({len(got)}), expected 0..{expected_events - 1} in order"
            )
    return samples


def latency_summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": percentile(ordered, 0.50) * 1e3,
        "p90_ms": percentile(ordered, 0.90) * 1e3,
        "p99_ms": percentile(ordered, 0.99) * 1e3,
        "max_ms": ordered[-1] * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
        "samples": float(len(ordered)),
    }


def gc_summary(stats: list[dict[str, Any]]) -> dict[str, float]:
    """Server GC activity during the window, summed (counts) / maxed over processes."""
    return {
        "server_gc_gen2_collections": float(sum(s["gc"]["collections"][2] for s in stats)),
        "server_gc_gen2_max_pause_ms": max(s["gc"]["pause_max_ms"][2] for s in stats),
        "server_gc_max_pause_ms": max(max(s["gc"]["pause_max_ms"]) for s in stats),
        "server_gc_total_pause_ms": sum(sum(s["gc"]["pause_total_ms"]) for s in stats),
    }


# -- measurements ----------------------------------------------------------------------------


async def warm_up(servers: list[UvicornServer]) -> None:
    """A few subscribers and events per server: imports, first-request allocations."""
    completion = Completion(WARMUP_SUBSCRIBERS * len(servers))
    streams: list[RecordingStream] = []
    try:
        for server in servers:
            streams += await open_subscribers(
                server.port, WARMUP_SUBSCRIBERS, WARMUP_SUBSCRIBERS, WARMUP_EVENTS, completion
            )
        for server in servers:
            await wait_subscribers(server.port, WARMUP_SUBSCRIBERS)
        await get_json(servers[0].port, f"/start?n={WARMUP_EVENTS}&interval=0.005")
        try:
            async with asyncio.timeout(30.0):
                await completion.event.wait()
        except TimeoutError:
            raise BenchError(
                f"warm-up: {completion.count} of {completion.expected} subscribers got "
                f"{WARMUP_EVENTS} events (counted as \\n\\n-terminated messages)"
            ) from None
    finally:
        close_all(streams)
    for server in servers:
        await wait_subscribers(server.port, 0)


async def measure_fanout(
    servers: list[UvicornServer],
    counts: list[int],
    sizes: Sizes,
    headers: Sequence[tuple[str, str]] = (),
    counter: Callable[[int, Completion | None], RecordingCounter] = RecordingCounter,
) -> dict[str, float]:
    """Case 1 (one server) or 2 (two servers): open, publish through servers[0], collect.

    Every subscriber sends ``headers`` and counts with ``counter`` (see `open_subscribers`).
    """
    await warm_up(servers)
    total = sum(counts)
    completion = Completion(total)
    streams: list[RecordingStream] = []
    interval = sizes.interval_ms / 1e3
    try:
        for server, count in zip(servers, counts, strict=True):
            streams += await open_subscribers(
                server.port,
                count,
                sizes.batch,
                sizes.events,
                completion,
                headers=headers,
                counter=counter,
            )
        load_before = os.getloadavg()[0]
        for server, count in zip(servers, counts, strict=True):
            await wait_subscribers(server.port, count)
        await asyncio.sleep(sizes.settle_seconds)
        for server in servers:
            await get_json(server.port, "/stats?reset=1")
        cpu_before = [server.cpu_seconds() for server in servers]
        pids = [os.getpid()] + [server_pid(server) for server in servers]
        waits_before = [run_queue_wait(pid) for pid in pids]
        deadline = sizes.events * interval + DELIVERY_GRACE
        with client_gc_paused():
            t_start = time.time()
            await get_json(servers[0].port, f"/start?n={sizes.events}&interval={interval}")
            try:
                async with asyncio.timeout(deadline):
                    await completion.event.wait()
            except TimeoutError:
                short = [s.events for s in streams if s.events < sizes.events]
                ended = sum(1 for s in streams if s.done.done())
                raise BenchError(
                    f"{len(short)} of {total} subscribers did not get all {sizes.events} events "
                    f"within {deadline:.0f} s (fewest: {min(short)}; {ended} streams ended)"
                ) from None
            t_end = time.time()
        cpu = sum(s.cpu_seconds() - c for s, c in zip(servers, cpu_before, strict=True))
        waits = [run_queue_wait(pid) - w for pid, w in zip(pids, waits_before, strict=True)]
        await asyncio.sleep(0.1)  # anything extra would show up now
        stats = [await get_json(server.port, "/stats") for server in servers]
        for server in servers:
            server.check_alive()
        for stat in stats:
            if stat.get("publish_error"):
                raise BenchError(f"the server's publisher failed: {stat['publish_error']}")
        per_server = []
        first = 0
        for count in counts:
            per_server.append(deliveries(streams[first : first + count], sizes.events))
            first += count
    finally:
        close_all(streams)
    every = [sample for samples in per_server for sample in samples]
    values = latency_summary([arrival - published for _, published, arrival in every])
    if len(servers) > 1:  # e.g. Redis: the publishing process, then the other one(s)
        for index, samples in enumerate(per_server):
            summary = latency_summary([arrival - published for _, published, arrival in samples])
            values[f"p50_ms_process{index}"] = summary["p50_ms"]
            values[f"p99_ms_process{index}"] = summary["p99_ms"]
    # The publisher's schedule: event i is due at t0 + i * interval, t0 being
    # the wall-clock start of the schedule in the publishing process. The
    # stamp in each event is taken when publish() is called, so a publish()
    # that does fan-out work itself (or a loop too busy to run the publisher on
    # time) delays the later stamps, and that delay is not in the
    # publish-to-client figure. Latency is therefore also measured from the
    # scheduled time, and the publisher's own lag behind the schedule is
    # reported.
    t0 = stats[0].get("schedule_start")
    if t0 is None:
        raise BenchError("the publishing server did not report its schedule start")
    published = {index: when for index, when, _ in every}
    lags = [published[i] - t0 - i * interval for i in range(sizes.events)]
    values["publish_lag_ms"] = lags[-1] * 1e3
    values["publish_lag_max_ms"] = max(lags) * 1e3
    values["publish_lag_p50_ms"] = statistics.median(lags) * 1e3
    from_schedule = [arrival - t0 - i * interval for i, _, arrival in every]
    summary = latency_summary(from_schedule)
    values["p50_ms_from_schedule"] = summary["p50_ms"]
    values["p99_ms_from_schedule"] = summary["p99_ms"]
    values["max_ms_from_schedule"] = summary["max_ms"]
    values.update(gc_summary(stats))
    values["server_cpu_us_per_delivery"] = cpu / (total * sizes.events) * 1e6
    values["window_seconds"] = t_end - t_start
    # Time the event-loop threads were runnable but waiting for a CPU, in the window.
    values["client_run_queue_wait_ms"] = waits[0] * 1e3
    values["server_run_queue_wait_ms"] = sum(waits[1:]) * 1e3
    if len(servers) > 1:
        for index, wait in enumerate(waits[1:]):
            values[f"run_queue_wait_ms_process{index}"] = wait * 1e3
    values["loadavg_1min_before"] = load_before
    return values


async def measure_replay(server: UvicornServer, sizes: Sizes) -> dict[str, float]:
    """Case 3: live rate of a connected client, then replay rate of a reconnecting one."""
    port = server.port
    n = sizes.replay_events
    streams: list[RecordingStream] = []
    try:
        # Warm-up: a live client takes a first burst; its last id is the replay cursor.
        completion = Completion(1)
        streams.append(
            await open_stream(
                port, "/replay-events", RecordingCounter(sizes.replay_warmup, completion)
            )
        )
        await wait_subscribers(port, 1)
        warm = await get_json(
            port, f"/publish-burst?n={sizes.replay_warmup}", time_limit=BURST_TIMEOUT
        )
        async with asyncio.timeout(BURST_TIMEOUT):
            await completion.event.wait()
        close_all(streams)
        cursor = warm["last_id"]
        await wait_subscribers(port, 0)

        # (i) live: one connected client, n events published as fast as possible.
        load_before = os.getloadavg()[0]
        completion = Completion(1)
        live = await open_stream(port, "/replay-events", RecordingCounter(n, completion))
        streams.append(live)
        await wait_subscribers(port, 1)
        cpu_before = server.cpu_seconds()
        with client_gc_paused():
            burst = await get_json(port, f"/publish-burst?n={n}", time_limit=BURST_TIMEOUT)
            async with asyncio.timeout(BURST_TIMEOUT):
                await completion.event.wait()
        cpu_live = server.cpu_seconds() - cpu_before
        live_events = split_events(live.recorder.pieces)
        close_all(streams)
        await wait_subscribers(port, 0)

        # (ii) replay: reconnect with the id of the event before those n.
        completion = Completion(1)
        counter = RecordingCounter(n, completion)
        cpu_before = server.cpu_seconds()
        with client_gc_paused():
            async with asyncio.timeout(BURST_TIMEOUT):
                replay = await open_stream(
                    port, "/replay-events", counter, [("Last-Event-ID", cursor)]
                )
                streams.append(replay)
                await completion.event.wait()
        cpu_replay = server.cpu_seconds() - cpu_before
        await asyncio.sleep(0.1)  # a duplicate would show up now
        replay_events = split_events(replay.recorder.pieces)
        server.check_alive()
    finally:
        close_all(streams)

    expected = list(range(n))
    for name, received in (("live", live_events), ("replay", replay_events)):
        fields = [message_fields(message) for _, message in received]
        if [data["i"] for _, data in fields] != expected:
            raise BenchError(f"the {name} client did not get events 0..{n - 1} exactly once")
        if (fields[0][0], fields[-1][0]) != (burst["first_id"], burst["last_id"]):
            raise BenchError(
                f"the {name} client's ids run {fields[0][0]}..{fields[-1][0]}, "
                f"expected {burst['first_id']}..{burst['last_id']}"
            )
    live_first, live_last = live_events[0][0], live_events[-1][0]
    replay_first, replay_last = replay_events[0][0], replay_events[-1][0]
    first_publish = message_fields(live_events[0][1])[1]["t"]
    live_eps = (n - 1) / (live_last - live_first)
    replay_eps = n / (replay_last - replay.t_request_wall)
    values = {
        "live_eps": live_eps,
        "replay_eps": replay_eps,
        "replay_over_live": replay_eps / live_eps,
        # Alternative clocks, for reference.
        "live_eps_from_first_publish": n / (live_last - first_publish),
        "publish_burst_seconds": burst["seconds"],
        "live_server_cpu_us_per_event": cpu_live / n * 1e6,
        "replay_server_cpu_us_per_event": cpu_replay / n * 1e6,
        "replay_chunks": float(replay.chunks),
        "live_chunks": float(live.chunks),
        "loadavg_1min_before": load_before,
    }
    if replay_last > replay_first:  # not all in one read
        values["replay_eps_first_to_last"] = (n - 1) / (replay_last - replay_first)
    return values


# -- orchestration -----------------------------------------------------------------------------


@dataclass
class CaseResults(harness.Outcome):
    label: str
    skipped_reason: str | None = None
    runs: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def redis_client(url: str = REDIS_URL) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def redis_unavailable(url: str = REDIS_URL) -> str | None:
    try:
        client = redis_client(url)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"Redis at {url} unreachable: {exc!r}"
    return None


def delete_redis_keys(prefix: str, url: str = REDIS_URL) -> int:
    """Delete every key holding ``prefix`` (the benchmark's own) on ``url``; return how many.

    The pattern also matches keys in which the prefix follows a hash tag's
    ``{``, and the keys are deleted one by one (pipelined), so the same call
    empties a node of a Redis Cluster, where one DEL may not span hash slots.
    """
    client = redis_client(url)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"*{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += _delete_each(client, batch)
                batch.clear()
        if batch:
            deleted += _delete_each(client, batch)
    finally:
        client.close()
    return deleted


def _delete_each(client: Any, keys: list[bytes]) -> int:
    pipeline = client.pipeline(transaction=False)
    for key in keys:
        pipeline.delete(key)
    return sum(int(count) for count in pipeline.execute())


class Runner:
    def __init__(self, sizes: Sizes, log_dir: Path, redis_prefix: str) -> None:
        self.sizes = sizes
        self.log_dir = log_dir
        self.redis_prefix = redis_prefix
        self.results: dict[str, CaseResults] = {}

    def attempt(
        self, key: str, what: str, run_index: int, body: Callable[[], dict[str, float]]
    ) -> None:
        harness.attempt(self.results[key], what, run_index, self.sizes.runs, body)

    def memory(self, spec: ServerSpec, run_index: int) -> None:
        sizes = self.sizes

        def body() -> dict[str, float]:
            with UvicornServer(spec, harness.child_env(), self.log_dir) as server:
                return run(measure_fanout([server], [sizes.subscribers], sizes))

        self.attempt(
            spec.key, f"{sizes.subscribers} subscribers x {sizes.events} events", run_index, body
        )

    def redis(self, run_index: int) -> None:
        sizes = self.sizes
        env = harness.child_env(
            FANOUT_BROADCAST_URL=REDIS_URL, FANOUT_PREFIX=f"{self.redis_prefix}-r{run_index}"
        )

        def body() -> dict[str, float]:
            with ExitStack() as stack:
                servers = [
                    stack.enter_context(UvicornServer(REDIS_SPEC, env, self.log_dir))
                    for _ in range(2)
                ]
                counts = [sizes.redis_subscribers] * 2
                return run(measure_fanout(servers, counts, sizes))

        self.attempt(
            REDIS_SPEC.key,
            f"2 processes x {sizes.redis_subscribers} subscribers x {sizes.events} events",
            run_index,
            body,
        )

    def replay(self, run_index: int) -> None:
        sizes = self.sizes
        env = harness.child_env(FANOUT_RETENTION=str(REPLAY_RETENTION))

        def body() -> dict[str, float]:
            with UvicornServer(REPLAY_SPEC, env, self.log_dir) as server:
                return run(measure_replay(server, sizes))

        self.attempt(
            REPLAY_SPEC.key, f"{sizes.replay_events} events live, then replayed", run_index, body
        )


def run_benchmark(
    specs: Sequence[ServerSpec],
    cases: Sequence[str],
    sizes: Sizes,
    explicit: bool,
    log_dir: Path,
    redis_prefix: str,
) -> dict[str, CaseResults]:
    runner = Runner(sizes, log_dir, redis_prefix)
    results = runner.results
    env = harness.child_env()

    def skip(key: str, label: str, reason: str | None) -> bool:
        results[key] = CaseResults(label)
        return harness.mark_skipped(results[key], reason, explicit)

    active: list[ServerSpec] = []
    if "memory" in cases:
        for spec in specs:
            if not skip(spec.key, spec.label, harness.probe(f"import {spec.module}", env)):
                active.append(spec)
    do_redis = "redis" in cases and not skip(
        REDIS_SPEC.key,
        REDIS_SPEC.label,
        harness.probe("import sseviews.backends.redis", env) or redis_unavailable(),
    )
    do_replay = "replay" in cases and not skip(
        REPLAY_SPEC.key, REPLAY_SPEC.label, harness.probe(f"import {REPLAY_SPEC.module}", env)
    )

    for run_index in range(sizes.runs):
        for spec in harness.rotated(active, run_index):
            runner.memory(spec, run_index)
        if do_redis:
            try:
                runner.redis(run_index)
            finally:
                delete_redis_keys(f"{redis_prefix}-r{run_index}")
        if do_replay:
            runner.replay(run_index)
    return results


# -- reporting ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    label: str
    metric: str  # key in CaseResults.runs
    # Result keys for the raw, Starlette floor, sse-starlette and sseviews columns.
    cells: tuple[str | None, str | None, str | None, str | None]
    decimals: int
    ratio: tuple[str, str, str] | None = None  # (numerator key, denominator key, metric)
    baseline: str = ""  # how the denominator is named in the ratio and target cells
    target_ratio: float | None = None
    higher_is_better: bool = False
    # A row without a target that report.py still shows (e.g. the baseline of a ratio).
    headline: bool = False

    @property
    def target_text(self) -> str:
        if self.target_ratio is None:
            return ""
        return harness.fmt_target(self.target_ratio, self.higher_is_better, self.baseline)


def _rows(sizes: Sizes) -> list[Row]:
    subs = f"{sizes.subscribers:,} subscribers"
    fan = f"fan-out, {subs}"
    red = f"fan-out through Redis, 2 processes x {sizes.redis_subscribers:,}"
    memory = ("raw", "floor", "sse-starlette", "sseviews")
    ours_only = (None, None, None)
    redis = (*ours_only, "sseviews-redis")
    replay = (*ours_only, "sseviews-replay")
    return [
        Row(f"{fan}, p50 publish-to-client, ms", "p50_ms", memory, 1,
            ("sseviews", "raw", "p50_ms"), "raw", 0.75),
        Row(f"{fan}, p99 publish-to-client, ms", "p99_ms", memory, 1,
            ("sseviews", "raw", "p99_ms"), "raw", 1.0),
        Row(f"{fan}, p50 from the scheduled publish time, ms", "p50_ms_from_schedule", memory, 1,
            ("sseviews", "raw", "p50_ms_from_schedule"), "raw", 0.75),
        Row(f"{fan}, p99 from the scheduled publish time, ms", "p99_ms_from_schedule", memory, 1,
            ("sseviews", "raw", "p99_ms_from_schedule"), "raw", 1.0),
        Row(f"{fan}, server CPU per delivery in the publishing window, us",
            "server_cpu_us_per_delivery", memory, 2,
            ("sseviews", "raw", "server_cpu_us_per_delivery"), "raw", 1.2),
        Row(f"{red}, p99 publish-to-client, ms", "p99_ms", redis, 1,
            ("sseviews-redis", "sseviews", "p99_ms"), "memory", 1.5),
        Row(f"{red}, p99 from the scheduled publish time, ms", "p99_ms_from_schedule", redis, 1,
            ("sseviews-redis", "sseviews", "p99_ms_from_schedule"), "memory", 1.5),
        Row(f"replay of {sizes.replay_events:,} retained events to one reconnecting client, "
            "events/s", "replay_eps", replay, 0,
            ("sseviews-replay", "sseviews-replay", "replay_over_live"), "live", 0.5, True),
        Row(f"(info) live rate: the same {sizes.replay_events:,} events published to one "
            "connected client, events/s", "live_eps", replay, 0),
        Row(f"(info) {fan}, publisher behind its {sizes.interval_ms:g} ms schedule, "
            f"most over the {sizes.events} events, ms", "publish_lag_max_ms", memory, 1),
        Row(f"(info) {red}, publisher behind its schedule, most, ms",
            "publish_lag_max_ms", redis, 1),
        Row(f"(info) {red}, p50 publish-to-client, ms", "p50_ms", redis, 1,
            ("sseviews-redis", "sseviews", "p50_ms"), "memory"),
        Row("(info) p99 through Redis, subscribers of the publishing process, ms",
            "p99_ms_process0", redis, 1),
        Row("(info) p99 through Redis, subscribers of the other process, ms",
            "p99_ms_process1", redis, 1),
        Row(f"(info) {fan}, max publish-to-client, ms", "max_ms", memory, 1,
            ("sseviews", "raw", "max_ms"), "raw"),
        Row(f"(info) {fan}, max from the scheduled publish time, ms", "max_ms_from_schedule",
            memory, 1, ("sseviews", "raw", "max_ms_from_schedule"), "raw"),
        Row(f"(info) {red}, max publish-to-client, ms", "max_ms", redis, 1),
        Row(f"(info) {red}, server CPU per delivery (both processes), us",
            "server_cpu_us_per_delivery", redis, 2),
        Row(f"(info) {fan}, server event loop waiting for a CPU while publishing, ms",
            "server_run_queue_wait_ms", memory, 1),
        Row(f"(info) {red}, the same, publishing process, ms",
            "run_queue_wait_ms_process0", redis, 1),
        Row(f"(info) {red}, the same, other process, ms",
            "run_queue_wait_ms_process1", redis, 1),
        Row(f"(info) {fan}, server gen-2 GC passes while publishing",
            "server_gc_gen2_collections", memory, 1),
        Row(f"(info) {fan}, server longest GC pause while publishing, ms",
            "server_gc_max_pause_ms", memory, 1),
    ]  # fmt: skip


def _median(results: dict[str, CaseResults], key: str | None, metric: str) -> float | None:
    if key is None or key not in results:
        return None
    return results[key].median(metric)


def _cell(results: dict[str, CaseResults], key: str | None, value: float | None, row: Row) -> str:
    # "-": the case does not apply to this contender, or it was not selected.
    return "-" if key is None or key not in results else harness.fmt(value, row.decimals)


def _floor_over_raw(results: dict[str, CaseResults], row: Row) -> float | None:
    raw_key, floor_key = row.cells[:2]
    raw, floor = _median(results, raw_key, row.metric), _median(results, floor_key, row.metric)
    return floor / raw if floor is not None and raw else None


# The memory-case figures in which the floor shows Starlette's own share.
FLOOR_NOTE_METRICS = (
    ("server_cpu_us_per_delivery", "server CPU per delivery"),
    ("p50_ms", "p50"),
    ("p99_ms", "p99"),
)


def floor_note(results: dict[str, CaseResults]) -> str | None:
    """The floor's medians over raw's: what Starlette adds before any SSE code runs."""
    parts = []
    for metric, name in FLOOR_NOTE_METRICS:
        raw, floor = _median(results, "raw", metric), _median(results, "floor", metric)
        if raw and floor is not None:
            parts.append(f"{name} {floor / raw:.2f}x")
    if not parts:
        return None
    return (
        "Starlette floor over raw ASGI, fan-out (Starlette's app, router and the send "
        "wrappers of ServerErrorMiddleware and ExceptionMiddleware, no SSE code): "
        + ", ".join(parts)
        + "."
    )


def build_report(results: dict[str, CaseResults], sizes: Sizes) -> tuple[str, dict[str, Any]]:
    """The markdown table of this benchmark and its JSON-able summary (see `build_table`)."""
    return build_table(results, _rows(sizes))


def build_table(results: dict[str, CaseResults], rows: Sequence[Row]) -> tuple[str, dict[str, Any]]:
    """The markdown table of ``rows`` and a JSON-able summary of the medians and ratios.

    The columns are those of :func:`harness.table_header`, as in the core
    benchmark, so the rows of both tables can be pasted into one; ``report.py``
    joins the rows of the summary whose ``info`` is false.
    """
    lines = harness.table_header()
    summary: dict[str, Any] = {}
    for row in rows:
        medians = [_median(results, key, row.metric) for key in row.cells]
        ratio: float | None = None
        if row.ratio is not None:
            num_key, den_key, metric = row.ratio
            if num_key == den_key:  # a per-run ratio: its median
                ratio = _median(results, num_key, metric)
            else:
                num = _median(results, num_key, metric)
                den = _median(results, den_key, metric)
                ratio = num / den if num is not None and den else None
        met: bool | None = None
        if row.target_ratio is not None and ratio is not None:
            met = harness.meets(ratio, row.target_ratio, row.higher_is_better)
        cells = [
            row.label,
            *(
                _cell(results, key, value, row)
                for key, value in zip(row.cells, medians, strict=True)
            ),
            "" if row.ratio is None else harness.fmt_ratio(ratio, row.baseline),
            row.target_text,
            harness.met_cell(row.target_ratio is not None, met),
        ]
        lines.append(harness.table_row(cells))
        summary[row.label] = {
            "cells": cells,
            "info": row.target_ratio is None and not row.headline,
            "metric": row.metric,
            "medians": {key: value for key, value in zip(row.cells, medians, strict=True) if key},
            "ratio": ratio,
            "ratio_of": list(row.ratio) if row.ratio else None,
            # What Starlette's app, router and send wrappers add to raw ASGI.
            "floor_over_raw": _floor_over_raw(results, row),
            "target": row.target_text or None,
            "target_met": met,
        }
    return "\n".join(lines), summary


def environment_versions() -> dict[str, str | None]:
    versions = harness.package_versions(
        ("uvicorn", "starlette", "sse-starlette", "uvloop", "httptools", "anyio",
         "redis", "psutil", "sseviews")
    )  # fmt: skip
    try:
        client = redis_client()
        try:
            versions["redis-server"] = str(client.info("server").get("redis_version"))
        finally:
            client.close()
    except Exception:
        versions["redis-server"] = None
    return versions


# -- command line ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = harness.new_parser(
        "Fan-out SSE benchmark: memory layer (raw ASGI vs Starlette floor vs "
        "sse-starlette vs sseviews), sseviews through Redis, and sseviews replay rate.",
        f"repetitions (default {FULL.runs}; --quick: {QUICK.runs})",
    )
    parser.add_argument("--servers", help="memory-case contenders: " + ",".join(MEMORY_BY_KEY))
    parser.add_argument("--cases", help="comma-separated subset of: " + ",".join(CASES))
    parser.add_argument("--subscribers", type=int, help="subscribers in the memory case")
    parser.add_argument("--events", type=int, help="events published per measurement")
    parser.add_argument("--interval-ms", type=float, help="ms between two published events")
    parser.add_argument("--batch", type=int, help="subscribers connected concurrently")
    parser.add_argument(
        "--source-hosts",
        type=int,
        default=1,
        help="subscribers connect from 127.0.0.1 to 127.0.0.N in turn (default 1)",
    )
    parser.add_argument("--redis-subscribers", type=int, help="subscribers per Redis process")
    parser.add_argument("--replay-events", type=int, help="events published live, then replayed")
    harness.add_output_argument(parser, "fanout")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    names = ("runs", "subscribers", "events", "interval_ms", "batch", "redis_subscribers",
             "replay_events")  # fmt: skip
    sizes = harness.sizes_from_args(args, FULL, QUICK, names)
    if min(sizes.runs, sizes.subscribers, sizes.events, sizes.batch, sizes.redis_subscribers,
           sizes.replay_events) < 1 or sizes.interval_ms < 0:  # fmt: skip
        raise SystemExit("sizes and --runs must be >= 1, --interval-ms >= 0")

    explicit = args.servers is not None or args.cases is not None
    keys = args.servers.split(",") if args.servers else list(MEMORY_BY_KEY)
    cases = args.cases.split(",") if args.cases else list(CASES)
    unknown = [k for k in keys if k not in MEMORY_BY_KEY] + [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown server(s) or case(s) {unknown}")
    specs = [MEMORY_BY_KEY[key] for key in keys]

    if not 1 <= args.source_hosts <= 254:
        raise SystemExit("--source-hosts must be 1..254")
    SOURCE_HOSTS[:] = [f"127.0.0.{index}" for index in range(1, args.source_hosts + 1)]

    needed = max(sizes.subscribers, 2 * sizes.redis_subscribers) + 200
    harness.ensure_nofile(needed, f"{needed} sockets")

    started = dt.datetime.now()
    redis_prefix = f"sseviews-bench-fanout-{harness.timestamp(started)}-{os.getpid()}"
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-fanout-") as log_dir:
            results = run_benchmark(specs, cases, sizes, explicit, Path(log_dir), redis_prefix)
    finally:
        if "redis" in cases and redis_unavailable() is None:
            delete_redis_keys(redis_prefix)
    table, summary = build_report(results, sizes)

    output = args.output or harness.default_output("fanout", started)
    harness.write_json(
        output,
        "fanout",
        started=started,
        seconds=time.monotonic() - t0,
        argv=argv,
        sizes=sizes,
        environment=harness.environment_info(environment_versions, loadavg_at_end=True),
        table=table,
        sections={
            "rows": summary,
            "cases": {key: asdict(value) for key, value in results.items()},
        },
    )
    notes = [note] if (note := floor_note(results)) else []
    loads = [v for o in results.values() for v in o.runs.get("loadavg_1min_before", [])]
    if loads:
        notes.append(
            f"Load average (1 min) before the measurements: {min(loads):.2f} to "
            f"{max(loads):.2f}, on {os.cpu_count()} CPUs shared by the client and the servers."
        )
    return harness.print_report(
        "SSE fan-out benchmark", sizes.runs, args.quick, table, results.values(), output, notes
    )


if __name__ == "__main__":
    sys.exit(main())
