"""Presence on PostgreSQL: in-process against the real database, and across two uvicorns.

The multi-process test runs `tests/apps/presence_app.py` twice with
`support.servers.start_app_servers` and the helpers of `tests/test_presence_redis.py`,
given the PostgreSQL URL instead of Redis's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest
from support.apps import member_app
from support.postgres import PG_DSN, PG_URL
from support.raw import SSEClient
from support.servers import ServerProcess, members, presence_servers

from sseviews import JOIN_EVENT, LEAVE_EVENT, BackendError, Broadcast, Event
from sseviews.backends.postgres import PostgresBackend
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio


def pg_broadcast(prefix: str, timeout: float = 30.0) -> Broadcast:
    broadcast = Broadcast(PG_URL, prefix=prefix)
    assert isinstance(broadcast.live, PostgresBackend)
    broadcast.live.presence_timeout = timeout
    return broadcast


async def presence_rows(prefix: str) -> tuple[int, int]:
    """How many member rows and process rows the presence tables hold."""
    conn = await asyncpg.connect(PG_DSN)
    try:
        members = await conn.fetchval(f'SELECT count(*) FROM "{prefix}_presence"')
        processes = await conn.fetchval(f'SELECT count(*) FROM "{prefix}_presence_processes"')
    finally:
        await conn.close()
    return members, processes


async def test_presence_postgres_lists_counts_and_removes(pg_prefix: str) -> None:
    broadcast = pg_broadcast(pg_prefix)
    async with EventStreamClient(member_app(broadcast)) as client:
        async with client.stream("/room/a:b%25?user=ann"), client.stream("/room/a:b%25?user=bo"):
            entries = await broadcast.presence("room:a:b%")
            assert sorted(entry.info["user"] for entry in entries) == ["ann", "bo"]
            assert await broadcast.presence_count("room:a:b%") == 2
            assert len(await broadcast.presence("room:a:b%", limit=1)) == 1
            assert await broadcast.presence_count("room:other") == 0
        assert await broadcast.presence_count("room:a:b%") == 0
    assert await presence_rows(pg_prefix) == (0, 0)


async def test_presence_postgres_hundred_cycles_announced_in_order(pg_prefix: str) -> None:
    broadcast = pg_broadcast(pg_prefix)
    app = member_app(broadcast, announce_presence=True)
    async with EventStreamClient(app) as client:
        async with client.stream("/room/busy?user=watcher") as watcher:
            for n in range(100):
                async with client.stream(f"/room/busy?user=u{n}") as stream:
                    assert stream.status_code == 200
            assert [entry.info for entry in await broadcast.presence("room:busy")] == [
                {"user": "watcher"}
            ]
            with anyio.fail_after(30):
                events = [await watcher.next_event() for _ in range(201)]
            assert [event.event for event in events] == [JOIN_EVENT] + [
                JOIN_EVENT,
                LEAVE_EVENT,
            ] * 100
            users = [json.loads(event.data)["info"]["user"] for event in events[1:]]
            assert users == [f"u{n // 2}" for n in range(200)]
            assert all(event.id is None for event in events)
        assert await broadcast.presence_count("room:busy") == 0
    assert await presence_rows(pg_prefix) == (0, 0)


async def test_presence_postgres_members_of_a_silent_process_expire_with_leave(
    pg_prefix: str,
) -> None:
    """A process that stops heartbeating (as if killed) loses its members to a sweep."""
    dead = pg_broadcast(pg_prefix, timeout=1.2)
    alive = pg_broadcast(pg_prefix, timeout=1.2)
    async with alive, alive.subscribe("room:x") as subscription:
        await dead.connect()
        assert isinstance(dead.live, PostgresBackend)
        big = b'{"id":"m-1","info":{"pad":"' + b"p" * 9000 + b'"}}'  # through the table
        await dead.live.presence_join("m-1", ["room:x"], big, True)
        assert await alive.presence_count("room:x") == 1
        heartbeat = dead.live._heartbeat
        assert heartbeat is not None
        heartbeat.cancel()
        started = time.monotonic()
        with anyio.fail_after(5):
            events: list[Event] = []
            async for event in subscription:
                events.append(event)
                if event.event == LEAVE_EVENT:
                    break
        assert time.monotonic() - started <= 1.2 + 0.5
        assert [event.event for event in events] == [JOIN_EVENT, LEAVE_EVENT]
        assert events[-1].data.encode() == big
        assert await alive.presence_count("room:x") == 0
        dead.live._heartbeat = None
        await dead.disconnect()
    assert await presence_rows(pg_prefix) == (0, 0)


async def test_presence_postgres_failed_leave_is_retried_by_the_heartbeat(
    pg_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broadcast = pg_broadcast(pg_prefix, timeout=0.6)  # a heartbeat every 0.1 s
    async with broadcast:
        live = broadcast.live
        assert isinstance(live, PostgresBackend)
        await live.presence_join("m-1", ["room:r"], b'{"id":"m-1","info":{}}', False)
        real = live._leave

        async def down(conn: object, member: str) -> None:
            raise OSError("the database is down")

        monkeypatch.setattr(live, "_leave", down)
        with pytest.raises(BackendError):
            await live.presence_leave("m-1", ["room:r"], b"", False)
        monkeypatch.setattr(live, "_leave", real)
        with anyio.fail_after(3):
            while live._unleft:  # noqa: ASYNC110 (the heartbeat retries the leave)
                await anyio.sleep(0.05)
        assert await broadcast.presence_count("room:r") == 0
        assert live._present == 0


def test_presence_postgres_timeout_is_checked() -> None:
    for bad in (0, -1, True, "30"):
        with pytest.raises(ValueError, match="presence_timeout"):
            PostgresBackend(PG_URL, presence_timeout=bad)  # type: ignore[arg-type]


@pytest.fixture
def start_servers(
    tmp_path: Path, pg_prefix: str
) -> Iterator[Callable[[float], tuple[ServerProcess, ServerProcess]]]:
    """Start A and B (the presence app, one PostgreSQL prefix) with a presence timeout."""
    with presence_servers(tmp_path, pg_prefix, PG_URL) as start:
        yield start


@pytest.mark.slow
async def test_presence_postgres_two_processes_sigkill_members_gone_within_bound(
    start_servers: Callable[[float], tuple[ServerProcess, ServerProcess]], http: httpx.AsyncClient
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
            for server in (a, b):
                assert await members(http, server, room) == ["alice", "anna", "watcher"]
            a.kill()
            killed = time.monotonic()
            leaves = [await watcher.next_named(LEAVE_EVENT, timeout + 2) for _ in range(2)]
            elapsed = time.monotonic() - killed
        assert elapsed <= timeout + 0.5, elapsed
        assert sorted(json.loads(event.data)["info"]["user"] for event in leaves) == [
            "alice",
            "anna",
        ]
        assert await members(http, b, room) == ["watcher"]
    assert "Traceback" not in b.log()
