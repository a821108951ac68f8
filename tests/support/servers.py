"""Real servers in subprocesses: uvicorn (or gunicorn, hypercorn, granian, daphne)
serving a test app on a free loopback port, in its own process group, its output
in a log file of the test's own.

`start_servers()` starts several at once and waits until each answers its health
path; a server that lost its port to another process before it bound it is started
again on another. `with start_server(...) as server:` stops it at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from .processes import free_port, stop_process
from .raw import TIMEOUT
from .redis import REDIS_URL

#: The repository root: the servers run there, so `tests.apps.…` imports.
REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"

#: A server's command line for a given port.
Command = Callable[[int], list[str]]


def uvicorn(app: str, *options: str) -> Command:
    """The command that serves `app` (`module:attribute`) with uvicorn on loopback."""

    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "uvicorn", app, "--host", HOST, "--port", str(port), *options]

    return argv


@dataclass
class ServerProcess:
    """One server process on a loopback port, in its own process group. As a context
    manager, it is stopped (`stop()`) at the end of the block."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM the server (a graceful shutdown); SIGKILL it if it has not exited 10 s
        later."""
        stop_process(self.proc)

    def kill(self) -> None:
        """SIGKILL the whole process group (no shutdown at all) and reap the leader."""
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    async def wait_exit(self) -> int:
        """The exit code, once the server has exited; callers bound the wait."""
        while True:
            code = self.proc.poll()
            if code is not None:
                return code
            await anyio.sleep(0.01)


def answers(port: int, path: str) -> bool:
    """Whether `GET path` on `port` answers 200 (a blocking check with a short timeout)."""
    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            sock.settimeout(1)
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while len(data) < 12 and (chunk := sock.recv(65536)):
                data += chunk
    except OSError:
        return False
    return data.startswith(b"HTTP/1.1 200 ")


def spawn(
    name: str, command: Command, tmp: Path, env: Mapping[str, str], *, stdout: bool = True
) -> ServerProcess:
    """Start `command` on a free port, without waiting; its stderr (and its stdout, unless
    `stdout` is false: uvicorn's access log) goes to `tmp/<name>-<port>.log`."""
    port = free_port()
    log_path = tmp / f"{name}-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command(port),
            cwd=REPO,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log if stdout else subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    return ServerProcess(name, proc, port, log_path)


def start_servers(
    commands: Mapping[str, Command],
    tmp: Path,
    env: Mapping[str, str],
    *,
    health: str = "/health",
    seconds: float = 15.0,
    stdout: bool = True,
) -> list[ServerProcess]:
    """Start one server per name, all at once, and wait until each answers 200 on
    `health`; fail the test, with the server's log, if one exits or `seconds` pass.

    A server whose port was taken before it bound it is started again on another
    (3 attempts in all). On failure every server started is killed.
    """
    started: list[ServerProcess] = []
    try:
        attempts = dict.fromkeys(commands, 3)
        ready: dict[str, ServerProcess] = {}
        starting = {
            name: spawn(name, command, tmp, env, stdout=stdout)
            for name, command in commands.items()
        }
        started.extend(starting.values())
        deadline = time.monotonic() + seconds
        while starting:
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {s.name}:\n{s.log()}" for s in starting.values())
                pytest.fail(f"the server did not answer in {seconds}s:\n{logs}")
            for name, server in list(starting.items()):
                if answers(server.port, health):
                    ready[name] = starting.pop(name)
                elif server.proc.poll() is not None:
                    attempts[name] -= 1
                    log = server.log()
                    if "address already in use" not in log.lower() or not attempts[name]:
                        pytest.fail(f"{name} exited ({server.proc.returncode}):\n{log}")
                    starting[name] = spawn(name, commands[name], tmp, env, stdout=stdout)
                    started.append(starting[name])
            time.sleep(0.05)
        return [ready[name] for name in commands]
    except BaseException:
        for server in started:
            server.kill()
        raise


def start_server(
    command: Command,
    tmp: Path,
    env: Mapping[str, str],
    *,
    name: str = "uvicorn",
    health: str = "/health",
    seconds: float = 15.0,
    stdout: bool = True,
) -> ServerProcess:
    """`start_servers()` for one server."""
    [server] = start_servers(
        {name: command}, tmp, env, health=health, seconds=seconds, stdout=stdout
    )
    return server


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records an app wrote to `path` (`tests/apps/recording.py`): whole lines only,
    since the server may be appending one right now."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line]


def with_repo_on_path(env: dict[str, str]) -> dict[str, str]:
    """`env` with the repository first on `PYTHONPATH`, so the server imports `tests.apps`."""
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# -- the apps that share a broadcast across processes ---------------------------------

#: Fan-out and resume across processes (`tests/apps/multiprocess_app.py`).
MULTIPROCESS_APP = "tests.apps.multiprocess_app:app"
#: Presence across processes (`tests/apps/presence_app.py`).
PRESENCE_APP = "tests.apps.presence_app:app"


def start_app_servers(
    tmp: Path,
    prefix: str,
    names: tuple[str, ...] = ("A", "B"),
    url: str = REDIS_URL,
    *,
    app: str = MULTIPROCESS_APP,
    env: Mapping[str, str] | None = None,
) -> list[ServerProcess]:
    """One uvicorn of `app` per name, started at once, all on the broadcast at `url`
    under one key prefix, so they share groups, ids and history. They inherit this
    process's environment, with `env` added."""
    env = with_repo_on_path({**os.environ, **(env or {})})
    env["SSEVIEWS_TEST_REDIS_URL"] = url
    env["SSEVIEWS_TEST_REDIS_PREFIX"] = prefix
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("WEB_CONCURRENCY", None)
    commands = {name: uvicorn(app) for name in names}
    return start_servers(commands, tmp, env, stdout=False)


@contextmanager
def presence_servers(
    tmp: Path, prefix: str, url: str = REDIS_URL
) -> Iterator[Callable[[float], tuple[ServerProcess, ServerProcess]]]:
    """`start(timeout)` starts A and B of the presence app on the broadcast at `url`
    under `prefix`, with that presence timeout (seconds); every server started is
    killed at the end of the block."""
    started: list[ServerProcess] = []

    def start(timeout: float) -> tuple[ServerProcess, ServerProcess]:
        presence = {"SSEVIEWS_TEST_PRESENCE_TIMEOUT": str(timeout)}
        a, b = start_app_servers(tmp, prefix, url=url, app=PRESENCE_APP, env=presence)
        started.extend((a, b))
        return a, b

    try:
        yield start
    finally:
        for server in started:
            server.kill()


async def publish(http: httpx.AsyncClient, server: ServerProcess, room: str, data: Any) -> str:
    """POST `data` to `room` through an app server (`POST /rooms/{room}`); return the id
    the broadcast assigned. Bounded by `support.raw.TIMEOUT`."""
    with anyio.fail_after(TIMEOUT):
        response = await http.post(f"{server.base_url}/rooms/{room}", json=data)
    assert response.status_code == 200, (response.status_code, response.text)
    event_id: str = response.json()["id"]
    return event_id


async def members(http: httpx.AsyncClient, server: ServerProcess, room: str) -> list[str]:
    """The users present in `room`, as the presence app on `server` lists them."""
    with anyio.fail_after(TIMEOUT):
        response = await http.get(f"{server.base_url}/presence/{room}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == len(body["members"])
    return sorted(member["info"]["user"] for member in body["members"])
