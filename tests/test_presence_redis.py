"""Presence on Redis: in-process against a real Redis, and across two real uvicorns.

The multi-process tests run `tests/apps/presence_app.py` twice (A and B) with
`support.servers.start_app_servers` and the raw socket `support.raw.SSEClient`,
sharing one Redis prefix.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import httpx
import pytest
from support.apps import member_app
from support.raw import TIMEOUT, SSEClient
from support.redis import REDIS_URL, keys_under
from support.servers import ServerProcess, members, presence_servers

from sseviews import JOIN_EVENT, LEAVE_EVENT, BackendError, Broadcast, Event
from sseviews.backends.redis import RedisBackend
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio


# -- in-process, on a real Redis -------------------------------------------------------


def redis_broadcast(prefix: str, timeout: float = 30.0) -> Broadcast:
    broadcast = Broadcast(REDIS_URL, prefix=prefix)
    assert isinstance(broadcast.live, RedisBackend)
    broadcast.live.presence_timeout = timeout
    return broadcast


async def presence_keys(prefix: str) -> list[bytes]:
    return [key for key in await keys_under(prefix) if b":presence" in key]


async def test_presence_redis_lists_and_removes_with_escaped_keys(prefix: str) -> None:
    broadcast = redis_broadcast(prefix)
    async with EventStreamClient(member_app(broadcast)) as client:
        async with client.stream("/room/a:b%25?user=ann"), client.stream("/room/a:b%25?user=bo"):
            entries = await broadcast.presence("room:a:b%")
            assert sorted(entry.info["user"] for entry in entries) == ["ann", "bo"]
            assert await broadcast.presence_count("room:a:b%") == 2
            assert len(await broadcast.presence("room:a:b%", limit=1)) == 1
            keys = await presence_keys(prefix)
            # The group's `:` and `%` are escaped: no other prefix and group share the key.
            assert f"{prefix}:presence:room%3Aa%3Ab%25".encode() in keys
        assert await broadcast.presence_count("room:a:b%") == 0
    assert await presence_keys(prefix) == []


@pytest.mark.slow
async def test_presence_redis_thousand_cycles_leave_no_entry_or_key(prefix: str) -> None:
    broadcast = redis_broadcast(prefix)
    app = member_app(broadcast, announce_presence=True)
    async with EventStreamClient(app) as client:
        async with client.stream("/room/busy?user=watcher") as watcher:
            for n in range(1000):
                async with client.stream(f"/room/busy?user=u{n}") as stream:
                    assert stream.status_code == 200
            assert [entry.info for entry in await broadcast.presence("room:busy")] == [
                {"user": "watcher"}
            ]
            with anyio.fail_after(30):
                names = [(await watcher.next_event()).event for _ in range(2001)]
            assert names == [JOIN_EVENT] + [JOIN_EVENT, LEAVE_EVENT] * 1000
        assert await broadcast.presence_count("room:busy") == 0
        # Only this process's registration is left until its next heartbeat or disconnect.
        assert await presence_keys(prefix) in ([], [f"{prefix}:presence-procs".encode()])
    assert await presence_keys(prefix) == []


async def test_presence_redis_members_of_a_silent_process_expire_with_leave(
    prefix: str,
) -> None:
    """A process that stops heartbeating (as if killed) loses its members to a sweep."""
    dead = redis_broadcast(prefix, timeout=1.2)
    alive = redis_broadcast(prefix, timeout=1.2)
    async with alive, alive.subscribe("room:x") as subscription:
        await dead.connect()
        assert isinstance(dead.live, RedisBackend)
        await dead.live.presence_join("m-1", ["room:x"], b'{"id":"m-1","info":{}}', True)
        assert await alive.presence_count("room:x") == 1
        # Kill its heartbeat and reader without the clean-up a disconnect does.
        heartbeat = dead.live._heartbeat
        reader = dead.live._task
        assert heartbeat is not None and reader is not None
        heartbeat.cancel()
        reader.cancel()
        started = time.monotonic()
        with anyio.fail_after(5):
            events: list[Event] = []
            async for event in subscription:
                events.append(event)
                if event.event == LEAVE_EVENT:
                    break
        assert time.monotonic() - started <= 1.2 + 0.5
        assert [event.event for event in events] == [JOIN_EVENT, LEAVE_EVENT]
        assert json.loads(events[-1].data)["id"] == "m-1"
        assert events[-1].id is None
        assert await alive.presence_count("room:x") == 0
        dead.live._heartbeat = None
        await dead.disconnect()
    assert await presence_keys(prefix) == []


async def test_presence_redis_failed_leave_is_retried_by_the_heartbeat(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broadcast = redis_broadcast(prefix, timeout=0.6)  # a heartbeat every 0.1 s
    async with broadcast:
        live = broadcast.live
        assert isinstance(live, RedisBackend)
        await live.presence_join("m-1", ["room:r"], b'{"id":"m-1","info":{}}', False)
        real = live._presence

        async def down(op: str, *args: Any) -> Any:
            raise OSError("Redis is down")

        monkeypatch.setattr(live, "_presence", down)
        with pytest.raises(BackendError):
            await live.presence_leave("m-1", ["room:r"], b"", False)
        monkeypatch.setattr(live, "_presence", real)
        for _ in range(60):  # the heartbeat retries the leave: at most 3 s
            if not live._unleft:
                break
            await anyio.sleep(0.05)
        assert live._unleft == []
        assert await broadcast.presence_count("room:r") == 0
        assert live._present == 0


def test_presence_redis_timeout_is_checked() -> None:
    for bad in (0, -1, True, "30"):
        with pytest.raises(ValueError, match="presence_timeout"):
            RedisBackend(REDIS_URL, presence_timeout=bad)  # type: ignore[arg-type]


# -- two uvicorn processes ------------------------------------------------------------


@pytest.fixture
def start_servers(
    tmp_path: Path, prefix: str
) -> Iterator[Callable[[float], tuple[ServerProcess, ServerProcess]]]:
    """Start A and B (the presence app, one Redis prefix) with a presence timeout."""
    with presence_servers(tmp_path, prefix) as start:
        yield start


def reset(client: SSEClient) -> None:
    """Close the client's socket with RST (SO_LINGER 0), not FIN."""
    sock: socket.socket = client._stream.extra(anyio.abc.SocketAttribute.raw_socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["fin", "rst", "shutdown"])
async def test_presence_two_processes_join_on_a_listed_on_b_then_gone(
    start_servers: Callable[[float], tuple[ServerProcess, ServerProcess]],
    http: httpx.AsyncClient,
    prefix: str,
    how: str,
) -> None:
    # A long timeout: what removes the member here is its own leave, not a sweep.
    a, b = start_servers(30.0)
    room = "lobby"
    async with SSEClient.connect(b, f"{room}?user=watcher") as watcher:
        own = await watcher.next_named(JOIN_EVENT)
        assert json.loads(own.data)["info"]["user"] == "watcher"
        async with SSEClient.connect(a, f"{room}?user=alice") as alice:
            joined = await watcher.next_named(JOIN_EVENT)
            assert json.loads(joined.data)["info"]["user"] == "alice"
            assert joined.id is None
            for server in (a, b):
                assert await members(http, server, room) == ["alice", "watcher"]
            if how == "rst":
                reset(alice)
            elif how == "shutdown":
                os.killpg(a.proc.pid, signal.SIGTERM)
                await anyio.to_thread.run_sync(a.proc.wait, TIMEOUT * 2)
        left = await watcher.next_named(LEAVE_EVENT)
        assert json.loads(left.data) == json.loads(joined.data)
        servers = (b,) if how == "shutdown" else (a, b)
        for server in servers:
            assert await members(http, server, room) == ["watcher"]
    assert "Traceback" not in b.log()


@pytest.mark.slow
async def test_presence_two_processes_sigkill_members_gone_within_bound(
    start_servers: Callable[[float], tuple[ServerProcess, ServerProcess]],
    http: httpx.AsyncClient,
    prefix: str,
) -> None:
    timeout = 3.0
    a, b = start_servers(timeout)
    room = "crash"
    async with SSEClient.connect(b, f"{room}?user=watcher") as watcher:
        await watcher.next_named(JOIN_EVENT)
        async with (
            SSEClient.connect(a, f"{room}?user=alice"),
            SSEClient.connect(a, f"{room}?user=anna"),
        ):
            for _ in range(2):
                await watcher.next_named(JOIN_EVENT)
            assert await members(http, b, room) == ["alice", "anna", "watcher"]
            a.kill()
            killed = time.monotonic()
            try:
                leaves = [await watcher.next_named(LEAVE_EVENT, timeout + 2) for _ in range(2)]
            except TimeoutError:
                # Seen once in CI, under load, and not since: say what B knew then.
                listed = await members(http, b, room)
                raise AssertionError(
                    f"no leave within {timeout + 2} s of the SIGKILL; B lists {listed}; "
                    f"B's log:\n{b.log()}"
                ) from None
            elapsed = time.monotonic() - killed
        assert elapsed <= timeout + 0.5, elapsed
        assert sorted(json.loads(event.data)["info"]["user"] for event in leaves) == [
            "alice",
            "anna",
        ]
        assert all(event.id is None for event in leaves)
        assert await members(http, b, room) == ["watcher"]
    assert "Traceback" not in b.log()
