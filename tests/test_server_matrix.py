"""The ASGI server matrix: the lifecycle guarantees under every supported server.

Each server runs `tests/apps/matrix_app.py` in a subprocess on 127.0.0.1, started
with exactly the command that docs/deployment.md ("Servers") gives for it, and the
test talks HTTP/1.1 to it over raw non-blocking sockets. The app appends what
happens to each stream (connect, events() started, a farewell, on_disconnect(reason))
as JSON lines to a file the test names, so the test sees it whichever worker served
the stream, and after the server has exited.

For every server:

1. the response head arrives at once (the view's ping_interval is the default
   15 s, so nothing but the head can be read), and keep-alive pings flow;
2. a client that closes (FIN) or resets (RST) an idle stream is noticed within 1 s:
   `on_disconnect(CLIENT_CLOSED)`;
3. SIGTERM to the server with 50 open streams gives `on_disconnect(SHUTDOWN)` for
   every stream, each ends cleanly (terminal chunk; the 5 with a grace period send
   their farewell first), and the server process exits within 2 s of the signal;
4. a client that never reads (small SO_RCVBUF, no recv) of a view that writes
   6.5 MB/s is dropped with `SEND_TIMEOUT` (`send_timeout = 1`). daphne has no
   backpressure: its `send()` never blocks, so there the test asserts what happens
   instead: the stream goes on, and the server's memory grows by what it buffers,
   until the client goes away.

And SIGTERM without the recipe, where the docs say what happens then: hypercorn with
its default worker process, and granian and daphne with the plain app.

Run with `-s` to see the figures each test measured (docs/deployment.md quotes them).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from support import servers
from support.processes import clean_env
from support.raw import RawConnection

from sseviews._compression import Decoder
from sseviews.testing import EventParser

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
RECORD_ENV = "SSEVIEWS_MATRIX_RECORD"
STARTUP_TIMEOUT = 20.0
#: FloodView's settings in the app.
SEND_TIMEOUT = 1.0
FLOOD_RATE = 64 * 1024 / 0.01  # bytes per second
#: How long the daphne case lets a client not read.
NO_READ_SECONDS = 3.0
#: Open streams in the SIGTERM case, and how many of them say goodbye in a grace period.
STREAMS = 50
FAREWELLS = 5


# -- the servers --------------------------------------------------------------------

PLAIN = "tests.apps.matrix_app:app"
SERVED = "tests.apps.matrix_app:served"  # ShutdownMiddleware(app, handle_signals=True)


@dataclass(frozen=True)
class ServerSpec:
    """One row of the matrix: how to start the server, and what it is known to do."""

    argv: Callable[[int], list[str]]
    #: Exit codes after SIGTERM. A plain uvicorn re-raises the signal it caught once its
    #: graceful shutdown is over, so its process ends by SIGTERM after a clean shutdown.
    exit_codes: frozenset[int] = frozenset({0})
    #: Whether a blocked `send()` blocks the app (False: the server buffers without bound).
    backpressure: bool = True


def _python(*args: str) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", *(a.format(host=HOST, port=port) for a in args)]

    return argv


SERVERS: dict[str, ServerSpec] = {
    "uvicorn-httptools": ServerSpec(
        _python("uvicorn", PLAIN, "--host", "{host}", "--port", "{port}", "--http", "httptools"),
        exit_codes=frozenset({0, -signal.SIGTERM}),
    ),
    "uvicorn-h11": ServerSpec(
        _python("uvicorn", PLAIN, "--host", "{host}", "--port", "{port}", "--http", "h11"),
        exit_codes=frozenset({0, -signal.SIGTERM}),
    ),
    "gunicorn-uvicorn-worker": ServerSpec(
        _python(
            "gunicorn",
            PLAIN,
            "--worker-class",
            "uvicorn_worker.UvicornWorker",
            "--bind",
            "{host}:{port}",
        ),
    ),
    "hypercorn": ServerSpec(
        _python("hypercorn", SERVED, "--bind", "{host}:{port}", "--workers", "0"),
    ),
    "granian": ServerSpec(
        _python("granian", "--interface", "asgi", "--host", "{host}", "--port", "{port}", SERVED),
    ),
    "daphne": ServerSpec(
        _python("daphne", "--bind", "{host}", "--port", "{port}", SERVED),
        backpressure=False,
    ),
}


@dataclass
class Server(servers.ServerProcess):
    """One server process (in its own process group), and what its app recorded."""

    record_path: Path

    def records(self, tag: str, kind: str | None = None) -> list[dict[str, Any]]:
        found = servers.read_records(self.record_path)
        return [r for r in found if r["id"] == tag and (kind is None or r["kind"] == kind)]

    async def wait_for(self, tag: str, kind: str, count: int = 1) -> list[dict[str, Any]]:
        """The `kind` records of `tag`, once there are `count`; callers bound the wait."""
        while len(found := self.records(tag, kind)) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()}")
            await anyio.sleep(0.02)
        return found

    def serving_pid(self, tag: str) -> int:
        """The pid of the process that runs stream `tag` (a worker, for some servers)."""
        return int(self.records(tag, "events")[0]["pid"])


def start_server(name: str, tmp: Path, *, argv: Callable[[int], list[str]] | None = None) -> Server:
    """Start server `name` (or `argv`) on a free port and wait until it serves."""
    record_path = tmp / f"{name}.jsonl"
    env = servers.with_repo_on_path(clean_env(**{RECORD_ENV: str(record_path)}))
    command = SERVERS[name].argv if argv is None else argv
    started = servers.start_server(command, tmp, env, name=name, seconds=STARTUP_TIMEOUT)
    return Server(**vars(started), record_path=record_path)


@pytest.fixture(scope="module", params=list(SERVERS))
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One server per row, shared by the tests that do not stop it; each uses its own ids."""
    name: str = request.param
    started = start_server(name, tmp_path_factory.mktemp(name))
    try:
        yield started
    finally:
        started.kill()


def report(server: Server, case: str, **figures: Any) -> None:
    """Print one line of measured figures (shown with -s)."""
    shown = ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )
    print(f"\n[matrix] {server.name} {case}: {shown}")


# -- a raw HTTP/1.1 client ------------------------------------------------------------


async def read_rest(client: RawConnection) -> tuple[bytes, bool]:
    """Read the response to its end: (the body, whether it ended with its terminal chunk)."""
    body = b""
    try:
        await client.read_head()
        while chunk := await client.read_chunk():
            body += chunk
    except (EOFError, ConnectionResetError):
        return body, False
    return body, True


# -- 1. the head at once, and pings ---------------------------------------------------


async def test_matrix_head_arrives_at_once(server: Server) -> None:
    tag = "head"
    started = time.monotonic()
    client = await RawConnection.request(server.port, "GET", f"/idle?id={tag}")
    try:
        with anyio.fail_after(5):
            head = await client.read_head()
        elapsed = time.monotonic() - started
    finally:
        client.close()
    report(server, "head", seconds=elapsed)
    assert head.status == 200
    assert head.headers["content-type"].startswith("text/event-stream")
    # With ping_interval = 15 nothing but the head itself can have made it arrive.
    assert elapsed < 0.5


async def test_matrix_pings_arrive(server: Server) -> None:
    started = time.monotonic()
    client = await RawConnection.request(server.port, "GET", "/ping?id=ping")
    try:
        with anyio.fail_after(5):
            assert (await client.read_head()).status == 200
            body = b""
            while body.count(b": ping\n") < 3:
                body += await client.read_chunk()
        elapsed = time.monotonic() - started
    finally:
        client.close()
    report(server, "pings", seconds_for_3=elapsed)
    assert body == b": ping\n" * 3  # nothing else, each ping whole (one comment line)
    assert 0.5 < elapsed < 1.5  # ping_interval = 0.2: pings at about 0.2, 0.4 and 0.6 s


# -- 2. a client that goes away -------------------------------------------------------


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_matrix_client_close_is_noticed_within_1s(server: Server, reset: bool) -> None:
    tag = "close-rst" if reset else "close-fin"
    client = await RawConnection.request(server.port, "GET", f"/idle?id={tag}")
    try:
        with anyio.fail_after(5):
            await server.wait_for(tag, "events")
    finally:
        closed_at = time.time()
        client.close(reset=reset)
    with anyio.fail_after(5):
        [disconnect] = await server.wait_for(tag, "disconnect")
    report(server, f"close-{'rst' if reset else 'fin'}", seconds=disconnect["t"] - closed_at)
    assert disconnect["reason"] == "client_closed"
    assert disconnect["t"] - closed_at < 1.0


# -- 3. SIGTERM with open streams -----------------------------------------------------


def _stream_tags(count: int) -> list[str]:
    """Stream ids: the first FAREWELLS use the view with a grace period, the rest idle."""
    return [f"farewell-{n}" if n < FAREWELLS else f"idle-{n}" for n in range(count)]


async def _open_streams(server: Server, tags: list[str]) -> list[RawConnection]:
    """One client per tag, each on its view (the id's prefix), all running events()."""
    clients: list[RawConnection] = []
    try:
        with anyio.fail_after(20):
            for tag in tags:
                view = tag.split("-")[0]
                clients.append(await RawConnection.request(server.port, "GET", f"/{view}?id={tag}"))
            for tag in tags:
                await server.wait_for(tag, "events")
    except BaseException:
        for client in clients:
            client.close()
        raise
    return clients


async def _sigterm(server: Server, *, within: float) -> tuple[float, int | None]:
    """SIGTERM the server: (when it was sent, its exit code, or None if still running)."""
    signalled_at = time.time()
    os.kill(server.proc.pid, signal.SIGTERM)
    with anyio.move_on_after(within):
        await server.wait_exit()
    return signalled_at, server.proc.poll()


@pytest.mark.parametrize("name", list(SERVERS))
async def test_matrix_sigterm_ends_every_stream_and_exits_within_2s(
    name: str, tmp_path: Path
) -> None:
    server = start_server(name, tmp_path)
    tags = _stream_tags(STREAMS)
    clients: list[RawConnection] = []
    try:
        clients = await _open_streams(server, tags)
        signalled_at, code = await _sigterm(server, within=10)
        exited = time.time() - signalled_at
        assert code is not None, f"still running 10 s after SIGTERM:\n{server.log()}"
        with anyio.fail_after(5):
            bodies = [await read_rest(client) for client in clients]
    finally:
        for client in clients:
            client.close()
        server.kill()

    disconnects = {tag: server.records(tag, "disconnect") for tag in tags}
    clean = sum(ended for _, ended in bodies)
    report(
        server,
        "sigterm",
        exit_seconds=exited,
        code=code,
        last_disconnect=max(r["t"] - signalled_at for found in disconnects.values() for r in found),
        clean_ends=clean,
    )
    log = server.log()
    assert all([r["reason"] for r in found] == ["shutdown"] for found in disconnects.values()), (
        disconnects
    )
    assert exited < 2.0, log
    assert code in SERVERS[name].exit_codes, log
    # Every stream ended cleanly (terminal chunk), and the grace period was honoured.
    assert clean == STREAMS, log
    for tag, (body, _) in zip(tags[:FAREWELLS], bodies, strict=False):
        assert body.endswith(b"event: farewell\ndata: goodbye\n\n"), (tag, body)


#: SIGTERM without the recipe: the command, and what docs/deployment.md says happens.
WITHOUT_RECIPE: dict[str, Callable[[int], list[str]]] = {
    # hypercorn's default: its parent process takes the signal, and its one worker
    # process stops on an internal event, where no handler of the app can hear it.
    "hypercorn-default-workers": _python("hypercorn", SERVED, "--bind", "{host}:{port}"),
    "granian-plain-app": _python(
        "granian", "--interface", "asgi", "--host", "{host}", "--port", "{port}", PLAIN
    ),
    "daphne-plain-app": _python("daphne", "--bind", "{host}", "--port", "{port}", PLAIN),
}


@pytest.mark.parametrize("name", list(WITHOUT_RECIPE))
async def test_matrix_sigterm_without_recipe_is_late_or_abrupt(name: str, tmp_path: Path) -> None:
    server = start_server(name, tmp_path, argv=WITHOUT_RECIPE[name])
    tags = _stream_tags(5)
    clients: list[RawConnection] = []
    try:
        clients = await _open_streams(server, tags)
        signalled_at, code = await _sigterm(server, within=5)
        exited = time.time() - signalled_at
        if name.startswith("granian"):
            # granian waits for every open connection to close, for as long as it takes
            # (--workers-kill-timeout bounds that): nothing tells the streams to end.
            assert code is None, server.log()
            assert all(server.records(tag, "disconnect") == [] for tag in tags)
            left_at = time.time()
            for client in clients:
                client.close()
            with anyio.fail_after(5):
                await server.wait_exit()
            reasons = [r["reason"] for tag in tags for r in server.records(tag, "disconnect")]
            report(
                server,
                "sigterm-without-recipe",
                exit_seconds_after_clients_left=time.time() - left_at,
                disconnects=reasons,
            )
            assert set(reasons) <= {"client_closed"}
            return
        assert code == 0, server.log()
        with anyio.fail_after(5):
            bodies = [await read_rest(client) for client in clients]
    finally:
        for client in clients:
            client.close()
        server.kill()
    report(server, "sigterm-without-recipe", exit_seconds=exited)
    # The server cancels the requests: on_disconnect still gets SHUTDOWN, but no stream
    # ends cleanly and no farewell is sent.
    assert all(
        [r["reason"] for r in server.records(tag, "disconnect")] == ["shutdown"] for tag in tags
    )
    assert [ended for _, ended in bodies] == [False] * len(tags)
    assert all(b"farewell" not in body for body, _ in bodies)
    if name.startswith("hypercorn"):
        # ... after hypercorn's --graceful-timeout, 3 s by default.
        assert 3.0 <= exited < 5.0
    else:
        assert exited < 2.0  # daphne cancels every request at once


# -- 4. a client that never reads -----------------------------------------------------


async def test_matrix_client_that_never_reads_is_dropped_with_send_timeout(server: Server) -> None:
    tag = "stalled"
    # A small receive buffer, and no reads at all, not even of the response head.
    client = await RawConnection.request(server.port, "GET", f"/flood?id={tag}", rcvbuf=4096)
    try:
        with anyio.fail_after(5):
            [started] = await server.wait_for(tag, "events")
        if not SERVERS[server.name].backpressure:
            await _assert_buffers_without_bound(server, tag, client)
            return
        with anyio.fail_after(3 + SEND_TIMEOUT):
            [disconnect] = await server.wait_for(tag, "disconnect")
        [yielded] = server.records(tag, "yielded")
    finally:
        client.close()
    report(
        server,
        "no-read",
        seconds=disconnect["t"] - started["t"],
        yielded_mb=yielded["bytes"] / 1e6,
    )
    assert disconnect["reason"] == "send_timeout"
    # The buffers fill within a fraction of a second at FLOOD_RATE, then one send blocks.
    assert disconnect["t"] - started["t"] < 1.0 + SEND_TIMEOUT


async def _assert_buffers_without_bound(server: Server, tag: str, client: RawConnection) -> None:
    """daphne: `send()` never blocks, so the stream goes on and the server's memory grows
    by what it writes, until the client goes away."""
    process = psutil.Process(server.serving_pid(tag))
    rss_before = process.memory_info().rss
    await anyio.sleep(NO_READ_SECONDS)
    growth = process.memory_info().rss - rss_before
    written = FLOOD_RATE * NO_READ_SECONDS
    # No send_timeout (nothing ever blocks): the stream is still going.
    assert server.records(tag, "disconnect") == []
    closed_at = time.time()
    client.close()
    with anyio.fail_after(5):
        [disconnect] = await server.wait_for(tag, "disconnect")
    [yielded] = server.records(tag, "yielded")
    report(
        server,
        "no-read",
        seconds=NO_READ_SECONDS,
        rss_growth_mb=growth / 1e6,
        written_mb=written / 1e6,
        yielded_mb=yielded["bytes"] / 1e6,
        disconnect_after_close=disconnect["t"] - closed_at,
    )
    # What the view wrote went to daphne's buffers, not the socket: most of it is held
    # in memory (the rest sits in the kernel's socket buffers).
    assert growth > 0.5 * yielded["bytes"], (growth, yielded)
    # The stream ends only when the client goes away; the view then stops writing.
    assert disconnect["reason"] == "client_closed"
    assert disconnect["t"] - closed_at < 1.0


# -- 5. a compressed stream ---------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
async def test_matrix_compressed_stream_flushes_each_event(server: Server, encoding: str) -> None:
    tag = f"compressed-{encoding}"
    client = await RawConnection.connect(server.port)
    try:
        request = (
            f"GET /compressed?id={tag} HTTP/1.1\r\nHost: {HOST}\r\n"
            f"Accept-Encoding: {encoding}\r\n\r\n"
        )
        await client.send(request.encode())
        decoder = Decoder(encoding)
        with anyio.fail_after(5):
            head = await client.read_head()
            assert head.status == 200
            assert head.headers["content-encoding"] == encoding
            assert head.headers["vary"] == "Accept-Encoding"
            body = b""
            # The first event arrives before the second exists: flushed, not buffered.
            while b"\n\n" not in body:
                body += decoder.decode(await client.read_chunk())
            assert body == b'retry: 700\nid: 1\ndata: {"n":1,"text":"%s"}\n\n' % (b"first " * 20)
            (server.record_path.parent / f"{server.record_path.name}.{tag}.go").touch()
            while chunk := await client.read_chunk():
                body += decoder.decode(chunk)
    finally:
        client.close()
    assert decoder.ended  # the clean end finished the encoding
    events = EventParser().feed(body)
    assert [(e.id, e.event, e.json()["n"]) for e in events] == [
        ("1", None, 1),
        ("2", None, 2),
        ("3", "last", 3),
    ]
