"""Helpers for the Redis tests: unique key prefixes, and redis-server processes of our own."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio

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
