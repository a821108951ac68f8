"""Compression benchmark: bytes on the wire, memory per idle stream, fan-out CPU.

Three cases, each for identity (no compression) and every encoding sseviews
offers (gzip, zstd, br), with the library's own compressor settings
(`sseviews/_compression.py`):

1. **Bytes on the wire** -- in-process (`EventStreamClient`), 1,000 events of
   two streams, each event published to a group and read by the client before
   the next one (one flushed write per event, as a live stream sends them):

   - *dashboard*: the example project's `metrics` event (`DashboardFeed`: pid,
     RSS, CPU %, open files, threads, streams, uptime), its values drifting as a
     real server's do;
   - *chat*: a `message` event with an id, a user, a room, a timestamp and a
     sentence of 4 to 16 words drawn from 200 common English words.

   Also the encoder's own CPU per event (the same events, encoded in a loop).
2. **RSS per idle stream** -- a uvicorn subprocess (`benchmarks/apps/fanout_sseviews.py`
   with ``FANOUT_COMPRESS``) holds ``--idle`` (5,000) open streams of a group; the
   server's RSS growth divided by the streams: once they are open (nothing sent
   yet), right after one event went to every stream (each holds a compressor),
   and after a ping (``FANOUT_PING`` = 1 s: gzip and zstd drop their compressor).
   Each reading follows the app's ``/trim`` (glibc's ``malloc_trim``), so RSS
   shows what the streams hold, not what the allocator kept after a free.
3. **Fan-out CPU per delivery** -- `bench_fanout.measure_fanout` (the memory case
   of ``benchmarks/bench_fanout.py``): ``--subscribers`` (1,000) streams of one
   uvicorn process, 20 events 20 ms apart, the client decoding every stream;
   the server's CPU time divided by the deliveries, median of ``--runs`` (3).

Usage::

    python benchmarks/bench_compression.py            # about 2 minutes
    python benchmarks/bench_compression.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.dont_write_bytecode = True  # keep __pycache__ out of the work tree

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import anyio  # noqa: E402
import psutil  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.routing import Route  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.bench_fanout import (  # noqa: E402
    FULL,
    SSEVIEWS_APP,
    Completion,
    RecordingCounter,
    close_all,
    get_json,
    measure_fanout,
    open_subscribers,
    server_pid,
    wait_subscribers,
)
from benchmarks.harness import ServerSpec, UvicornServer  # noqa: E402
from benchmarks.loadclient import run  # noqa: E402
from sseviews import Broadcast, Event, EventStreamView  # noqa: E402
from sseviews._compression import Decoder, available_encodings, make_encoder  # noqa: E402
from sseviews.testing import EventStreamClient  # noqa: E402

ENCODINGS = ("identity", *available_encodings())
RESULTS = Path(__file__).resolve().parent / "results"
WORDS = (
    "the be to of and a in that have I it for not on with he as you do at this but his by "
    "from they we say her she or an will my one all would there their what so up out if "
    "about who get which go me when make can like time no just him know take people into "
    "year your good some could them see other than then now look only come its over think "
    "also back after use two how our work first well way even new want because any these "
    "give day most us is are was were been has had did said got made went ok yes thanks "
    "sure deploy build release test merge review branch meeting lunch today tomorrow later "
    "tonight morning issue bug fix done ship ready wait sorry great nice cool agree idea "
    "plan call team check push pull data server client page update please maybe soon "
    "again still never always here where why right left next last week month number"
).split()


# -- the two streams ---------------------------------------------------------------------


def dashboard_events(count: int, rng: random.Random) -> list[tuple[str, Any]]:
    """`DashboardFeed`'s `metrics` events, one a second of a server that lives on."""
    rss = 84_000_000
    events = []
    for n in range(count):
        rss += rng.randint(-16, 20) * 4096
        metrics = {
            "pid": 41237,
            "rss_bytes": rss,
            "cpu_percent": round(rng.uniform(0.2, 7.5), 1),
            "open_files": 23 + rng.randint(0, 3),
            "threads": 4,
            "streams": 12 + rng.randint(-2, 2),
            "uptime_seconds": round(3600 + n * 1.0 + rng.uniform(0, 0.05), 1),
        }
        events.append(("metrics", metrics))
    return events


def chat_events(count: int, rng: random.Random) -> list[tuple[str, Any]]:
    users = ["alice", "bob", "carol", "dave", "erin", "frank"]
    events = []
    for n in range(count):
        text = " ".join(rng.choices(WORDS, k=rng.randint(4, 16)))
        message = {
            "user": rng.choice(users),
            "room": "general",
            "text": text,
            "sent_at": f"2026-12-07T10:{n // 60 % 60:02d}:{n % 60:02d}Z",
        }
        events.append(("message", message))
    return events


# -- 1. bytes on the wire ------------------------------------------------------------------


async def wire_bytes(events: list[tuple[str, Any]], encoding: str) -> dict[str, float]:
    broadcast = Broadcast("memory://")
    view = type(
        "Feed",
        (EventStreamView,),
        {
            "broadcast": broadcast,
            "groups": ["feed"],
            "ping_interval": None,
            "compress": False if encoding == "identity" else (encoding,),
        },
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with broadcast:
            yield

    app = Starlette(routes=[Route("/", view)], lifespan=lifespan)
    headers = {} if encoding == "identity" else {"Accept-Encoding": encoding}
    async with EventStreamClient(app, timeout=10) as client:
        async with client.stream("/", headers=headers) as stream:
            for name, data in events:
                await broadcast.publish("feed", Event(data, event=name))
                await stream.next_event()  # one flushed write per event
            return {"wire": len(stream.wire), "plain": len(stream.raw)}


def encoder_cpu(chunks: list[bytes], encoding: str, repeat: int) -> float:
    """Microseconds of the encoder per event (each chunk encoded and flushed)."""
    best = float("inf")
    for _ in range(repeat):
        encoder = make_encoder(encoding)
        encoder.start(b"")
        started = time.perf_counter()
        for chunk in chunks:
            encoder.encode(chunk, False)
        best = min(best, time.perf_counter() - started)
    return best / len(chunks) * 1e6


def measure_bytes(count: int) -> dict[str, dict[str, dict[str, float]]]:
    results: dict[str, dict[str, dict[str, float]]] = {}
    for stream, make in (("dashboard", dashboard_events), ("chat", chat_events)):
        events = make(count, random.Random(22))
        chunks = [Event(data, event=name).encode() for name, data in events]
        results[stream] = {}
        for encoding in ENCODINGS:
            figures = anyio.run(wire_bytes, events, encoding)
            if encoding != "identity":
                figures["encoder_us_per_event"] = encoder_cpu(chunks, encoding, 3)
            results[stream][encoding] = figures
    return results


# -- 2. RSS per idle stream ------------------------------------------------------------------


class DecodingCounter(RecordingCounter):
    """A `RecordingCounter` that decodes a compressed body before counting its events."""

    __slots__ = ("_decoder",)

    def __init__(self, target: int, completion: Completion | None, encoding: str) -> None:
        super().__init__(target, completion)
        self._decoder = Decoder(encoding)

    def feed(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        if end is None:
            end = len(data)
        if start < end:
            super().feed(self._decoder.decode(data[start:end]))


def client_options(encoding: str) -> dict[str, Any]:
    if encoding == "identity":
        return {}

    def counter(target: int, completion: Completion | None) -> RecordingCounter:
        return DecodingCounter(target, completion, encoding)

    return {"headers": [("Accept-Encoding", encoding)], "counter": counter}


def server_spec(encoding: str) -> ServerSpec:
    return ServerSpec(f"compress-{encoding}", f"sseviews ({encoding})", SSEVIEWS_APP)


def server_env(encoding: str, **extra: str) -> dict[str, str]:
    if encoding != "identity":
        extra["FANOUT_COMPRESS"] = encoding
    return harness.child_env(**extra)


async def idle_rss(server: UvicornServer, encoding: str, streams: int) -> dict[str, float]:
    port = server.port
    process = psutil.Process(server_pid(server))

    async def held() -> int:
        """The server's RSS once its allocator has returned the pages it holds free."""
        await get_json(port, "/trim")
        return int(process.memory_info().rss)

    options = client_options(encoding)
    warm = await open_subscribers(port, 200, 200, 1, Completion(200), **options)
    await wait_subscribers(port, 200)
    await get_json(port, "/start?n=1&interval=0")
    await asyncio.sleep(0.5)
    close_all(warm)
    await wait_subscribers(port, 0)
    await asyncio.sleep(0.5)
    before = await held()
    completion = Completion(streams)
    opened = await open_subscribers(port, streams, 500, 1, completion, **options)
    try:
        await wait_subscribers(port, streams)
        await asyncio.sleep(0.5)
        idle = await held()
        await get_json(port, "/start?n=1&interval=0")
        async with asyncio.timeout(60):
            await completion.event.wait()
        await asyncio.sleep(0.2)
        active = await held()
        await asyncio.sleep(1.6)  # FANOUT_PING = 1: every stream has sent its ping
        pinged = await held()
    finally:
        close_all(opened)
    return {
        "idle_kib_per_stream": (idle - before) / streams / 1024,
        "after_event_kib_per_stream": (active - before) / streams / 1024,
        "after_ping_kib_per_stream": (pinged - before) / streams / 1024,
    }


def measure_rss(streams: int, log_dir: Path) -> dict[str, dict[str, float]]:
    results = {}
    for encoding in ENCODINGS:
        env = server_env(encoding, FANOUT_PING="1")
        with UvicornServer(server_spec(encoding), env, log_dir) as server:
            results[encoding] = run(idle_rss(server, encoding, streams))
    return results


# -- 3. fan-out CPU per delivery --------------------------------------------------------------


def measure_fanout_cpu(subscribers: int, runs: int, log_dir: Path) -> dict[str, dict[str, float]]:
    sizes = replace(FULL, runs=runs, subscribers=subscribers, batch=250, settle_seconds=0.5)
    samples: dict[str, list[dict[str, float]]] = {encoding: [] for encoding in ENCODINGS}
    for run_index in range(runs):
        for encoding in harness.rotated(list(ENCODINGS), run_index):
            with UvicornServer(server_spec(encoding), server_env(encoding), log_dir) as server:
                figures = run(
                    measure_fanout([server], [subscribers], sizes, **client_options(encoding))
                )
            samples[encoding].append(figures)
    return {
        encoding: {
            key: statistics.median(run[key] for run in runs_)
            for key in ("server_cpu_us_per_delivery", "p50_ms", "p99_ms")
        }
        for encoding, runs_ in samples.items()
    }


# -- report -----------------------------------------------------------------------------------


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"| measure | {' | '.join(ENCODINGS)} |",
        "|---" * (len(ENCODINGS) + 1) + "|",
    ]

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"| {label} | {' | '.join(cells)} |")

    for stream, by_encoding in results["bytes"].items():
        plain = by_encoding["identity"]["wire"]
        row(
            f"{stream}: bytes on the wire, {args.events} events",
            [f"{by_encoding[e]['wire']:,.0f}" for e in ENCODINGS],
        )
        row(
            f"{stream}: fewer bytes than identity",
            [f"{plain / by_encoding[e]['wire']:.1f}x" for e in ENCODINGS],
        )
        row(
            f"{stream}: encoder CPU per event, us",
            ["-"] + [f"{by_encoding[e]['encoder_us_per_event']:.1f}" for e in ENCODINGS[1:]],
        )
    rss = results["rss"]
    for key, label in (
        ("idle_kib_per_stream", "open, nothing sent yet"),
        ("after_event_kib_per_stream", "right after an event"),
        ("after_ping_kib_per_stream", "idle again, after a ping"),
    ):
        row(
            f"RSS per stream ({args.idle:,} streams), {label}, KiB",
            [f"{rss[e][key]:.1f}" for e in ENCODINGS],
        )
    fanout = results["fanout"]
    base = fanout["identity"]["server_cpu_us_per_delivery"]
    row(
        f"fan-out ({args.subscribers:,} subscribers x 20 events): server CPU per delivery, us",
        [f"{fanout[e]['server_cpu_us_per_delivery']:.1f}" for e in ENCODINGS],
    )
    row(
        "fan-out: CPU per delivery against identity",
        [f"{fanout[e]['server_cpu_us_per_delivery'] / base:.2f}x" for e in ENCODINGS],
    )
    row(
        "fan-out: latency p50 / p99, ms",
        [f"{fanout[e]['p50_ms']:.1f} / {fanout[e]['p99_ms']:.1f}" for e in ENCODINGS],
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=5000, help="streams of the RSS case")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run")
    args = parser.parse_args()
    if args.quick:
        args.events, args.idle, args.subscribers, args.runs = 200, 500, 200, 1
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as logs:
        log_dir = Path(logs)
        results = {
            "bytes": measure_bytes(args.events),
            "rss": measure_rss(args.idle, log_dir),
            "fanout": measure_fanout_cpu(args.subscribers, args.runs, log_dir),
        }
    table = report(results, args)
    print(table)
    print(f"\n({time.monotonic() - started:.0f} s)")
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"compression-{stamp}.json"
    path.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
