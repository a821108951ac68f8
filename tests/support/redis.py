"""Helpers for the Redis tests: unique key prefixes, and redis-server processes of our own."""

from __future__ import annotations

import math
import shlex
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import redis.asyncio
from redis.asyncio.connection import Connection

#: The shared Redis of the development and CI machines.
REDIS_URL = "redis://127.0.0.1:6379/0"


def unique_prefix() -> str:
    return f"sseviews-test-{uuid.uuid4().hex}"


async def delete_prefix(prefix: str, url: str = REDIS_URL) -> None:
    """Delete every key under `prefix`."""
    client = redis.asyncio.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def keys_under(prefix: str, url: str = REDIS_URL) -> list[bytes]:
    client = redis.asyncio.Redis.from_url(url)
    try:
        return sorted([key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)])
    finally:
        await client.aclose()


@asynccontextmanager
async def redis_client(url: str = REDIS_URL) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


class CommandLog:
    """The commands a Redis server ran that mention `marker`, as MONITOR saw them."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        #: Each command as its words, e.g. `["SUBSCRIBE", "p:live:{a}", "p:live:{b}"]`.
        self.commands: list[list[str]] = []
        self._changed = anyio.Event()

    def add(self, line: str) -> None:
        if self.marker not in line:
            return
        # `1700000000.123456 [0 127.0.0.1:5000] "SUBSCRIBE" "p:live:{a}"`
        self.commands.append(shlex.split(line.split("] ", 1)[1]))
        self._changed.set()
        self._changed = anyio.Event()

    def named(self, name: str) -> list[list[str]]:
        """The commands called `name` (upper case), each with its arguments."""
        return [command[1:] for command in self.commands if command[0].upper() == name]

    async def sync(self, url: str = REDIS_URL) -> None:
        """Return once every command sent before this call is in the log."""
        token = f"{self.marker}:sync:{uuid.uuid4().hex}"
        async with redis_client(url) as client:
            await client.echo(token)
        while not any(command[1:] == [token] for command in self.commands):
            await self._changed.wait()


@asynccontextmanager
async def monitor(marker: str, url: str = REDIS_URL) -> AsyncIterator[CommandLog]:
    """Log the commands that mention `marker` (a test's unique prefix) while inside.

    MONITOR sees every client's commands, in the order the server ran them.
    """
    log = CommandLog(marker)
    conn = Connection(**redis.asyncio.Redis.from_url(url).connection_pool.connection_kwargs)
    await conn.connect()  # type: ignore[no-untyped-call]
    try:
        await conn.send_command("MONITOR")
        assert await conn.read_response() == b"OK"

        async def read(task_status: anyio.abc.TaskStatus[None]) -> None:
            task_status.started()
            while True:
                line = await conn.read_response(timeout=math.inf)
                log.add(line.decode() if isinstance(line, bytes) else str(line))

        async with anyio.create_task_group() as tg:
            await tg.start(read)
            yield log
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await conn.disconnect()


class RedisServer:
    """A `redis-server` subprocess on 127.0.0.1, without persistence."""

    def __init__(self, port: int, *args: str) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.args = args  # more redis-server options
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait (at most 10 s) until it accepts connections."""
        assert self.process is None
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited at startup")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        """Kill the server with SIGKILL (no shutdown, no goodbye to clients)."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(timeout=10)
