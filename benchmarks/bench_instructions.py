"""Instructions per fan-out delivery, in-process, counted by callgrind.

The fan-out apps of ``bench_fanout.py`` (``apps/fanout_*.py``), each in a
process of its own run under ``valgrind --tool=callgrind``, with no server, no
socket and no client: N subscribers are ASGI calls of the app's ``/events``
made by this script, whose ``send`` only keeps a reference to each body and
counts it, so what is counted is the app's code (the library, Starlette, asyncio
and uvloop), not a server's. Instruction counts do not depend on what else the
machine runs, so contenders measured at different times compare directly.

In each child: the app's lifespan starts; N subscribers open and register; W
warm-up events, then E measured events are published with the app's own
``publish_one(i)`` (what its ``/start`` task calls), each once every stream has
delivered the previous one. Callgrind dumps its counters whenever the child
calls libc's ``ctermid`` (``--dump-before=ctermid``), which it does, through
``os.ctermid()``, right before the first measured event and right after the last
delivery: the second dump is the measured window, and its total over E x N is
the figure. Every subscriber must have received every event, in order, one
``send`` each; anything else fails the contender.

The child runs on a uvloop loop, as the fan-out servers do, with
``PYTHONHASHSEED=0`` and Python's own allocator (pymalloc: callgrind, unlike
memcheck, does not need ``PYTHONMALLOC=malloc``, which adds about 4% to every
contender). Its garbage collector runs as usual; the passes in the window are
reported.

    python benchmarks/bench_instructions.py                     # raw, floor, sseviews
    python benchmarks/bench_instructions.py --servers raw,floor,sse-starlette,sseviews
    python benchmarks/bench_instructions.py --subscribers 500 --events 10 --runs 2
    python benchmarks/bench_instructions.py --no-valgrind --subscribers 50   # delivery check only
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.dont_write_bytecode = True  # keep __pycache__ out of the work tree

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from benchmarks import harness  # noqa: E402

BENCHMARK = "instructions"
MARKER = "ctermid"  # a libc function nothing else in the process calls
VALGRIND_FLAGS = (
    "--tool=callgrind",
    f"--dump-before={MARKER}",
    "--dump-instr=no",
    "--compress-strings=no",
    "--compress-pos=no",
)
CHILD_TIMEOUT = 900.0  # seconds per child under valgrind (the default size takes about 1 min)
PATH = "/events"


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    app_module: str  # its ``app`` is the ASGI app
    publisher_module: str  # its ``publish_one(i)`` publishes event i
    count: Callable[[Any], int]  # subscribers registered, from the publisher module


CONTENDERS = {
    contender.key: contender
    for contender in (
        Contender(
            "raw",
            "raw ASGI",
            "benchmarks.apps.fanout_raw",
            "benchmarks.apps.fanout_raw",
            lambda module: len(module.subscribers),
        ),
        Contender(
            "floor",
            "Starlette floor",
            "benchmarks.apps.fanout_floor",
            "benchmarks.apps.fanout_raw",
            lambda module: len(module.subscribers),
        ),
        Contender(
            "sse-starlette",
            "sse-starlette",
            "benchmarks.apps.fanout_sse_starlette",
            "benchmarks.apps.fanout_sse_starlette",
            lambda module: len(module.clients),
        ),
        Contender(
            "sseviews",
            "sseviews",
            "benchmarks.apps.fanout_sseviews",
            "benchmarks.apps.fanout_sseviews",
            lambda module: module.bc.subscriber_count,
        ),
    )
}
DEFAULT_SERVERS = ("raw", "floor", "sseviews")


@dataclass
class Sizes:
    subscribers: int = 2000
    warmup: int = 5
    events: int = 20
    runs: int = 1


# -- the in-process driver (the child) --------------------------------------------------


def marker() -> None:
    """Call libc's ``ctermid``: under ``--dump-before=ctermid``, callgrind dumps here.

    Through ``os.ctermid()``, a plain C call: a libc function called through
    ctypes is not seen as a function entry (libffi jumps into it), so it
    triggers nothing.
    """
    os.ctermid()


class _Deliveries:
    """What every subscriber's ``send`` reports to: the body count, and who waits for it."""

    __slots__ = ("delivered", "opened", "reached", "target")

    def __init__(self) -> None:
        self.opened = 0
        self.delivered = 0
        self.target = -1
        self.reached: asyncio.Future[None] | None = None


class _Subscriber:
    """One connection as the app sees it: ``receive`` and ``send``, and what was sent."""

    __slots__ = ("bodies", "deliveries", "gone", "requested", "status")

    def __init__(self, deliveries: _Deliveries, gone: asyncio.Event) -> None:
        self.deliveries = deliveries
        self.gone = gone
        self.requested = False
        self.status = 0
        self.bodies: list[bytes] = []

    async def receive(self) -> dict[str, Any]:
        if not self.requested:
            self.requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            body = message.get("body", b"")
            if body:
                self.bodies.append(body)
                deliveries = self.deliveries
                deliveries.delivered += 1
                if deliveries.delivered == deliveries.target:
                    assert deliveries.reached is not None
                    deliveries.reached.set_result(None)
        elif message["type"] == "http.response.start":
            self.status = message["status"]
            deliveries = self.deliveries
            deliveries.opened += 1
            if deliveries.opened == deliveries.target:
                assert deliveries.reached is not None
                deliveries.reached.set_result(None)


def _scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"accept", b"text/event-stream")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


@asynccontextmanager
async def _lifespan(app: Any) -> AsyncIterator[None]:
    """Run the app's ASGI lifespan, as a server does, around the block."""
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()
    stopping = asyncio.Event()
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        if not sent:
            sent.append("lifespan.startup")
            return {"type": "lifespan.startup"}
        await stopping.wait()
        return {"type": "lifespan.shutdown"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        if message["type"] == "lifespan.startup.complete":
            started.set_result(None)
        elif message["type"] == "lifespan.startup.failed":
            started.set_exception(harness.BenchError(f"startup failed: {message}"))

    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    task = loop.create_task(app(scope, receive, send))
    await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        task.result()  # the app's own error, if it raised
        raise harness.BenchError("the app's lifespan ended before its startup completed")
    started.result()
    try:
        yield
    finally:
        stopping.set()
        await task
        if "lifespan.shutdown.complete" not in sent:
            raise harness.BenchError("the app's lifespan did not complete its shutdown")


def _expect(deliveries: _Deliveries, target: int) -> asyncio.Future[None]:
    """A future done when a ``send`` counter reaches ``target`` (no timer: the caller bounds it)."""
    reached = deliveries.reached = asyncio.get_running_loop().create_future()
    deliveries.target = target
    return reached


_INDEX = re.compile(rb'"i":(\d+)')


def _check(subscribers: list[_Subscriber], opened_bodies: list[int], events: int) -> list[str]:
    """Every subscriber got events 0..events-1 in order, one body each: the problems."""
    problems: list[str] = []
    expected = list(range(events))
    for number, subscriber in enumerate(subscribers):
        if subscriber.status != 200:
            problems.append(f"subscriber {number}: status {subscriber.status}")
            continue
        after_open = subscriber.bodies[opened_bodies[number] :]
        indices = [int(found) for found in _INDEX.findall(b"".join(after_open))]
        if indices != expected:
            problems.append(f"subscriber {number}: events {indices[:10]}... not 0..{events - 1}")
        elif len(after_open) != events:
            problems.append(f"subscriber {number}: {len(after_open)} sends for {events} events")
        if len(problems) >= 5:
            problems.append("...")
            break
    return problems


async def drive(key: str, subscribers: int, warmup: int, events: int) -> dict[str, Any]:
    """Open, publish, check, close: one contender's whole in-process run.

    ``marker()`` is called right before the first measured event and right after
    its last delivery. Returns what the parent reports besides the counts;
    raises ``BenchError`` if an event was not delivered as it should.
    """
    contender = CONTENDERS[key]
    app = importlib.import_module(contender.app_module).app
    publisher = importlib.import_module(contender.publisher_module)
    loop = asyncio.get_running_loop()
    deliveries = _Deliveries()
    gone = asyncio.Event()
    opened = [_Subscriber(deliveries, gone) for _ in range(subscribers)]
    async with _lifespan(app):
        tasks = [loop.create_task(app(_scope(), s.receive, s.send)) for s in opened]
        try:
            await _expect(deliveries, subscribers)
            registered = contender.count(publisher)
            if registered != subscribers:
                raise harness.BenchError(f"{registered} of {subscribers} subscribers registered")
            opened_bodies = [len(s.bodies) for s in opened]
            total = deliveries.delivered
            gc_before: list[int] = []
            for index in range(warmup + events):
                if index == warmup:
                    gc_before = [stat["collections"] for stat in gc.get_stats()]
                    marker()
                total += subscribers
                delivered = _expect(deliveries, total)
                await publisher.publish_one(index)
                await delivered
            marker()
            gc_window = [
                stat["collections"] - before
                for stat, before in zip(gc.get_stats(), gc_before, strict=True)
            ]
            for _ in range(3):  # anything sent after the last delivery shows in the check
                await asyncio.sleep(0)
        finally:
            gone.set()
            await asyncio.gather(*tasks, return_exceptions=True)
    failed = [task.exception() for task in tasks if task.exception() is not None]
    problems = _check(opened, opened_bodies, warmup + events)
    if failed:
        problems.insert(0, f"{len(failed)} streams raised, first: {failed[0]!r}")
    if problems:
        raise harness.BenchError("; ".join(problems))
    return {
        "subscribers": subscribers,
        "warmup": warmup,
        "events": events,
        "deliveries_checked": subscribers * (warmup + events),
        "body_bytes_per_delivery": sum(len(b) for b in opened[0].bodies[opened_bodies[0] :])
        / (warmup + events),
        "gc_collections_in_window": gc_window,
        # The copy of sseviews measured (the repository's, not an installed one).
        "sseviews_module": sys.modules["sseviews"].__file__ if "sseviews" in sys.modules else None,
    }


def run_child(key: str, sizes: Sizes, timeout: float) -> dict[str, Any]:
    """``drive()`` on a fresh uvloop loop (the fan-out servers' loop), bounded by ``timeout``."""
    import uvloop

    async def bounded() -> dict[str, Any]:
        return await asyncio.wait_for(
            drive(key, sizes.subscribers, sizes.warmup, sizes.events), timeout
        )

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(bounded())


# -- callgrind output --------------------------------------------------------------------


def read_dump(path: Path) -> tuple[int, dict[str, int]]:
    """A callgrind dump's total instructions, and its self cost per object file.

    Reads the uncompressed format (``--compress-strings=no``): ``ob=`` names the
    object of the following functions, a cost line is ``<line> <Ir>``, and the
    cost line right after a ``calls=`` line is the call's inclusive cost, not
    the caller's own.
    """
    total: int | None = None
    objects: dict[str, int] = {}
    current = "?"
    after_calls = False
    with path.open() as lines:
        for line in lines:
            if line[:1].isdigit() or line[:1] in "+-*":
                if after_calls:
                    after_calls = False
                else:
                    objects[current] = objects.get(current, 0) + int(line.split()[-1])
            elif line.startswith("ob="):
                current = Path(line[3:].strip()).name
            elif line.startswith("calls="):
                after_calls = True
            elif line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
    if total is None:
        raise harness.BenchError(f"{path}: no totals line")
    return total, objects


def measure(key: str, sizes: Sizes, workdir: Path, run_index: int, valgrind: str) -> dict[str, Any]:
    """One child under callgrind: instructions per delivery, and the driver's report."""
    out = workdir / f"{key}-r{run_index}.callgrind"
    report = workdir / f"{key}-r{run_index}.json"
    command = [
        "nice",
        "-n",
        "10",
        valgrind,
        *VALGRIND_FLAGS,
        f"--callgrind-out-file={out}",
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        key,
        "--child-report",
        str(report),
        "--subscribers",
        str(sizes.subscribers),
        "--warmup",
        str(sizes.warmup),
        "--events",
        str(sizes.events),
    ]
    env = harness.child_env(
        PYTHONHASHSEED="0",
        PYTHONPATH=os.pathsep.join(filter(None, [_REPO, os.environ.get("PYTHONPATH")])),
    )
    started = time.monotonic()
    try:
        proc = subprocess.run(
            command, cwd=_REPO, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        raise harness.BenchError(f"the child ran over {CHILD_TIMEOUT:.0f} s") from exc
    seconds = time.monotonic() - started
    if proc.returncode != 0 or not report.exists():
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise harness.BenchError(f"the child failed (exit {proc.returncode}):\n{tail}")
    driven = json.loads(report.read_text())
    # Part 1: start-up, opening, warm-up; part 2: the measured window; part 3: teardown.
    window = Path(f"{out}.2")
    if not window.exists() or not Path(f"{out}.1").exists():
        raise harness.BenchError(f"callgrind wrote no dump at {MARKER}(): is {MARKER} in libc?")
    total, objects = read_dump(window)
    deliveries = sizes.events * sizes.subscribers
    return {
        "instructions": total,
        "instructions_per_delivery": total / deliveries,
        "objects_per_delivery": {
            name: cost / deliveries
            for name, cost in sorted(objects.items(), key=lambda item: -item[1])
        },
        "seconds_under_valgrind": round(seconds, 1),
        **driven,
    }


# -- the parent: runs, table, JSON --------------------------------------------------------


@dataclass
class Result(harness.Outcome):
    label: str
    skipped_reason: str | None = None
    runs: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)


# The columns of harness.table_header(), in order.
COLUMNS = ("raw", "floor", "sse-starlette", "sseviews")
RATIOS = (
    ("sseviews", "raw"),
    ("sseviews", "floor"),
    ("floor", "raw"),
    ("sse-starlette", "raw"),
    ("sseviews", "sse-starlette"),
)


def ratios(results: dict[str, Result]) -> dict[str, float]:
    """The medians' ratios of the contenders measured (``"sseviews/raw"``: 1.37)."""
    medians = {key: result.median("ipd") for key, result in results.items()}
    found: dict[str, float] = {}
    for top, bottom in RATIOS:
        a, b = medians.get(top), medians.get(bottom)
        if a is not None and b:
            found[f"{top}/{bottom}"] = a / b
    return found


def build_report(results: dict[str, Result], sizes: Sizes) -> tuple[str, dict[str, Any]]:
    """The row in the other benchmarks' columns (``report.py --instructions`` takes it)."""
    label = (
        f"(info) fan-out, instructions per delivery (callgrind, in-process), "
        f"{sizes.subscribers:,} subscribers"
    )
    medians = {key: result.median("ipd") for key, result in results.items()}
    found = ratios(results)
    cells = [
        label,
        *("-" if key not in results else harness.fmt(medians[key], 0) for key in COLUMNS),
        harness.fmt_ratio(found.get("sseviews/raw"), "raw") if "sseviews/raw" in found else "",
        "",
        "",
    ]
    lines = [*harness.table_header(), harness.table_row(cells)]
    row = {
        "cells": cells,
        "info": True,
        "metric": "instructions_per_delivery",
        "medians": medians,
        "ratio": found.get("sseviews/raw"),
        "ratio_of": ["sseviews", "raw", "instructions_per_delivery"],
        "floor_over_raw": found.get("floor/raw"),
        "target": None,
        "target_met": None,
    }
    return "\n".join(lines), {label: row}


def detail_table(results: dict[str, Result]) -> str:
    """Per contender: the count, its spread over the runs, GC passes, bytes, run time."""
    lines = [
        "| contender | instructions per delivery | spread over runs | GC passes in window "
        "(gen 0/1/2) | body bytes per delivery | seconds under valgrind |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for result in results.values():
        values = result.runs.get("ipd")
        if not values:
            lines.append(harness.table_row([result.label, "n/a", "", "", "", ""]))
            continue
        spread = (max(values) - min(values)) / min(values) if len(values) > 1 else None
        detail = result.details[-1]
        lines.append(
            harness.table_row(
                [
                    result.label,
                    harness.fmt(result.median("ipd"), 0),
                    "-" if spread is None else f"{spread:.3%}",
                    "/".join(map(str, detail["gc_collections_in_window"])),
                    harness.fmt(detail["body_bytes_per_delivery"], 1),
                    harness.fmt(result.median("seconds"), 0),
                ]
            )
        )
    return "\n".join(lines)


def objects_table(results: dict[str, Result], top: int = 6) -> str:
    """Self instructions per delivery by object file (libpython, uvloop, _asyncio, libc)."""
    measured = [result for result in results.values() if result.details]
    largest: dict[str, float] = {}
    for result in measured:
        for name, cost in result.details[-1]["objects_per_delivery"].items():
            largest[name] = max(largest.get(name, 0.0), cost)
    names = sorted(largest, key=lambda name: -largest[name])[:top]
    lines = [
        harness.table_row(["object file (self cost)", *(result.label for result in measured)]),
        "|---|" + "---:|" * len(measured),
    ]
    for name in names:
        costs = [result.details[-1]["objects_per_delivery"].get(name, 0.0) for result in measured]
        lines.append(harness.table_row([name, *(harness.fmt(cost, 0) for cost in costs)]))
    return "\n".join(lines)


def check_delivery(keys: list[str], sizes: Sizes) -> int:
    """``--no-valgrind``: the driver alone, in this process, for each contender."""
    for key in keys:
        started = time.perf_counter()
        report = run_child(key, sizes, CHILD_TIMEOUT)
        print(
            f"{CONTENDERS[key].label}: {report['deliveries_checked']:,} deliveries checked "
            f"in {time.perf_counter() - started:.1f} s"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help="comma-separated, from: " + ",".join(CONTENDERS),
    )
    parser.add_argument("--subscribers", type=int, default=Sizes.subscribers)
    parser.add_argument("--warmup", type=int, default=Sizes.warmup, help="events not counted")
    parser.add_argument("--events", type=int, default=Sizes.events, help="events counted")
    parser.add_argument("--runs", type=int, default=Sizes.runs, help="children per contender")
    parser.add_argument(
        "--no-valgrind",
        action="store_true",
        help="run the in-process driver in this process, without counting: checks delivery",
    )
    parser.add_argument(
        "--keep-dumps",
        type=Path,
        metavar="DIR",
        help="write callgrind's dumps to DIR and keep them (<key>-r<run>.callgrind.2 is the "
        "measured window, for callgrind_annotate)",
    )
    harness.add_output_argument(parser, BENCHMARK)
    parser.add_argument("--child", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--child-report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = Sizes(args.subscribers, args.warmup, args.events, args.runs)
    if min(sizes.subscribers, sizes.events, sizes.runs) < 1 or sizes.warmup < 0:
        parser.error("--subscribers, --events and --runs must be >= 1, --warmup >= 0")
    if args.child:
        report = run_child(args.child, sizes, CHILD_TIMEOUT)
        args.child_report.write_text(json.dumps(report))
        return 0
    keys = args.servers.split(",")
    unknown = [key for key in keys if key not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose from {list(CONTENDERS)}")
    if args.no_valgrind:
        return check_delivery(keys, sizes)
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    started_at = dt.datetime.now()
    started = time.monotonic()
    output = args.output or harness.default_output(BENCHMARK, started_at)
    results = {key: Result(CONTENDERS[key].label) for key in keys}
    with ExitStack() as stack:
        if args.keep_dumps is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-instr-")))
        else:
            workdir = args.keep_dumps.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        for run_index in range(sizes.runs):
            for key in harness.rotated(keys, run_index):

                def body(key: str = key, run_index: int = run_index) -> dict[str, float]:
                    detail = measure(key, sizes, workdir, run_index, valgrind)
                    results[key].details.append(detail)
                    return {
                        "ipd": detail["instructions_per_delivery"],
                        "seconds": detail["seconds_under_valgrind"],
                    }

                harness.attempt(results[key], "callgrind", run_index, sizes.runs, body)
    table, rows = build_report(results, sizes)
    found = ratios(results)
    valgrind_version = subprocess.run(
        [valgrind, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    harness.write_json(
        output,
        BENCHMARK,
        started=started_at,
        seconds=time.monotonic() - started,
        argv=sys.argv,
        sizes=sizes,
        environment={
            **harness.environment_info(harness.package_versions),
            "valgrind": valgrind_version,
            "valgrind_flags": list(VALGRIND_FLAGS),
            "pythonmalloc": os.environ.get("PYTHONMALLOC", "default (pymalloc)"),
            "pythonhashseed": "0",
        },
        table=table,
        sections={
            "rows": rows,
            "ratios": found,
            "contenders": {key: asdict(result) for key, result in results.items()},
        },
    )
    notes = [
        "Ratios: " + ", ".join(f"{name} {value:.2f}x" for name, value in found.items()),
        f"Per contender:\n\n{detail_table(results)}",
        f"Self instructions per delivery, by object file:\n\n{objects_table(results)}",
    ]
    return harness.print_report(
        f"Instructions per fan-out delivery (callgrind, in-process; {sizes.subscribers:,} "
        f"subscribers, {sizes.events} events counted after {sizes.warmup})",
        sizes.runs,
        False,
        table,
        results.values(),
        output,
        notes,
    )


if __name__ == "__main__":
    sys.exit(main())
