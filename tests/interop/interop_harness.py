"""What the interoperability tests share: the server, a proxy that drops connections, the
clients under test behind one interface, and the checks every client must pass.

Every client run collects *records*, plain dicts in the order the client produced them:

- `{"type": "open", "status": ...}`: a connection opened (status when the client shows it);
- `{"type": "event", "event": ..., "data": ..., "id": ..., "retry": ...}`: an event the
  client dispatched to its user (`event` is `"message"` for unnamed events; `retry` is
  present only for clients that expose it);
- `{"type": "error", "status": ...}`: the client reported an error;
- `{"type": "closed"}`: the client gave up for good.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from interop_app import PARSE_EVENTS, PING_INTERVAL, PING_SECONDS
from support.processes import clean_env, free_port, stop_process, wait_until_serving

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
NODE_MODULES = HERE / "node_modules"
# The event names the EventSource-style clients listen to (they see only these).
EVENT_NAMES = ["greeting", "json", "end", "sseviews.reset"]
WAIT_SECONDS = 10.0

Record = dict[str, Any]


# -- the server -------------------------------------------------------------------------


class InteropServer:
    """`uvicorn interop_app:app` in a subprocess on a fixed loopback port, with its
    history in a SQLite file of `folder`: `stop()` then `start()` restarts it on the
    same port and history."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.env = clean_env(SSEVIEWS_INTEROP_HISTORY=str(folder / "history.db"))
        self.log = folder / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "interop_app:app",
            "--app-dir",
            str(HERE),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=log)
        wait_until_serving(self.process, self.base + "/health", self.output)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_process(self.process)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=5) as response:
            return json.load(response)

    def publish(self, start: int, count: int) -> list[str]:
        """Publish `m<start>` ... to the group `room`; return their ids."""
        request = urllib.request.Request(
            f"{self.base}/publish?start={start}&count={count}", method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            ids: list[str] = json.load(response)
        return ids

    def pings_sent(self) -> int:
        return int(self.get("/stats").get("PingView", {}).get("pings", 0))


@contextlib.contextmanager
def running_server(folder: Path) -> Iterator[InteropServer]:
    server = InteropServer(folder)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# -- the proxy --------------------------------------------------------------------------


class DroppingProxy:
    """A TCP proxy on loopback in front of `upstream_port`; `drop()` resets every
    connection through it at once, as a network failure would (the server sees the
    client go, the client sees its connection reset)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.base = f"http://{HOST}:{self.port}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection((HOST, self.upstream_port), timeout=2)
            except OSError:  # the server is down: the client's connect fails
                _reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for source, target in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(source, target), daemon=True)
                thread.start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
        except OSError:
            pass
        with self._lock:
            for sock in (source, target):
                if sock in self._open:
                    self._open.discard(sock)
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    sock.close()

    def drop(self) -> int:
        """Reset every open connection; return how many there were."""
        with self._lock:
            dropped = list(self._open)
            self._open.clear()
        for sock in dropped:
            _reset(sock)
        return len(dropped) // 2

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.drop()


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


# -- the clients ------------------------------------------------------------------------


class ClientRun(Protocol):
    """One client connected to one URL, collecting records until closed."""

    def records(self) -> list[Record]: ...

    def close(self) -> None: ...


# Starts a client on a URL; the client factories of every test module have this shape.
StartClient = Callable[[str], ClientRun]


class ThreadRun:
    """A blocking Python client run in a daemon thread by `target(url, run)`."""

    def __init__(self, target: Callable[[str, ThreadRun], None], url: str) -> None:
        self.stopped = threading.Event()
        #: Ends the connection being read, from another thread (set by `target`).
        self.interrupt: Callable[[], None] | None = None
        self._records: list[Record] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, args=(target, url), daemon=True)
        self._thread.start()

    def _main(self, target: Callable[[str, ThreadRun], None], url: str) -> None:
        try:
            target(url, self)
        except Exception as exc:  # reported as a record, so the test shows it
            self.add({"type": "crashed", "error": repr(exc)})

    def add(self, record: Record) -> None:
        with self._lock:
            self._records.append(record)

    def records(self) -> list[Record]:
        with self._lock:
            return list(self._records)

    def close(self) -> None:
        self.stopped.set()
        interrupt = self.interrupt
        if interrupt is not None:
            with contextlib.suppress(Exception):
                interrupt()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive(), "the client's thread did not end"


class NodeRun:
    """A Node script that prints records as JSON lines, read by a daemon thread."""

    def __init__(self, script: str, *args: str) -> None:
        node = shutil.which("node")
        if node is None or not NODE_MODULES.is_dir():
            pytest.fail(
                "the Node interop clients are not installed: "
                "run `npm install --no-package-lock` in tests/interop (.ci/run does)"
            )
        self._records: list[Record] = []
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [node, str(HERE / script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "NODE_NO_WARNINGS": "1"},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                record = {"type": "output", "line": line.decode(errors="replace")}
            with self._lock:
                self._records.append(record)

    def records(self) -> list[Record]:
        with self._lock:
            records = list(self._records)
        if self.process.poll() not in (None, 0):
            assert self.process.stderr is not None
            records.append({"type": "crashed", "stderr": self.process.stderr.read().decode()})
        return records

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self._reader.join(timeout=5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def events_of(records: list[Record]) -> list[Record]:
    return [record for record in records if record["type"] == "event"]


def wait_for(
    run: ClientRun, done: Callable[[list[Record]], bool], what: str, seconds: float = WAIT_SECONDS
) -> list[Record]:
    """Poll the run's records until `done(records)`; fail, showing them, after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        records = run.records()
        crashed = [record for record in records if record["type"] == "crashed"]
        if crashed:
            pytest.fail(f"the client crashed while waiting for {what}: {crashed}\n{records}")
        if done(records):
            return records
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {seconds}s; the client's records: {records}")
        time.sleep(0.02)


# -- the checks every client must pass ---------------------------------------------------


def _expected_data(data: str) -> str:
    return data.replace("\r\n", "\n").replace("\r", "\n")


def check_parsing(start: StartClient, server: InteropServer, *, exposes_retry: bool) -> None:
    """Every field of /parse arrives as the browser would parse it."""
    run = start(server.base + "/parse")
    try:
        records = wait_for(
            run, lambda r: any(e["event"] == "end" for e in events_of(r)), "end event"
        )
    finally:
        run.close()
    got = [(e["event"], e["data"], e["id"]) for e in events_of(records)]
    assert got == [
        (name or "message", _expected_data(data), id) for data, name, id, _ in PARSE_EVENTS
    ]
    if exposes_retry:
        retries = [e.get("retry") for e in events_of(records)]
        assert [int(r) if r is not None else None for r in retries] == [
            retry for *_, retry in PARSE_EVENTS
        ]


def check_pings_dispatch_nothing(start: StartClient, server: InteropServer) -> None:
    """Keep-alive pings, before and after events with ids, are never dispatched."""
    before = server.pings_sent()
    run = start(server.base + "/pings")
    try:
        wait_for(run, lambda r: any(e["event"] == "end" for e in events_of(r)), "end event")
        time.sleep(6 * PING_INTERVAL)  # pings go on after the last event: none may show
        records = run.records()
    finally:
        run.close()
    pings = server.pings_sent() - before
    # The view pings every PING_INTERVAL between its two events: the client saw them.
    assert pings >= PING_SECONDS / PING_INTERVAL / 2, pings
    got = [(e["event"], e["data"], e["id"]) for e in events_of(records)]
    assert got == [("message", "first", "a1"), ("end", "last", "a2")], records


def check_reset_event(start: StartClient, server: InteropServer) -> None:
    """An id of an unknown epoch gets the `sseviews.reset` event, then live events."""
    run = start(server.base + "/room?lastEventId=00000000-5")
    try:
        records = wait_for(run, lambda r: len(events_of(r)) >= 1, "reset event")
        (published,) = server.publish(1000, 1)
        records = wait_for(run, lambda r: len(events_of(r)) >= 2, "live event after the reset")
    finally:
        run.close()
    reset, live = events_of(records)[:2]
    assert reset["event"] == "sseviews.reset"
    data = json.loads(reset["data"])
    assert data["reason"] == "unknown_epoch"
    assert reset["id"] == data["head"]
    # The stream goes on from the group's own epoch, not the one it was sent.
    assert set(data) == {"reason", "head", "groups"}
    assert data["groups"] == ["room"]
    assert not data["head"].startswith("00000000-")
    assert (live["event"], live["data"], live["id"]) == ("message", "m1000", published)


def check_resume(clients: dict[str, StartClient], folder: Path) -> None:
    """Clients of the group `room`, all at once, through a proxy: the proxy drops every
    connection, then the server restarts (its history is in SQLite). Events published
    while they were away are replayed after their Last-Event-ID: no gap, no duplicate.
    (One server for several clients: each restart costs a second or more.)"""
    server = InteropServer(folder)
    runs: dict[str, ClientRun] = {}

    def opened(records: list[Record]) -> int:
        return sum(record["type"] == "open" for record in records)

    def wait_all(done: Callable[[list[Record]], bool], what: str) -> None:
        for name, run in runs.items():
            wait_for(run, done, f"{what} ({name})")

    def has(count: int) -> Callable[[list[Record]], bool]:
        return lambda records: len(events_of(records)) >= count

    # Every clean-up runs, even when one of them fails.
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(server.stop)
        server.start()
        proxy = DroppingProxy(server.port)
        cleanup.callback(proxy.close)
        for name, start in clients.items():
            runs[name] = start(proxy.base + "/room")
            cleanup.callback(runs[name].close)
        wait_all(lambda r: opened(r) >= 1, "open")
        ids = server.publish(0, 5)
        wait_all(has(5), "the first 5 events")
        assert proxy.drop() >= len(runs)
        ids += server.publish(5, 5)  # while the clients are away
        wait_all(has(10), "events 5-9, replayed after the dropped connection")
        server.stop()
        server.start()
        ids += server.publish(10, 5)  # most likely before the clients are back
        wait_all(has(15), "events 10-14, replayed after the restart")
        ids += server.publish(15, 5)
        wait_all(has(20), "events 15-19, live")
        time.sleep(0.2)  # anything extra (a duplicate) would come now
        results = {name: run.records() for name, run in runs.items()}
    expected = [(f"m{n}", id) for n, id in enumerate(ids)]
    for name, records in results.items():
        got = [(e["data"], e["id"]) for e in events_of(records)]
        assert got == expected, (name, records)
        # The client did reconnect twice (after the drop, after the restart), at least.
        assert opened(records) >= 3, (name, records)
