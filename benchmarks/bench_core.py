"""Core side-by-side benchmark: raw ASGI vs Starlette floor vs sse-starlette vs sseviews.

Each contender serves the same two endpoints (``/burst?n=N`` and ``/idle``, see
``benchmarks/apps/``) from a real uvicorn subprocess (uvloop + httptools, one
worker) on 127.0.0.1, and is driven by the raw-socket client in
``benchmarks/loadclient.py`` running in this process. ``/burst`` sends events
``0`` to ``N - 1`` as ``data: <i>\n\n`` (the sseviews view yields
``Event(data=str(i))``); ``/idle`` holds the stream open until the client leaves.

Cases (every contender, same run, side by side):

A. server RSS growth per idle stream with ``--conns`` (5000) streams open;
B. events/s of one stream of ``--events`` (100k) events;
C. aggregate events/s of ``--streams`` (10) concurrent streams of
   ``--stream-events`` (20k) events each;
D. seconds from the first connect to the last response head when opening the
   ``--conns`` streams of case A.

The contenders: the hand-written ASGI app (``raw``), the "Starlette floor"
(``floor``: the raw app's endpoint functions routed by a ``Starlette`` app, no
SSE code), sse-starlette and sseviews. sseviews is compared with the floor in
cases A and D (what a Starlette-routed stream cannot go below) and with
sse-starlette in cases B and C.

A/D and B/C each get a fresh server per run; the order of the contenders is
rotated between runs. Every case is repeated ``--runs`` times and the median is
reported as a markdown table (with ratios against the targets) and written,
with the raw per-run numbers, to ``benchmarks/results/core-<timestamp>.json``.

Usage (from anywhere; paths are resolved from this file)::

    python benchmarks/bench_core.py              # full run, 3 runs
    python benchmarks/bench_core.py --quick      # smoke test: small sizes, 1 run
    python benchmarks/bench_core.py --servers raw,sse-starlette --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.dont_write_bytecode = True  # keep __pycache__ out of the work tree

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from benchmarks import harness  # noqa: E402
from benchmarks.harness import HOST, BenchError, ServerSpec, UvicornServer  # noqa: E402
from benchmarks.loadclient import (  # noqa: E402
    BurstResult,
    EventCounter,
    burst,
    connect,
    open_many,
    run,
)

STREAM_OPEN_TIMEOUT = 30.0  # connect + response head, per idle stream
IDLE_CASE_TIMEOUT = 300.0  # whole of case A/D
BURST_TIMEOUT = 180.0  # one burst measurement, all streams
WARMUP_IDLE_STREAMS = 20
VALIDATE_EVENTS = 12  # one- and two-digit events


# -- contenders ---------------------------------------------------------------


SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("raw", "raw ASGI", "benchmarks.apps.raw_app:app"),
    # No SSE library: what Starlette's app and router alone cost per stream.
    ServerSpec("floor", "Starlette floor", "benchmarks.apps.starlette_floor_app:app"),
    ServerSpec("sse-starlette", "sse-starlette", "benchmarks.apps.sse_starlette_app:app"),
    ServerSpec("sseviews", "sseviews", "benchmarks.apps.sseviews_app:app"),
)
SERVERS_BY_KEY = {spec.key: spec for spec in SERVERS}
# How a baseline is named in the ratio and target cells.
BASELINE_NAMES = {"raw": "raw", "floor": "floor", "sse-starlette": "sse-starlette"}


# -- sizes and cases ------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    runs: int
    conns: int
    concurrency: int
    events: int
    streams: int
    stream_events: int
    settle_seconds: float
    hold_seconds: float


FULL = Sizes(
    runs=3,
    conns=5000,
    concurrency=200,
    events=100_000,
    streams=10,
    stream_events=20_000,
    settle_seconds=1.0,
    hold_seconds=2.0,
)
QUICK = replace(
    FULL,
    runs=1,
    conns=500,
    events=10_000,
    stream_events=2_000,
    settle_seconds=0.5,
    hold_seconds=1.0,
)


@dataclass(frozen=True)
class Case:
    key: str
    label: str  # formatted with the Sizes fields
    higher_is_better: bool
    decimals: int
    baseline: str | None = None  # the contender sseviews is compared with
    target_ratio: float | None = None

    @property
    def target_text(self) -> str:
        if self.baseline is None or self.target_ratio is None:
            return ""
        return harness.fmt_target(
            self.target_ratio, self.higher_is_better, BASELINE_NAMES[self.baseline]
        )


# The targets of issue 10 ("Performance must hold").
CASES: tuple[Case, ...] = (
    Case("rss_kb_per_stream", "RSS per idle stream, {conns:,} open, KB", False, 2, "floor", 1.0),
    Case(
        "one_stream_eps",
        "1 stream, {events:,} events, the view yields `Event(data=str(i))`, events/s",
        True,
        0,
        "sse-starlette",
        5.0,
    ),
    Case(
        "multi_stream_eps",
        "{streams} streams x {stream_events:,} such events, aggregate events/s",
        True,
        0,
        "sse-starlette",
        5.0,
    ),
    Case("open_seconds", "time to open {conns:,} streams, s", False, 3, "floor", 1.2),
    # Diagnostics without a target. Server CPU time per event is less noisy
    # than wall-clock throughput on a busy machine.
    Case(
        "one_stream_cpu_us", "(info) server CPU per event, 1 stream, us", False, 2, "sse-starlette"
    ),
    Case(
        "multi_stream_cpu_us",
        "(info) server CPU per event, {streams} streams, us",
        False,
        2,
        "sse-starlette",
    ),
    Case("one_stream_events_per_chunk", "(info) events per HTTP chunk, 1 stream", False, 1),
)


# -- measurements -----------------------------------------------------------------


def burst_body(n: int) -> bytes:
    """The body every contender must send for ``/burst?n=<n>``."""
    return b"".join(b"data: %d\n\n" % i for i in range(n))


def burst_body_size(n: int) -> int:
    """``len(burst_body(n))``, without building it: ``data: `` + digits + two newlines."""
    return sum(len(str(i)) for i in range(n)) + 8 * n


def _check_burst(result: BurstResult, expected_events: int) -> None:
    for head in result.heads:
        if head.status != 200:
            raise BenchError(f"status {head.status} from /burst")
    expected_bytes = burst_body_size(expected_events)
    for events, body_bytes in zip(result.events, result.body_bytes, strict=True):
        if events != expected_events:
            raise BenchError(f"expected {expected_events} events per stream, counted {events}")
        if body_bytes != expected_bytes:
            raise BenchError(
                f"expected {expected_bytes} body bytes, got {body_bytes}"
                " (events are not b'data: <i>\\n\\n'?)"
            )


class _BodyRecorder(EventCounter):
    """An `EventCounter` that keeps the decoded body (for the wire-format check)."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytes] = []

    def feed(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        super().feed(data, start, end)
        self.parts.append(data[start:end])


async def validate(server: UvicornServer) -> dict[str, Any]:
    """Check the server sends exactly the expected bytes; return its response heads."""
    n = VALIDATE_EVENTS
    stream = await connect(HOST, server.port)
    recorder = stream.counter = _BodyRecorder()
    try:
        async with asyncio.timeout(10.0):
            stream.send_request(f"/burst?n={n}")
            head = await stream.head
            await stream.done
    finally:
        stream.close(abort=False)
    if head.status != 200:
        raise BenchError(f"status {head.status} from /burst")
    if not head.headers.get("content-type", "").startswith("text/event-stream"):
        raise BenchError(f"bad content-type {head.headers.get('content-type')!r}")
    body = b"".join(recorder.parts)
    if body != burst_body(n):
        raise BenchError(f"/burst?n={n} sent {body[:120]!r}, expected {burst_body(n)[:120]!r}")
    idle = await open_many(HOST, server.port, "/idle", 1, time_limit=10.0)
    idle.close_all()
    if idle.errors or idle.heads[0].status != 200:
        raise BenchError(f"/idle did not answer 200: {idle.errors or idle.heads[0].status}")
    return {"burst_headers": head.headers, "idle_headers": idle.heads[0].headers}


async def measure_idle(server: UvicornServer, sizes: Sizes) -> dict[str, float]:
    """Cases A and D on a fresh server."""
    port = server.port
    # Warm the code paths (imports, routing, first-request allocations).
    _check_burst(await burst(HOST, port, "/burst?n=100", time_limit=30.0), 100)
    warm = await open_many(HOST, port, "/idle", WARMUP_IDLE_STREAMS, time_limit=STREAM_OPEN_TIMEOUT)
    warm.close_all()
    if warm.errors:
        raise BenchError(f"warm-up streams failed: {warm.errors[0]}")
    await asyncio.sleep(sizes.settle_seconds)

    rss_before = server.rss()
    async with asyncio.timeout(IDLE_CASE_TIMEOUT):
        opened = await open_many(
            HOST,
            port,
            "/idle",
            sizes.conns,
            concurrency=sizes.concurrency,
            time_limit=STREAM_OPEN_TIMEOUT,
        )
    try:
        if opened.errors:
            raise BenchError(
                f"{len(opened.errors)} of {sizes.conns} idle streams failed,"
                f" e.g. {opened.errors[0]}"
            )
        bad = [head.status for head in opened.heads if head.status != 200]
        if bad:
            raise BenchError(f"{len(bad)} idle streams answered non-200, e.g. {bad[0]}")
        await asyncio.sleep(sizes.hold_seconds)
        ended = sum(1 for stream in opened.streams if stream.done.done())
        if ended:
            raise BenchError(f"{ended} idle streams ended while held open")
        server.check_alive()
        rss_after = server.rss()
    finally:
        opened.close_all()
    return {
        "rss_kb_per_stream": (rss_after - rss_before) / sizes.conns / 1024,
        "open_seconds": opened.elapsed,
        "rss_before_mb": rss_before / 2**20,
        "rss_after_mb": rss_after / 2**20,
    }


async def measure_bursts(server: UvicornServer, sizes: Sizes) -> dict[str, float]:
    """Cases B and C on a fresh server."""
    port = server.port
    _check_burst(await burst(HOST, port, "/burst?n=1000", time_limit=30.0), 1000)  # warm-up

    cpu_start = server.cpu_seconds()
    one = await burst(HOST, port, f"/burst?n={sizes.events}", time_limit=BURST_TIMEOUT)
    cpu_one = server.cpu_seconds() - cpu_start
    _check_burst(one, sizes.events)

    cpu_start = server.cpu_seconds()
    multi = await burst(
        HOST,
        port,
        f"/burst?n={sizes.stream_events}",
        streams=sizes.streams,
        time_limit=BURST_TIMEOUT,
    )
    cpu_multi = server.cpu_seconds() - cpu_start
    _check_burst(multi, sizes.stream_events)
    server.check_alive()
    return {
        "one_stream_eps": one.events_per_second,
        "multi_stream_eps": multi.events_per_second,
        "one_stream_cpu_us": cpu_one / one.total_events * 1e6,
        "multi_stream_cpu_us": cpu_multi / multi.total_events * 1e6,
        "one_stream_events_per_chunk": one.total_events / max(one.total_chunks, 1),
        "one_stream_seconds": one.elapsed,
        "multi_stream_seconds": multi.elapsed,
    }


# -- orchestration ------------------------------------------------------------------


@dataclass
class ServerResults(harness.Outcome):
    label: str
    available: bool = True
    skipped_reason: str | None = None
    validation: dict[str, Any] | None = None
    runs: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _probe_import(module: str, env: dict[str, str]) -> str | None:
    """Return None if ``module`` imports in a child like the server's, else why not."""
    return harness.probe(
        f"import {module}",
        env,
        timed_out=f"importing {module} timed out",
        failed=f"import {module} failed",
    )


def run_benchmark(
    specs: Sequence[ServerSpec], sizes: Sizes, env: dict[str, str], explicit: bool, log_dir: Path
) -> dict[str, ServerResults]:
    results: dict[str, ServerResults] = {}
    active: list[ServerSpec] = []
    for spec in specs:
        outcome = results[spec.key] = ServerResults(spec.label)
        reason = _probe_import(spec.module, env)
        outcome.available = reason is None
        if not harness.mark_skipped(outcome, reason, explicit):
            active.append(spec)

    def one_run(spec: ServerSpec, what: str, run_index: int, phase: str) -> None:
        outcome = results[spec.key]

        def body() -> dict[str, float]:
            with UvicornServer(spec, env, log_dir) as server:
                if outcome.validation is None:
                    outcome.validation = run(validate(server))
                measure = measure_idle if phase == "idle" else measure_bursts
                return run(measure(server, sizes))

        error_prefix = f"run {run_index + 1} {what}"
        harness.attempt(outcome, what, run_index, sizes.runs, body, error_prefix=error_prefix)

    for run_index in range(sizes.runs):
        order = harness.rotated(active, run_index)
        for spec in order:
            one_run(spec, f"A/D, {sizes.conns} idle streams", run_index, "idle")
        for spec in order:
            one_run(spec, "B/C, bursts", run_index, "burst")
    return results


# -- reporting ------------------------------------------------------------------------


def _ratio(medians: dict[str, float | None], contender: str, baseline: str) -> float | None:
    ours, theirs = medians.get(contender), medians.get(baseline)
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def build_report(results: dict[str, ServerResults], sizes: Sizes) -> tuple[str, dict[str, Any]]:
    """Return the markdown table and a JSON-able summary of medians and ratios.

    The columns are those of :func:`harness.table_header`; a contender that
    was not selected shows ``-``, one that failed ``n/a``.
    """
    lines = harness.table_header()
    summary: dict[str, Any] = {}
    for case in CASES:
        medians = {
            spec.key: results[spec.key].median(case.key) if spec.key in results else None
            for spec in SERVERS
        }
        ratios = {
            f"sseviews/{base}": _ratio(medians, "sseviews", base)
            for base in ("raw", "floor", "sse-starlette")
        }
        ratios["floor/raw"] = _ratio(medians, "floor", "raw")
        ratio = ratios[f"sseviews/{case.baseline}"] if case.baseline else None
        met: bool | None = None
        if case.target_ratio is not None and ratio is not None:
            met = harness.meets(ratio, case.target_ratio, case.higher_is_better)
        cells = [case.label.format(**asdict(sizes))]
        cells += [
            harness.fmt(medians[spec.key], case.decimals) if spec.key in results else "-"
            for spec in SERVERS
        ]
        cells.append(
            harness.fmt_ratio(ratio, BASELINE_NAMES[case.baseline]) if case.baseline else ""
        )
        cells += [case.target_text, harness.met_cell(case.target_ratio is not None, met)]
        lines.append(harness.table_row(cells))
        summary[case.key] = {
            "label": cells[0],
            "cells": cells,
            "info": case.target_ratio is None,
            "higher_is_better": case.higher_is_better,
            "medians": medians,
            "ratios": ratios,
            "baseline": case.baseline,
            "target": case.target_text or None,
            "target_met": met,
        }
    return "\n".join(lines), summary


# -- command line ------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = harness.new_parser(
        "Side-by-side SSE benchmark: raw ASGI vs Starlette floor vs sse-starlette vs sseviews.",
        f"repetitions per case (default {FULL.runs}; --quick: {QUICK.runs})",
    )
    parser.add_argument("--servers", help="comma-separated subset of: " + ",".join(SERVERS_BY_KEY))
    parser.add_argument("--conns", type=int, help="idle streams for cases A/D")
    parser.add_argument(
        "--concurrency", type=int, help="max handshakes in flight when opening idle streams"
    )
    parser.add_argument("--events", type=int, help="events of the single stream (case B)")
    parser.add_argument("--streams", type=int, help="concurrent streams (case C)")
    parser.add_argument("--stream-events", type=int, help="events per stream (case C)")
    parser.add_argument(
        "--sse-starlette-ping",
        metavar="SECONDS",
        help="ping interval for sse-starlette (default 0 = no ping task)",
    )
    harness.add_output_argument(parser, "core")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    names = ("runs", "conns", "concurrency", "events", "streams", "stream_events")
    sizes = harness.sizes_from_args(args, FULL, QUICK, names)
    if min(getattr(sizes, name) for name in names) < 1:
        raise SystemExit("sizes and --runs must be >= 1")

    explicit = args.servers is not None
    keys = args.servers.split(",") if explicit else list(SERVERS_BY_KEY)
    unknown = [key for key in keys if key not in SERVERS_BY_KEY]
    if unknown:
        raise SystemExit(f"unknown server(s) {unknown}; choose from {list(SERVERS_BY_KEY)}")
    specs = [SERVERS_BY_KEY[key] for key in keys]

    harness.ensure_nofile(sizes.conns + 100, f"{sizes.conns} streams")
    if args.sse_starlette_ping is not None:
        os.environ["SSE_STARLETTE_PING"] = args.sse_starlette_ping
    env = harness.child_env()  # with SSE_STARLETTE_PING, if set just above

    started = dt.datetime.now()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-core-") as log_dir:
        results = run_benchmark(specs, sizes, env, explicit, Path(log_dir))
    table, summary = build_report(results, sizes)

    output = args.output or harness.default_output("core", started)
    harness.write_json(
        output,
        "core",
        started=started,
        seconds=time.monotonic() - t0,
        argv=argv,
        sizes=sizes,
        environment=harness.environment_info(harness.package_versions),
        table=table,
        sections={
            "cases": summary,
            "servers": {key: asdict(value) for key, value in results.items()},
        },
    )
    return harness.print_report(
        "SSE core benchmark", sizes.runs, args.quick, table, results.values(), output
    )


if __name__ == "__main__":
    sys.exit(main())
