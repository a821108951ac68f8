"""Lifecycle guarantees against a real uvicorn, in a subprocess, over loopback sockets.

The app under test is `tests/apps/lifecycle.py`. Its views append what happens to
them (connect, events() started, events()'s `finally`, on_disconnect(reason)) as
JSON lines to a file the test names, so the test sees what happened inside the
server, in worker and reloader children too, and after the server has exited.

The clients speak HTTP/1.1 over raw non-blocking sockets, so a test controls
socket options (SO_LINGER, SO_RCVBUF) and sees the chunked framing itself,
terminal 0-size chunk included.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import psutil
import pytest
from support import servers
from support.raw import RawConnection

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

REPO = Path(__file__).resolve().parent.parent
APP = "tests.apps.lifecycle:app"
RECORD_ENV = "SSEVIEWS_TEST_RECORD"
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 15.0
WAITING_HANG = "Waiting for connections to close"

T = TypeVar("T")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- the server process -----------------------------------------------------------


def _server_env(record: Path) -> dict[str, str]:
    env = servers.with_repo_on_path(dict(os.environ))
    env[RECORD_ENV] = str(record)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class ServerProcess(servers.ServerProcess):
    """A uvicorn running in its own process group, and what it recorded."""

    record: Path
    signalled_at: float | None = None
    exited_at: float | None = None
    children: list[psutil.Process] = field(default_factory=list)

    def records(self, tag: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in servers.read_records(self.record)
            if (tag is None or r.get("id") == tag) and (kind is None or r["kind"] == kind)
        ]

    def snapshot_children(self) -> None:
        with suppress(psutil.NoSuchProcess):
            self.children = psutil.Process(self.proc.pid).children(recursive=True)

    async def wait_for(self, tag: str, kind: str) -> dict[str, Any]:
        """The first `kind` record of stream `tag`, once it is written."""
        found = await wait_until(lambda: self.records(tag, kind))
        return found[0]

    def send_signal(self, signum: int) -> None:
        self.snapshot_children()
        self.signalled_at = time.monotonic()
        os.kill(self.proc.pid, signum)

    async def wait_exit(self) -> int:
        code = await super().wait_exit()
        self.exited_at = time.monotonic()
        return code

    @property
    def exit_seconds(self) -> float:
        assert self.signalled_at is not None and self.exited_at is not None
        return self.exited_at - self.signalled_at

    def alive_children(self) -> list[psutil.Process]:
        alive = []
        for child in self.children:
            with suppress(psutil.NoSuchProcess):
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
        return alive

    def kill(self) -> None:
        """Kill the whole process group, and any child that left it; reap the leader."""
        if self.proc.poll() is None:
            self.snapshot_children()
        super().kill()
        for child in self.children:
            with suppress(psutil.NoSuchProcess):
                child.kill()


async def wait_until(
    probe: Callable[[], T | None], *, interval: float = 0.02, accept_zero: bool = False
) -> T:
    """Poll `probe` until it returns something truthy (or 0 with `accept_zero`); return it.

    For state outside this process (a file, a process's exit), which no event can
    wake us for. Callers bound the wait with `anyio.fail_after`.
    """
    while True:
        value = probe()
        if value or (accept_zero and value is not None):
            return value
        await anyio.sleep(interval)


@contextmanager
def uvicorn_server(tmp: Path, *args: str) -> Iterator[ServerProcess]:
    """uvicorn serving the app with `args`, killed (the whole process group) afterwards."""
    record = tmp / "record.jsonl"
    started = servers.start_server(
        servers.uvicorn(APP, *args), tmp, _server_env(record), health="/stats", stdout=False
    )
    server = ServerProcess(**vars(started), record=record)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One plain uvicorn for the tests that do not stop it; each test uses its own ids."""
    with uvicorn_server(tmp_path_factory.mktemp("shared-server")) as server:
        yield server


# -- a raw HTTP/1.1 client --------------------------------------------------------


class SSEReader:
    """Splits a chunked `text/event-stream` body into messages."""

    def __init__(self, client: RawConnection) -> None:
        self.client = client
        self.pending = b""
        self.ended = False

    async def next_message(self) -> str | None:
        """The next message (its lines, without the blank line); None at the clean end."""
        while b"\n\n" not in self.pending:
            if self.ended:
                assert self.pending == b"", f"the body ends mid-message: {self.pending!r}"
                return None
            chunk = await self.client.read_chunk()
            if not chunk:
                self.ended = True
            self.pending += chunk
        message, _, self.pending = self.pending.partition(b"\n\n")
        return message.decode("utf-8")

    async def next_line(self) -> str:
        """The next line (a keep-alive comment is one line, with no blank line after it)."""
        while b"\n" not in self.pending:
            chunk = await self.client.read_chunk()
            assert chunk, f"the body ends mid-line: {self.pending!r}"
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode("utf-8")


def _fields(message: str | None) -> dict[str, str]:
    """The fields of one SSE message (each given once in these tests)."""
    assert message is not None, "the stream ended"
    return dict(line.split(": ", 1) for line in message.split("\n"))  # type: ignore[misc]


async def _task_count(server: ServerProcess) -> int:
    """How many asyncio tasks the (single-process) server runs, this request's included."""
    client = await RawConnection.connect(server.port)
    try:
        await client.send(
            f"GET /stats HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
        )
        head = await client.read_head()
        assert head.status == 200
        body = await client.read_exactly(int(head.headers["content-length"]))
    finally:
        client.close()
    return int(json.loads(body)["tasks"])


async def _settled_task_count(server: ServerProcess) -> int:
    """The task count once it holds still (a shutdown watcher outlives its last stream by 0.1 s)."""
    before = await _task_count(server)
    while True:
        await anyio.sleep(0.15)
        after = await _task_count(server)
        if after == before:
            return after
        before = after


async def _exit_code(server: ServerProcess, *, within: float) -> int:
    """The server's exit code; fails, with its log, if it is still running after `within`."""
    with anyio.move_on_after(within):
        return await server.wait_exit()
    raise AssertionError(f"still running {within} s after the signal:\n{server.log()}")


def _by_kind(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["kind"]: r for r in records}


def _assert_closed_before_disconnect(records: list[dict[str, Any]], reason: str) -> None:
    """events()'s finally ran, then on_disconnect(reason) ran, each exactly once."""
    kinds = [r["kind"] for r in records]
    assert kinds.count("finally") == 1, records
    assert kinds.count("disconnect") == 1, records
    assert kinds.index("finally") < kinds.index("disconnect"), records
    assert _by_kind(records)["disconnect"]["reason"] == reason, records


# -- client disconnect ------------------------------------------------------------


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_server_client_close_ends_idle_stream_within_1s(
    shared_server: ServerProcess, reset: bool
) -> None:
    server = shared_server
    tag = f"close-{'rst' if reset else 'fin'}"
    with anyio.fail_after(5):
        baseline = await _settled_task_count(server)
        client = await RawConnection.request(server.port, "GET", f"/idle?id={tag}")
        try:
            assert (await client.read_head()).status == 200
            await server.wait_for(tag, "events")
            assert await _task_count(server) > baseline
        finally:
            closed_at = time.time()
            client.close(reset=reset)

    with anyio.fail_after(2):
        disconnect = await server.wait_for(tag, "disconnect")
    records = server.records(tag)
    _assert_closed_before_disconnect(records, "client_closed")
    assert _by_kind(records)["finally"]["t"] - closed_at < 1.0
    assert disconnect["t"] - closed_at < 1.0

    # No task outlives the connection (the shutdown watcher included, after its next poll).
    with anyio.fail_after(2):
        assert await _settled_task_count(server) == baseline


# -- server shutdown --------------------------------------------------------------

SHUTDOWN_CASES = {
    "plain-sigterm": ((), signal.SIGTERM),
    "plain-sigint": ((), signal.SIGINT),
    "workers-sigterm": (("--workers", "2"), signal.SIGTERM),
    "reload-sigterm": (("--reload",), signal.SIGTERM),
    "reload-sigint": (("--reload",), signal.SIGINT),
}


def _expected_exit_codes(args: tuple[str, ...], signum: int) -> set[int]:
    if not args and signum == signal.SIGTERM:
        # A plain `uvicorn` (>= 0.29) re-raises the SIGTERM it caught once its graceful
        # shutdown is over, with the default handler, so the process ends by the signal:
        # that is uvicorn's own behaviour, with any app. "Finished server process" in the
        # log (asserted too) shows that the shutdown was graceful.
        return {0, -signal.SIGTERM}
    return {0}


@pytest.mark.parametrize(("args", "signum"), SHUTDOWN_CASES.values(), ids=SHUTDOWN_CASES.keys())
async def test_server_signal_ends_open_streams_and_exits_within_2s(
    tmp_path: Path, args: tuple[str, ...], signum: int
) -> None:
    extra = list(args)
    if "--reload" in extra:
        watched = tmp_path / "watched"
        watched.mkdir()
        extra += ["--reload-dir", str(watched)]
    workers = 2 if "--workers" in extra else 1
    with uvicorn_server(tmp_path, *extra) as server:
        clients: list[RawConnection] = []
        try:
            tags: list[str] = []
            with anyio.fail_after(20):
                # With --workers, open streams until every worker serves at least one.
                while (
                    len(tags) < 5
                    or len({r["pid"] for r in server.records(kind="events")}) < workers
                ):
                    assert len(tags) < 40, "the streams never reached every worker"
                    tag = f"s{len(tags)}"
                    client = await RawConnection.request(server.port, "GET", f"/idle?id={tag}")
                    clients.append(client)
                    tags.append(tag)
                    assert (await client.read_head()).status == 200
                    await server.wait_for(tag, "events")

            server.send_signal(signum)
            code = await _exit_code(server, within=5)
            stderr = server.log()
            assert server.exit_seconds < 2.0, stderr
            assert code in _expected_exit_codes(args, signum), stderr
            assert WAITING_HANG not in stderr
            assert stderr.count("Finished server process") == workers, stderr
            # The workers, or the server under the reloader, ended with their parent.
            with anyio.fail_after(2):
                await wait_until(lambda: not server.alive_children())

            for tag in tags:
                _assert_closed_before_disconnect(server.records(tag), "shutdown")
            with anyio.fail_after(2):
                for client in clients:
                    # Nothing but the terminal chunk, then the server closes the connection.
                    assert await client.read_to_end() == b""
                    assert await client.read_until_closed() == b""
        finally:
            for client in clients:
                client.close()


async def test_server_programmatic_servers_in_sequence_each_shut_down(tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    with anyio.fail_after(20):
        # The script starts no child process, so killing it on timeout is enough.
        done = await anyio.run_process(
            [sys.executable, "-m", "tests.apps.programmatic"],
            cwd=REPO,
            env=_server_env(record),
            check=False,
            start_new_session=True,
        )
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 0, stderr
    assert WAITING_HANG not in stderr
    rounds = json.loads(done.stdout.decode().splitlines()[-1])["rounds"]

    assert [r["mode"] for r in rounds] == ["should_exit", "sigterm", "should_exit"]
    for index, result in enumerate(rounds):
        assert "error" not in result, result
        # Each server streams normally: shutdown state is per server, not per process.
        assert result["status"] == 200, result
        assert result["events_before_shutdown"] >= 3, result
        assert result["clean_end"] is True, result
        assert result["eof_after_end"] is True, result
        assert result["serve_returned"] is True, result
        assert result["serve_error"] is None, result
        assert result["serve_seconds"] < 2.0, result
        assert result["leftover_tasks"] == [], result
        records = [r for r in servers.read_records(record) if r["id"] == f"round-{index}"]
        _assert_closed_before_disconnect(records, "shutdown")
    assert rounds[1]["signals_reraised"] == [signal.SIGTERM]


async def test_server_shutdown_grace_period_sends_farewell(tmp_path: Path) -> None:
    with uvicorn_server(tmp_path) as server:
        client = await RawConnection.request(server.port, "GET", "/farewell?id=f")
        try:
            with anyio.fail_after(3):
                assert (await client.read_head()).status == 200
                await server.wait_for("f", "events")

            server.send_signal(signal.SIGTERM)
            reader = SSEReader(client)
            with anyio.fail_after(3):
                farewell = await reader.next_message()
                end = await reader.next_message()
                assert _fields(farewell) == {"event": "farewell", "data": "goodbye"}
                assert end is None  # the terminal chunk, on an event boundary
                assert await client.read_until_closed() == b""

            code = await _exit_code(server, within=5)
            assert server.exit_seconds < 1.0 + 2.0
            assert code in _expected_exit_codes((), signal.SIGTERM)
            # (uvicorn may log "Waiting for connections to close" here: it does wait, for
            # as long as the view uses its grace period, which bounds the wait.)
            assert "Finished server process" in server.log()
        finally:
            client.close()
        records = server.records("f")
        assert [r["kind"] for r in records] == [
            "connect",
            "events",
            "farewell",
            "finally",
            "disconnect",
        ]
        assert records[-1]["reason"] == "shutdown"


# -- slow clients, pings, HEAD, 405 -----------------------------------------------


async def test_server_send_timeout_drops_client_that_stopped_reading(
    shared_server: ServerProcess,
) -> None:
    server = shared_server
    with anyio.fail_after(5):
        baseline = await _settled_task_count(server)
    connected_at = time.time()
    # A small receive buffer, and no reads at all, not even of the response head.
    stalled = await RawConnection.request(server.port, "GET", "/flood?id=stalled", rcvbuf=4096)
    try:
        with anyio.fail_after(5):
            disconnect = await server.wait_for("stalled", "disconnect")
        assert disconnect["t"] - connected_at < 1.0 + 2.0
        _assert_closed_before_disconnect(server.records("stalled"), "send_timeout")
    finally:
        stalled.close(reset=True)

    # The server is still healthy: a new client streams normally.
    client = await RawConnection.request(server.port, "GET", "/ticks?id=after-stall")
    try:
        with anyio.fail_after(3):
            assert (await client.read_head()).status == 200
            reader = SSEReader(client)
            messages = [await reader.next_message() for _ in range(3)]
        assert [_fields(m) for m in messages] == [
            {"event": "tick", "id": str(n), "data": f'{{"n":{n}}}'} for n in range(3)
        ]
    finally:
        client.close()
    with anyio.fail_after(5):
        await server.wait_for("after-stall", "disconnect")
        assert await _settled_task_count(server) == baseline


async def test_server_idle_stream_gets_pings(shared_server: ServerProcess) -> None:
    client = await RawConnection.request(shared_server.port, "GET", "/ping?id=ping")
    arrivals: list[float] = []
    try:
        with anyio.fail_after(3):
            assert (await client.read_head()).status == 200
            opened = time.monotonic()
            reader = SSEReader(client)
            for _ in range(4):
                assert await reader.next_line() == ": ping"
                arrivals.append(time.monotonic())
    finally:
        client.close()
    gaps = [b - a for a, b in zip([opened, *arrivals], arrivals, strict=False)]
    assert all(0.25 <= gap <= 0.6 for gap in gaps), gaps
    with anyio.fail_after(2):
        await shared_server.wait_for("ping", "disconnect")


async def test_server_head_returns_headers_without_starting_stream(
    shared_server: ServerProcess,
) -> None:
    server = shared_server
    client = await RawConnection.request(server.port, "HEAD", "/idle?id=head")
    try:
        with anyio.fail_after(3):
            head = await client.read_head()
            # No body follows: the next response on this keep-alive connection parses.
            await client.send(f"GET /stats HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            assert (await client.read_head()).status == 200
    finally:
        client.close()
    assert head.status == 200
    assert head.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert head.headers["cache-control"] == "no-store"
    assert head.headers["x-accel-buffering"] == "no"
    assert "transfer-encoding" not in head.headers
    # on_connect ran; events() and on_disconnect did not.
    records = server.records("head")
    assert [(r["kind"], r["method"]) for r in records] == [("connect", "HEAD")]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_server_other_methods_get_405(shared_server: ServerProcess, method: str) -> None:
    tag = f"405-{method}"
    client = await RawConnection.request(shared_server.port, method, f"/idle?id={tag}")
    try:
        with anyio.fail_after(3):
            head = await client.read_head()
            body = await client.read_exactly(int(head.headers["content-length"]))
    finally:
        client.close()
    assert head.status == 405
    assert head.headers["allow"] == "GET, HEAD"
    assert head.headers["content-type"] == "text/plain; charset=utf-8"
    assert body == b"Method Not Allowed"
    assert shared_server.records(tag) == []
