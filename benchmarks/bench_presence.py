"""Presence benchmark: idle group streams with presence against the same streams without.

Every server is a real uvicorn subprocess (uvloop + httptools, one worker) on
127.0.0.1 serving ``benchmarks/apps/presence_app.py``, driven by the raw-socket
client of ``benchmarks/loadclient.py`` in this process. For each live layer
(``memory://``, and ``redis://127.0.0.1:6379/0`` under a unique prefix) two
contenders run side by side in one run, each on a fresh server:

* **without** -- ``--streams`` (2000) streams of ``GET /room`` (``presence_info()``
  returns None: nothing is tracked);
* **with** -- the same streams as ``GET /room?user=u``: each is listed in the
  group's presence (one backend write at join, one at leave).

Figures per contender: the server's RSS growth per idle stream (after the
streams are open and a settle pause), the time to open them all (first connect
to last response head, ``--concurrency`` handshakes in flight), and, for
**with**, the time of ``presence("room", limit=streams)`` and of
``presence_count("room")`` measured inside the server with every stream listed.
Medians of ``--runs`` runs (contenders rotated), as a markdown table; every
per-run figure goes to ``benchmarks/results/presence-<timestamp>.json``.

Usage (from anywhere; paths are resolved from this file)::

    python benchmarks/bench_presence.py --runs 3       # full size: 2000 streams
    python benchmarks/bench_presence.py --quick        # smoke test: 100 streams, 1 run
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.dont_write_bytecode = True  # keep __pycache__ out of the work tree

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from benchmarks import harness  # noqa: E402
from benchmarks.harness import HOST, BenchError, ServerSpec, UvicornServer  # noqa: E402
from benchmarks.loadclient import open_many, run  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/0"
APP = "benchmarks.apps.presence_app:app"
SETTLE = 1.0  # seconds between the last stream opened and the RSS reading
OPEN_TIMEOUT = 120.0


@dataclass
class Result(harness.Outcome):
    label: str
    layer: str
    presence: bool
    skipped_reason: str | None = None
    runs: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=30) as response:
        return json.load(response)


def _delete_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def measure(result: Result, streams: int, concurrency: int, log_dir: Path) -> dict[str, float]:
    prefix = f"sseviews-bench-presence-{uuid.uuid4().hex}"
    env = harness.child_env(BENCH_BROADCAST=result.layer, BENCH_PREFIX=prefix)
    spec = ServerSpec("presence-" + ("with" if result.presence else "without"), result.label, APP)
    path = "/room?user=u" if result.presence else "/room"
    try:
        with UvicornServer(spec, env, log_dir) as server:
            time.sleep(SETTLE)
            base = server.rss()

            async def body() -> dict[str, float]:
                opened = await open_many(
                    HOST,
                    server.port,
                    path,
                    streams,
                    concurrency=concurrency,
                    time_limit=OPEN_TIMEOUT,
                )
                try:
                    if opened.errors or len(opened.streams) != streams:
                        raise BenchError(
                            f"{len(opened.errors)} streams failed: {opened.errors[:3]}"
                        )
                    await asyncio.sleep(SETTLE)
                    server.check_alive()
                    values = {
                        "rss_per_stream_kb": (server.rss() - base) / streams / 1024,
                        "open_seconds": opened.elapsed,
                    }
                    if result.presence:
                        timing = await asyncio.to_thread(
                            _get_json, server.port, f"/presence-time?limit={streams}"
                        )
                        if timing["entries"] != streams:
                            raise BenchError(f"presence listed {timing['entries']} of {streams}")
                        values["presence_ms"] = timing["list_seconds"] * 1000
                        values["presence_count_ms"] = timing["count_seconds"] * 1000
                    return values
                finally:
                    opened.close_all()

            return run(body())
    finally:
        if result.layer.startswith("redis"):
            _delete_prefix(prefix)


def main(argv: list[str] | None = None) -> int:
    parser = harness.new_parser(__doc__.splitlines()[0], "runs per contender (default 3)")
    parser.add_argument("--streams", type=int, help="streams per contender (default 2000)")
    parser.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    parser.add_argument("--layers", default="memory,redis", help="memory,redis")
    harness.add_output_argument(parser, "presence")
    args = parser.parse_args(argv)
    streams = args.streams or (100 if args.quick else 2000)
    runs = args.runs or (1 if args.quick else 3)
    harness.ensure_nofile(2 * streams + 100, f"{streams} streams")
    started = dt.datetime.now(dt.UTC)
    layers = {"memory": "memory://", "redis": REDIS_URL}
    results: list[Result] = []
    for name in args.layers.split(","):
        for presence in (False, True):
            label = f"{name}, {'with' if presence else 'without'} presence"
            results.append(Result(label, layers[name], presence))
    with tempfile.TemporaryDirectory(prefix="bench-presence-") as log_dir:
        for run_index in range(runs):
            for result in harness.rotated(results, run_index):
                harness.attempt(
                    result,
                    f"{streams} idle streams",
                    run_index,
                    runs,
                    lambda result=result: measure(result, streams, args.concurrency, Path(log_dir)),
                )

    def cell(result: Result, key: str, decimals: int) -> str:
        return harness.fmt(result.median(key), decimals)

    lines = [
        f"Command: `python benchmarks/bench_presence.py --runs {runs} --streams {streams}`. "
        f"Medians of {runs} run(s).",
        "",
        "| live layer | presence | server RSS per idle stream | time to open "
        f"{streams} streams | presence(group), {streams} members | presence_count(group) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for result in results:
        lines.append(
            f"| {result.layer} | {'with' if result.presence else 'without'} "
            f"| {cell(result, 'rss_per_stream_kb', 2)} KB | {cell(result, 'open_seconds', 2)} s "
            + (
                f"| {cell(result, 'presence_ms', 1)} ms "
                f"| {cell(result, 'presence_count_ms', 2)} ms |"
                if result.presence
                else "| - | - |"
            )
        )
    for name in args.layers.split(","):
        pair = [r for r in results if r.layer == layers[name]]
        without, with_ = pair
        a, b = without.median("rss_per_stream_kb"), with_.median("rss_per_stream_kb")
        if a is not None and b is not None:
            lines.append("")
            lines.append(f"{name}: presence adds {b - a:.2f} KB of server RSS per idle stream.")
    table = "\n".join(lines)
    print(table)
    output = args.output or harness.default_output("presence", started)
    output.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "presence",
        "started": started.isoformat(),
        "streams": streams,
        "runs": runs,
        "results": [
            {
                "label": r.label,
                "layer": r.layer,
                "presence": r.presence,
                "runs": r.runs,
                "medians": {key: statistics.median(v) for key, v in r.runs.items() if v},
                "errors": r.errors,
            }
            for r in results
        ],
        "table": table,
    }
    output.write_text(json.dumps(document, indent=2) + "\n")
    harness.say(f"wrote {output}")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
