"""Scale curve: what one stream costs as the number of open streams grows.

Two cases, each contender on a fresh uvicorn subprocess (uvloop + httptools),
driven over loopback by ``loadclient.py``, side by side in one run:

* **idle**: server RSS growth per idle stream with 1,000, 5,000 and 20,000
  streams open, for the Starlette floor (no SSE code), an sseviews view that
  streams a broadcast group (``apps/sseviews_app.py``'s ``/idle``) and an
  sseviews generator view (``apps/sseviews_generator_app.py``);
* **fan-out**: server CPU per delivery with 20,000 subscribers of one group,
  raw ASGI against sseviews, measured by ``bench_fanout.py``'s memory case in
  the publishing window (its events are due on a fixed schedule, and it reports
  latency from each event's scheduled time as well).

A stream costs a file descriptor on each side: a count above the server's
``RLIMIT_NOFILE`` hard limit (less a margin for the server's own files) is
lowered to it, and the table says so. The client's connections are spread over
``--source-hosts`` loopback addresses (127.0.0.1, 127.0.0.2, ...), so ephemeral
ports never run out.

    python benchmarks/bench_scale.py                   # 3 runs, medians
    python benchmarks/bench_scale.py --quick           # 1 run, 1,000 and 2,000 streams
    python benchmarks/bench_scale.py --cases idle --counts 1000,5000
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.dont_write_bytecode = True  # keep __pycache__ out of the work tree

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from benchmarks import harness  # noqa: E402
from benchmarks.harness import HOST, BenchError, ServerSpec, UvicornServer  # noqa: E402
from benchmarks.loadclient import open_many, raise_nofile_limit, run  # noqa: E402

IDLE_SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("floor", "Starlette floor", "benchmarks.apps.starlette_floor_app:app"),
    ServerSpec("sseviews", "sseviews, group view", "benchmarks.apps.sseviews_app:app"),
    ServerSpec(
        "sseviews-generator",
        "sseviews, generator view",
        "benchmarks.apps.sseviews_generator_app:app",
    ),
)
IDLE_BY_KEY = {spec.key: spec for spec in IDLE_SERVERS}
FANOUT_SERVERS = ("raw", "sseviews")
CASES = ("idle", "fanout")

FD_MARGIN = 64  # the server's own files: listening socket, logs, pipes, epoll
# bench_fanout.py's client asks for 200 descriptors over its subscribers.
FANOUT_FD_MARGIN = 256
WARMUP_STREAMS = 50
OPEN_TIMEOUT = 300.0  # opening every stream of one measurement
STREAM_TIMEOUT = 60.0  # one stream's connect and head


@dataclass(frozen=True)
class Sizes:
    runs: int
    counts: tuple[int, ...]
    concurrency: int
    settle_seconds: float
    hold_seconds: float
    source_hosts: int
    fanout_subscribers: int
    fanout_events: int
    fanout_interval_ms: float


FULL = Sizes(
    runs=3,
    counts=(1000, 5000, 20_000),
    concurrency=200,
    settle_seconds=1.0,
    hold_seconds=2.0,
    source_hosts=4,
    fanout_subscribers=20_000,
    fanout_events=10,
    # 20,000 deliveries an event: the interval leaves room for a server that
    # costs several times raw's per delivery, so neither falls behind for good.
    fanout_interval_ms=1000.0,
)
QUICK = replace(
    FULL,
    runs=1,
    counts=(1000, 2000),
    settle_seconds=0.5,
    hold_seconds=1.0,
    fanout_subscribers=2000,
    fanout_events=5,
    fanout_interval_ms=200.0,
)


@dataclass
class IdleResult(harness.Outcome):
    label: str
    skipped_reason: str | None = None
    runs: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def fd_ceiling(margin: int) -> int:
    """The most streams one process can hold: its fd hard limit, less `margin`."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return 1 << 20
    return max(hard - margin, 1)


def loopback_hosts(count: int) -> list[str]:
    return [f"127.0.0.{index}" for index in range(1, count + 1)]


async def measure_idle(server: UvicornServer, count: int, sizes: Sizes) -> dict[str, float]:
    """Open ``count`` idle streams on a fresh server; RSS growth per stream."""
    hosts = loopback_hosts(sizes.source_hosts)
    warm = await open_many(HOST, server.port, "/idle", WARMUP_STREAMS, time_limit=STREAM_TIMEOUT)
    warm.close_all()
    if warm.errors:
        raise BenchError(f"warm-up streams failed: {warm.errors[0]}")
    await asyncio.sleep(sizes.settle_seconds)
    rss_before = server.rss()
    async with asyncio.timeout(OPEN_TIMEOUT):
        opened = await open_many(
            HOST,
            server.port,
            "/idle",
            count,
            concurrency=sizes.concurrency,
            time_limit=STREAM_TIMEOUT,
            local_hosts=hosts,
        )
    try:
        if opened.errors:
            raise BenchError(
                f"{len(opened.errors)} of {count} idle streams failed, e.g. {opened.errors[0]}"
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
        "rss_kb_per_stream": (rss_after - rss_before) / count / 1024,
        "open_seconds": opened.elapsed,
    }


def run_idle(
    keys: list[str], counts: list[int], sizes: Sizes, log_dir: Path
) -> dict[int, dict[str, IdleResult]]:
    env = harness.child_env()
    results: dict[int, dict[str, IdleResult]] = {}
    for count in counts:
        results[count] = {key: IdleResult(IDLE_BY_KEY[key].label) for key in keys}
        for run_index in range(sizes.runs):
            for key in harness.rotated(keys, run_index):
                spec = IDLE_BY_KEY[key]
                outcome = results[count][key]
                harness.say(f"idle, {count:,} streams, {spec.label}, run {run_index + 1}")
                try:
                    with UvicornServer(spec, env, log_dir) as server:
                        outcome.add(run(measure_idle(server, count, sizes)))
                except (BenchError, OSError, TimeoutError) as exc:
                    outcome.errors.append(f"run {run_index + 1}: {exc}")
                    harness.say(f"  failed: {exc}")
    return results


def run_fanout(sizes: Sizes, subscribers: int, log_dir: Path) -> dict[str, Any]:
    """``bench_fanout.py``'s memory case at ``subscribers``; its result document."""
    output = log_dir / "fanout.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve().parent / "bench_fanout.py"),
        "--runs",
        str(sizes.runs),
        "--cases",
        "memory",
        "--servers",
        ",".join(FANOUT_SERVERS),
        "--subscribers",
        str(subscribers),
        "--events",
        str(sizes.fanout_events),
        "--interval-ms",
        str(sizes.fanout_interval_ms),
        "--source-hosts",
        str(sizes.source_hosts),
        "--output",
        str(output),
    ]
    harness.say(f"fan-out, {subscribers:,} subscribers: {' '.join(command[1:])}")
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    document: dict[str, Any] = json.loads(output.read_text())
    return document


def fanout_medians(document: dict[str, Any], key: str) -> dict[str, float | None]:
    runs = document["cases"].get(key, {}).get("runs", {})
    medians: dict[str, float | None] = {}
    for name in (
        "server_cpu_us_per_delivery",
        "p50_ms_from_schedule",
        "p99_ms_from_schedule",
    ):
        values = runs.get(name) or []
        medians[name] = sorted(values)[len(values) // 2] if values else None
    return medians


def ratio(value: float | None, baseline: float | None) -> str:
    if value is None or not baseline:
        return "n/a"
    return f"{value / baseline:.2f}x"


def build_table(
    idle: dict[int, dict[str, IdleResult]],
    asked: dict[int, int],
    fanout: dict[str, Any] | None,
    subscribers: int,
    asked_subscribers: int,
) -> str:
    lines = [
        harness.table_row(["case", "count", "contender", "median", "ratio", "baseline"]),
        harness.table_row(["---", "---:", "---", "---:", "---:", "---"]),
    ]
    for count, results in idle.items():
        shown = f"{count:,}"
        if asked[count] != count:
            shown += f" (fd limit; {asked[count]:,} asked)"
        floor = results.get("floor")
        floor_kb = floor.median("rss_kb_per_stream") if floor else None
        floor_open = floor.median("open_seconds") if floor else None
        for key, outcome in results.items():
            kb = outcome.median("rss_kb_per_stream")
            lines.append(
                harness.table_row(
                    [
                        "RSS per idle stream, KB",
                        shown,
                        outcome.label,
                        harness.fmt(kb, 1),
                        "" if key == "floor" else ratio(kb, floor_kb),
                        "floor",
                    ]
                )
            )
        for key, outcome in results.items():
            seconds = outcome.median("open_seconds")
            lines.append(
                harness.table_row(
                    [
                        "(info) time to open them, s",
                        shown,
                        outcome.label,
                        harness.fmt(seconds, 2),
                        "" if key == "floor" else ratio(seconds, floor_open),
                        "floor",
                    ]
                )
            )
    if fanout is not None:
        shown = (
            f"{subscribers:,}"
            if subscribers == asked_subscribers
            else f"{subscribers:,} (fd limit; {asked_subscribers:,} asked)"
        )
        raw = fanout_medians(fanout, "raw")
        ours = fanout_medians(fanout, "sseviews")
        for name, title in (
            ("server_cpu_us_per_delivery", "server CPU per delivery, us"),
            ("p50_ms_from_schedule", "fan-out p50 from the scheduled time, ms"),
            ("p99_ms_from_schedule", "fan-out p99 from the scheduled time, ms"),
        ):
            for key, medians in (("raw ASGI", raw), ("sseviews", ours)):
                lines.append(
                    harness.table_row(
                        [
                            title,
                            shown,
                            key,
                            harness.fmt(medians[name], 2),
                            "" if key == "raw ASGI" else ratio(medians[name], raw[name]),
                            "raw",
                        ]
                    )
                )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="repetitions (default 3; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes and 1 run")
    parser.add_argument("--cases", help="comma-separated subset of: " + ",".join(CASES))
    parser.add_argument("--servers", help="idle contenders: " + ",".join(IDLE_BY_KEY))
    parser.add_argument("--counts", help="idle streams, comma-separated (default 1000,5000,20000)")
    parser.add_argument("--subscribers", type=int, help="fan-out subscribers (default 20000)")
    parser.add_argument("--source-hosts", type=int, help="client source addresses 127.0.0.1..N")
    parser.add_argument("--output", type=Path, help="JSON path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sizes = QUICK if args.quick else FULL
    if args.runs is not None:
        sizes = replace(sizes, runs=args.runs)
    if args.counts:
        sizes = replace(sizes, counts=tuple(int(part) for part in args.counts.split(",")))
    if args.subscribers is not None:
        sizes = replace(sizes, fanout_subscribers=args.subscribers)
    if args.source_hosts is not None:
        sizes = replace(sizes, source_hosts=args.source_hosts)
    cases = args.cases.split(",") if args.cases else list(CASES)
    unknown = [case for case in cases if case not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    keys = args.servers.split(",") if args.servers else list(IDLE_BY_KEY)
    unknown = [key for key in keys if key not in IDLE_BY_KEY]
    if unknown:
        raise SystemExit(f"unknown server(s) {unknown}; choose from {list(IDLE_BY_KEY)}")
    if "floor" not in keys:
        keys.insert(0, "floor")  # the baseline of every ratio

    raise_nofile_limit()
    ceiling = fd_ceiling(FD_MARGIN)
    asked = {min(count, ceiling): count for count in sizes.counts}
    subscribers = min(sizes.fanout_subscribers, fd_ceiling(FANOUT_FD_MARGIN))

    started = dt.datetime.now(dt.UTC)
    clock = time.perf_counter()
    load_before = os.getloadavg()
    idle: dict[int, dict[str, IdleResult]] = {}
    fanout: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as log_dir:
        if "idle" in cases:
            idle = run_idle(keys, list(asked), sizes, Path(log_dir))
            # Shown at once: the fan-out case that follows takes minutes.
            print(build_table(idle, asked, None, subscribers, sizes.fanout_subscribers), flush=True)
        if "fanout" in cases:
            try:
                fanout = run_fanout(sizes, subscribers, Path(log_dir))
            except (subprocess.CalledProcessError, OSError, ValueError) as exc:
                harness.say(f"the fan-out case failed: {exc}")
    table = build_table(idle, asked, fanout, subscribers, sizes.fanout_subscribers)
    environment = harness.environment_info(harness.package_versions, loadavg_at_end=True)
    print("\n" + table)
    load_after = environment["loadavg_at_end"]
    print(f"\nLoad average (1, 5, 15 min): {load_before} before, {load_after} after.")
    output = args.output or harness.default_output("scale", started)
    harness.write_json(
        output,
        "scale",
        started=started,
        seconds=time.perf_counter() - clock,
        argv=sys.argv,
        sizes=sizes,
        environment={**environment, "loadavg_at_start": load_before},
        table=table,
        sections={
            "idle": {
                str(count): {
                    key: {"runs": outcome.runs, "errors": outcome.errors}
                    for key, outcome in results.items()
                }
                for count, results in idle.items()
            },
            "fanout": None if fanout is None else fanout.get("cases"),
        },
    )
    print(f"JSON: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
