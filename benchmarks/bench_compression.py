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

   Also the encoder's own CPU time per event (the same events, encoded in a loop).
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

4. **The settings matrix** (``--matrix``, instead of cases 1 to 3) -- each
   encoder setting below (the library's code, its ``GZIP_*``, ``ZSTD_*`` and
   ``BROTLI_*`` settings replaced in turn) encodes the writes the identity stream
   of case 1 sent, one flushed write per event as a live stream does:

   - gzip level {1, 6, 9} x ``wbits`` {12, 13, 15} x ``memLevel`` {5, 8};
   - zstd level {3, 6, 9} x window log {12, 14, 17}, hash and chain logs two
     less than the window log (the library's 10 for its 4 KiB window);
   - br quality {4, 5, 6} x ``lgwin`` {10, 12, 16}, and qualities 0 to 3 with
     ``lgwin`` 10 and 16 (the smaller encoders);
   - and two ceilings: each event flushed at the encoding's best (gzip 9/15/9,
     zstd 19, br the best of qualities 5, 6, 9 and 11 with ``lgwin`` 22), memory
     no object; and the whole stream with no flush at all (events held back:
     what no live stream can do).

   For each: both streams' ratio to identity, the encoder's CPU time per chat
   event (1,000 events through one encoder, best of 3; median of ``--runs``)
   and for a new encoder's first event
   (what a gzip or zstd stream pays again after each idle spell), and the memory
   an encoder holds while it streams: a fresh subprocess's RSS growth over
   ``--probe-streams`` (400) live encoders that each encoded 300 chat events
   (45 KiB, more than the largest window), read
   after glibc's ``malloc_trim`` (zlib, zstd and brotli allocate in C, which
   tracemalloc does not see).

Usage::

    python benchmarks/bench_compression.py            # about 2 minutes
    python benchmarks/bench_compression.py --quick    # smoke test
    python benchmarks/bench_compression.py --matrix   # the settings, about 5 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import datetime as dt
import gc
import itertools
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
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
from sseviews import Broadcast, Event, EventStreamView, _compression  # noqa: E402
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
    """Microseconds of the encoder's CPU per event (each chunk encoded and flushed),
    the best of `repeat` loops; CPU time, which other processes on the machine
    disturb less than wall time."""
    best = float("inf")
    for _ in range(repeat):
        encoder = make_encoder(encoding)
        encoder.start(b"")
        started = time.process_time()
        for chunk in chunks:
            encoder.encode(chunk, False)
        best = min(best, time.process_time() - started)
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


# -- 4. the settings matrix -------------------------------------------------------------------

#: Each encoding's settings in `sseviews._compression`, in the order a matrix row gives them.
SETTING_NAMES = {
    "gzip": ("GZIP_LEVEL", "GZIP_WBITS", "GZIP_MEMLEVEL"),
    "zstd": ("ZSTD_LEVEL", "ZSTD_WINDOW_LOG", "ZSTD_HASH_LOG", "ZSTD_CHAIN_LOG"),
    "br": ("BROTLI_QUALITY", "BROTLI_LGWIN"),
}


def matrix_settings() -> list[tuple[str, tuple[int, ...]]]:
    rows: list[tuple[str, tuple[int, ...]]] = []
    for level, wbits, memlevel in itertools.product((1, 6, 9), (12, 13, 15), (5, 8)):
        rows.append(("gzip", (level, wbits, memlevel)))
    for level, window_log in itertools.product((3, 6, 9), (12, 14, 17)):
        # Hash and chain tables scaled with the window (the library's 10 for 4 KiB).
        rows.append(("zstd", (level, window_log, window_log - 2, window_log - 2)))
    for quality, lgwin in itertools.product((4, 5, 6), (10, 12, 16)):
        rows.append(("br", (quality, lgwin)))
    for quality, lgwin in itertools.product((0, 1, 2, 3), (10, 16)):
        rows.append(("br", (quality, lgwin)))
    return rows


@contextmanager
def settings(encoding: str, values: tuple[int, ...]) -> Iterator[None]:
    """The library's own encoder, with `values` for its settings while the block runs."""
    names = SETTING_NAMES[encoding]
    saved = [getattr(_compression, name) for name in names]
    for name, value in zip(names, values, strict=True):
        setattr(_compression, name, value)
    _compression._gzip_preamble.cache_clear()
    _compression._zstd_preamble.cache_clear()
    try:
        yield
    finally:
        for name, value in zip(names, saved, strict=True):
            setattr(_compression, name, value)
        _compression._gzip_preamble.cache_clear()
        _compression._zstd_preamble.cache_clear()


async def stream_writes(events: list[tuple[str, Any]]) -> tuple[bytes, list[bytes]]:
    """What an identity stream of `events` writes: its first chunk, then one chunk per event."""
    broadcast = Broadcast("memory://")
    view = type(
        "Feed",
        (EventStreamView,),
        {"broadcast": broadcast, "groups": ["feed"], "ping_interval": None},
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with broadcast:
            yield

    app = Starlette(routes=[Route("/", view)], lifespan=lifespan)
    chunks = []
    async with EventStreamClient(app, timeout=10) as client:
        async with client.stream("/") as stream:
            first = stream.raw
            for name, data in events:
                before = len(stream.raw)
                await broadcast.publish("feed", Event(data, event=name))
                await stream.next_event()
                chunks.append(stream.raw[before:])
    return first, chunks


def encoded_size(encoding: str, first: bytes, chunks: list[bytes]) -> int:
    """The body's bytes: `first`, then each chunk encoded and flushed, then the end."""
    encoder = make_encoder(encoding)
    size = len(encoder.start(first))
    for chunk in chunks:
        size += len(encoder.encode(chunk, False))
    return size + len(encoder.finish(b""))


def first_event_us(encoding: str, chunk: bytes, repeat: int = 2000) -> float:
    """Microseconds of CPU for a new encoder's first event (best of 5 loops of `repeat`)."""
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(repeat):
            make_encoder(encoding).encode(chunk, False)
        best = min(best, time.process_time() - started)
    return best / repeat * 1e6


def unflushed_ceiling(encoding: str, first: bytes, chunks: list[bytes]) -> int:
    """The whole stream compressed in one go at the encoding's best: no live stream does better."""
    whole = first + b"".join(chunks)
    if encoding == "gzip":
        deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + 15, 9)
        return len(deflate.compress(whole) + deflate.flush())
    if encoding == "zstd":
        return len(_compression.zstandard.ZstdCompressor(level=19).compress(whole))
    return len(_compression.brotli.compress(whole, mode=_compression.brotli.MODE_TEXT, quality=11))


def flushed_ceiling(encoding: str, first: bytes, chunks: list[bytes]) -> int:
    """Each chunk flushed, as a live stream does, at the encoding's best and with
    memory no object: what no setting of a live stream can beat."""
    if encoding == "gzip":
        deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + 15, 9)
        parts = [deflate.compress(first) + deflate.flush(zlib.Z_PARTIAL_FLUSH)]
        parts += [deflate.compress(c) + deflate.flush(zlib.Z_PARTIAL_FLUSH) for c in chunks]
        return sum(map(len, parts)) + len(deflate.flush())
    if encoding == "zstd":
        zstandard = _compression.zstandard
        frame = zstandard.ZstdCompressor(level=19).compressobj()
        block = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        parts = [frame.compress(c) + frame.flush(block) for c in (first, *chunks)]
        return sum(map(len, parts)) + len(frame.flush())
    brotli = _compression.brotli
    best = None
    for quality in (5, 6, 9, 11):
        compressor = brotli.Compressor(mode=brotli.MODE_TEXT, quality=quality, lgwin=22)
        parts = [compressor.process(c) + compressor.flush() for c in (first, *chunks)]
        size = sum(map(len, parts)) + len(compressor.finish())
        best = size if best is None else min(best, size)
    assert best is not None
    return best


def probe_memory(encoding: str, values: tuple[int, ...], streams: int) -> float:
    """KiB of RSS per live encoder, in a fresh process (its allocator holds nothing yet)."""
    command = [sys.executable, __file__, "--probe", encoding, *map(str, values)]
    command += ["--probe-streams", str(streams)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def run_probe(encoding: str, values: tuple[int, ...], streams: int) -> None:
    """The `--probe` child: print the RSS growth per live encoder, in KiB."""
    # 300 chat events, about 45 KiB: more than the largest window, so each
    # encoder touches all the memory a long burst of events would.
    events = chat_events(300, random.Random(22))
    chunks = [Event(data, event=name).encode() for name, data in events]
    libc = ctypes.CDLL("libc.so.6")
    process = psutil.Process()

    def held() -> int:
        gc.collect()
        libc.malloc_trim(0)
        return int(process.memory_info().rss)

    with settings(encoding, values):
        warm = make_encoder(encoding)  # the module's first-use allocations
        for chunk in chunks:
            warm.encode(chunk, False)
        del warm
        before = held()
        encoders = []
        for _ in range(streams):
            encoder = make_encoder(encoding)
            encoder.start(b"")
            for chunk in chunks:
                encoder.encode(chunk, False)
            encoders.append(encoder)
        after = held()
    print((after - before) / streams / 1024)


def measure_matrix(count: int, streams: int, runs: int) -> dict[str, Any]:
    writes = {
        stream: anyio.run(stream_writes, make(count, random.Random(22)))
        for stream, make in (("dashboard", dashboard_events), ("chat", chat_events))
    }
    plain = {
        stream: len(first) + sum(map(len, chunks)) for stream, (first, chunks) in writes.items()
    }
    chat = writes["chat"][1]
    rows = []
    for encoding, values in matrix_settings():
        if encoding not in available_encodings():
            continue
        row: dict[str, Any] = {"encoding": encoding, "settings": values}
        with settings(encoding, values):
            for stream, (first, chunks) in writes.items():
                row[f"{stream}_ratio"] = plain[stream] / encoded_size(encoding, first, chunks)
        row["kib_per_active_stream"] = probe_memory(encoding, values, streams)
        rows.append(row)
    # CPU: every setting once per run, the runs in turn, so a busy spell of the
    # shared machine spreads over all of them; the median of the runs.
    samples: list[dict[str, list[float]]] = [{"encode": [], "first": []} for _ in rows]
    for _ in range(runs):
        for row, sample in zip(rows, samples, strict=True):
            with settings(row["encoding"], row["settings"]):
                sample["encode"].append(encoder_cpu(chat, row["encoding"], 3))
                sample["first"].append(first_event_us(row["encoding"], chat[0]))
    for row, sample in zip(rows, samples, strict=True):
        row["encoder_us_per_event"] = statistics.median(sample["encode"])
        row["first_event_us"] = statistics.median(sample["first"])
    ceilings = {
        name: {
            encoding: {
                stream: plain[stream] / measure(encoding, first, chunks)
                for stream, (first, chunks) in writes.items()
            }
            for encoding in available_encodings()
        }
        for name, measure in (("flushed", flushed_ceiling), ("unflushed", unflushed_ceiling))
    }
    return {"plain_bytes": plain, "rows": rows, "ceilings": ceilings}


def _matrix_line(row: dict[str, Any]) -> str:
    names = ", ".join(
        f"{name.split('_', 1)[1].lower()} {value}"
        for name, value in zip(SETTING_NAMES[row["encoding"]], row["settings"], strict=True)
    )
    return (
        f"| {row['encoding']} | {names} | {row['chat_ratio']:.2f}x | {row['dashboard_ratio']:.2f}x "
        f"| {row['encoder_us_per_event']:.1f} | {row['first_event_us']:.1f} "
        f"| {row['kib_per_active_stream']:.1f} |"
    )


def matrix_report(results: dict[str, Any]) -> str:
    lines = [
        "| encoding | settings | chat | dashboard | encoder CPU per event, us "
        "| new encoder's first event, us | KiB per active stream |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [_matrix_line(row) for row in results["rows"]]
    for name, title in (
        ("flushed", "Each event flushed, at the best level and window (memory no object)"),
        ("unflushed", "Whole stream, no flush (events held back): not a live stream"),
    ):
        lines += ["", f"{title}:"]
        for encoding, by_stream in results["ceilings"][name].items():
            lines.append(
                f"- {encoding}: chat {by_stream['chat']:.2f}x, "
                f"dashboard {by_stream['dashboard']:.2f}x"
            )
    return "\n".join(lines)


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
    parser.add_argument("--matrix", action="store_true", help="the settings matrix (case 4)")
    parser.add_argument("--probe-streams", type=int, default=400, help="encoders per memory probe")
    parser.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        run_probe(args.probe[0], tuple(map(int, args.probe[1:])), args.probe_streams)
        return
    if args.quick:
        args.events, args.idle, args.subscribers, args.runs = 200, 500, 200, 1
    started = time.monotonic()
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    if args.matrix:
        matrix = measure_matrix(args.events, args.probe_streams, args.runs)
        print(matrix_report(matrix))
        print(f"\n({time.monotonic() - started:.0f} s)")
        path = RESULTS / f"compression-matrix-{stamp}.json"
        path.write_text(json.dumps({"args": vars(args), "results": matrix}, indent=2))
        print(f"wrote {path}")
        return
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
    path = RESULTS / f"compression-{stamp}.json"
    path.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
