"""Shared machinery of the benchmark scripts (``bench_core.py``, ``bench_fanout.py``).

* :class:`UvicornServer` -- one uvicorn subprocess (uvloop + httptools, one
  worker) on a free 127.0.0.1 port, with its RSS and CPU time;
* :func:`start_all` -- several servers started side by side;
* :func:`child_env`, :func:`probe` -- the servers' environment, and a check
  that something imports in a child like them;
* :class:`Outcome`, :func:`attempt`, :func:`mark_skipped`, :func:`rotated` --
  per-contender results (runs, medians, errors) and the run loop's pieces;
* :func:`table_header`, :func:`fmt`, :func:`fmt_ratio`, :func:`fmt_target`,
  :func:`table_row`, :func:`met_cell` -- the markdown table, with the same columns in both
  benchmarks so that their rows can be pasted into one table;
* :func:`write_json`, :func:`environment_info`, :func:`package_versions`,
  :func:`print_report` -- the JSON document and the printed summary;
* :func:`new_parser`, :func:`add_output_argument`, :func:`ensure_nofile` --
  the command line's common options and the file descriptor limit.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime as dt
import importlib.metadata
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psutil

from benchmarks.loadclient import ProtocolError, raise_nofile_limit

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 5.0

# The packages whose versions every result file records.
SERVER_PACKAGES = (
    "uvicorn",
    "starlette",
    "sse-starlette",
    "uvloop",
    "httptools",
    "anyio",
    "psutil",
    "sseviews",
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
D = TypeVar("D", bound="DataclassInstance")


class BenchError(Exception):
    """A measurement could not be taken or its result is wrong."""


# -- server subprocess ----------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    key: str
    label: str
    app: str  # "module:attribute" for uvicorn

    @property
    def module(self) -> str:
        return self.app.partition(":")[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _raise_nofile_in_child() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _process_cpu_clock(pid: int) -> int | None:
    """The POSIX CPU-time clock of another process (ns resolution), if any."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        clock_getcpuclockid = ctypes.CDLL(library).clock_getcpuclockid
    except (OSError, AttributeError):
        return None
    clock_id = ctypes.c_int()
    if clock_getcpuclockid(pid, ctypes.byref(clock_id)) != 0:
        return None
    try:
        time.clock_gettime(clock_id.value)
    except OSError:
        return None
    return clock_id.value


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a server child, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


class UvicornServer:
    """One uvicorn process serving ``spec.app`` on a free loopback port."""

    def __init__(self, spec: ServerSpec, env: dict[str, str], log_dir: Path) -> None:
        self.spec = spec
        self.env = env
        self.log_path = log_dir / f"{spec.key}-{time.monotonic_ns()}.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._ps: psutil.Process | None = None
        self._cpu_clock: int | None = None

    def __enter__(self) -> UvicornServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        for _ in range(3):  # retry if another process grabbed the free port
            self.port = _free_port()
            command = [
                sys.executable,
                "-m",
                "uvicorn",
                self.spec.app,
                "--host",
                HOST,
                "--port",
                str(self.port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
                "--backlog",
                "4096",
            ]
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    command,
                    cwd=REPO_ROOT,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_raise_nofile_in_child,
                )
            self._ps = psutil.Process(self.process.pid)
            self._cpu_clock = _process_cpu_clock(self.process.pid)
            if self._wait_ready():
                return
            self.stop()
            if "address already in use" not in self.log_tail().lower():
                break
        raise BenchError(f"{self.spec.label} server did not start:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def rss(self) -> int:
        assert self._ps is not None
        return int(self._ps.memory_info().rss)

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all threads) the server has used so far."""
        if self._cpu_clock is not None:
            return time.clock_gettime(self._cpu_clock)
        assert self._ps is not None
        times = self._ps.cpu_times()  # clock-tick (10 ms) resolution
        return float(times.user + times.system)

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise BenchError(f"{self.spec.label} server exited:\n{self.log_tail()}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(SERVER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(SERVER_STOP_TIMEOUT)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def start_all(stack: ExitStack, servers: Sequence[UvicornServer]) -> None:
    """Start ``servers`` side by side (their start-ups overlap); ``stack`` stops them all."""
    for server in servers:
        stack.callback(server.stop)
    with ThreadPoolExecutor(max(len(servers), 1)) as pool:
        for future in [pool.submit(server.start) for server in servers]:
            future.result()


def probe(
    code: str,
    env: dict[str, str],
    *,
    timed_out: str | None = None,
    failed: str | None = None,
) -> str | None:
    """None if ``python -c code`` succeeds in a child like the servers, else why not.

    ``timed_out`` and ``failed`` (the reason when the child printed nothing)
    default to ``"<code!r> timed out"`` and ``"<code!r> failed"``.
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return timed_out or f"{code!r} timed out"
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else failed or f"{code!r} failed"


# -- results and the run loop ---------------------------------------------------------


class Outcome:
    """Mixin of the per-contender result dataclasses: per-run figures and errors.

    Not a dataclass itself, so the subclass alone decides its fields (and
    their order in the JSON document).
    """

    label: str
    skipped_reason: str | None
    runs: dict[str, list[float]]
    errors: list[str]

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.runs.setdefault(key, []).append(value)

    def median(self, key: str) -> float | None:
        values = self.runs.get(key)
        return statistics.median(values) if values else None


def say(message: str) -> None:
    """Progress, on stderr (the table goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def mark_skipped(outcome: Outcome, reason: str | None, explicit: bool) -> bool:
    """Record ``reason`` (if any) as why ``outcome`` is skipped; True if it is.

    A contender asked for explicitly (``explicit``) that is unavailable ends
    the program instead.
    """
    if reason is None:
        return False
    outcome.skipped_reason = reason
    if explicit:
        raise SystemExit(f"{outcome.label} requested but unavailable: {reason}")
    say(f"skipping {outcome.label}: {reason}")
    return True


def rotated(items: Sequence[T], run_index: int) -> list[T]:
    """``items`` rotated by ``run_index``: spreads drift fairly over the contenders."""
    shift = run_index % max(len(items), 1)
    return [*items[shift:], *items[:shift]]


def attempt(
    outcome: Outcome,
    what: str,
    run_index: int,
    runs: int,
    body: Callable[[], dict[str, float]],
    *,
    error_prefix: str | None = None,
) -> None:
    """Take one run's figures with ``body()`` into ``outcome``, or record why not.

    An error message starts with ``error_prefix`` (default ``"run <n>"``).
    """
    say(f"run {run_index + 1}/{runs} {outcome.label}: {what}")
    try:
        values = body()
    except (BenchError, ProtocolError, OSError, TimeoutError) as exc:
        prefix = f"run {run_index + 1}" if error_prefix is None else error_prefix
        message = f"{prefix}: {type(exc).__name__}: {exc}"
        say(f"  FAILED: {message}")
        outcome.errors.append(message)
        return
    say("  " + ", ".join(f"{key}={value:,.3f}" for key, value in values.items()))
    outcome.add(values)


# -- reporting ------------------------------------------------------------------------


def sse_starlette_label() -> str:
    """``"sse-starlette <major>.<minor>"`` of the installed version (the column title)."""
    version = package_versions(("sse-starlette",))["sse-starlette"]
    if version is None:
        return "sse-starlette"
    return "sse-starlette " + ".".join(version.split(".")[:2])


def table_header() -> list[str]:
    """The header and alignment lines shared by every benchmark table.

    One column per contender (a contender a case does not apply to shows
    ``-``), then sseviews' ratio to the case's baseline (named in the cell),
    the target and whether it was met.
    """
    contenders = ["raw ASGI", "Starlette floor", sse_starlette_label(), "sseviews"]
    header = ["case", *contenders, "sseviews ratio", "target", "met"]
    align = ["---", *["---:"] * (len(contenders) + 1), "---", "---"]
    return [table_row(header), "|" + "|".join(align) + "|"]


def fmt_target(ratio: float, higher_is_better: bool, baseline: str) -> str:
    """``"<= 1.0x floor"``, ``">= 5.0x sse-starlette"``, ``"<= 0.75x raw"``."""
    number = f"{ratio:g}"
    if "." not in number:
        number += ".0"
    return f"{'>=' if higher_is_better else '<='} {number}x {baseline}"


def fmt(value: float | None, decimals: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{decimals}f}"


def fmt_ratio(ratio: float | None, baseline: str = "") -> str:
    """``"0.93x floor"``; ``"n/a"`` without a ratio."""
    if ratio is None:
        return "n/a"
    return f"{ratio:.2f}x {baseline}".rstrip()


def meets(ratio: float, target: float, higher_is_better: bool) -> bool:
    return ratio >= target if higher_is_better else ratio <= target


def met_cell(has_target: bool, met: bool | None) -> str:
    """The "met" column: empty without a target, else n/a, yes or NO."""
    if not has_target:
        return ""
    return "n/a" if met is None else "yes" if met else "NO"


def table_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def package_versions(names: Iterable[str] = SERVER_PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment_info(
    versions: Callable[[], dict[str, str | None]], *, loadavg_at_end: bool = False
) -> dict[str, Any]:
    """The ``environment`` of a result document."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    if loadavg_at_end:
        env["loadavg_at_end"] = os.getloadavg()
    env["versions"] = versions()
    env["sse_starlette_ping"] = os.environ.get("SSE_STARLETTE_PING", "0")
    return env


def timestamp(started: dt.datetime) -> str:
    return started.strftime("%Y%m%dT%H%M%S")


def default_output(benchmark: str, started: dt.datetime) -> Path:
    return RESULTS_DIR / f"{benchmark}-{timestamp(started)}.json"


def write_json(
    path: Path,
    benchmark: str,
    *,
    started: dt.datetime,
    seconds: float,
    argv: Sequence[str],
    sizes: Any,
    environment: dict[str, Any],
    table: str,
    sections: Mapping[str, Any],
) -> None:
    """Write the result document; ``sections`` follow the table, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": benchmark,
        "started": started.isoformat(timespec="seconds"),
        "duration_seconds": round(seconds, 1),
        "argv": list(argv),
        "sizes": asdict(sizes),
        "environment": environment,
        "table_markdown": table,
        **sections,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def print_report(
    title: str,
    runs: int,
    quick: bool,
    table: str,
    outcomes: Iterable[Outcome],
    output: Path,
    notes: Sequence[str] = (),
) -> int:
    """Print the table, skips, errors and ``notes``; the exit status (1 on errors)."""
    outcomes = list(outcomes)
    runs_note = f"median of {runs} run(s)" + (" [--quick]" if quick else "")
    print(f"\n## {title} ({runs_note})\n")
    print(table)
    for outcome in outcomes:
        if outcome.skipped_reason:
            print(f"\n{outcome.label}: skipped ({outcome.skipped_reason})")
        for error in outcome.errors:
            print(f"\n{outcome.label}: {error}")
    for note in notes:
        print(f"\n{note}")
    print(f"\nJSON: {output}")
    return 1 if any(outcome.errors for outcome in outcomes) else 0


# -- command line ---------------------------------------------------------------------


def new_parser(description: str, runs_help: str) -> argparse.ArgumentParser:
    """A parser with the common ``--runs`` and ``--quick`` options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, help=runs_help)
    parser.add_argument("--quick", action="store_true", help="small sizes and 1 run: a smoke test")
    return parser


def add_output_argument(parser: argparse.ArgumentParser, benchmark: str) -> None:
    parser.add_argument(
        "--output",
        type=Path,
        help=f"JSON path (default benchmarks/results/{benchmark}-<timestamp>.json)",
    )


def sizes_from_args(args: argparse.Namespace, full: D, quick: D, names: Iterable[str]) -> D:
    """``quick`` (with ``--quick``) or ``full``, with the options in ``names`` applied."""
    base = quick if args.quick else full
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return replace(base, **overrides)


def ensure_nofile(needed: int, what: str) -> None:
    """Raise RLIMIT_NOFILE; exit if it is still below ``needed`` (for ``what``)."""
    nofile = raise_nofile_limit()
    if nofile < needed:
        raise SystemExit(f"RLIMIT_NOFILE is {nofile}: too low for {what}")
