"""Fan-out and resume across processes: two real uvicorns sharing one Redis prefix.

The app under test is `tests/apps/multiprocess_app.py`, started twice (A and B)
on two loopback ports with the same `SSEVIEWS_TEST_REDIS_PREFIX`, so both share
groups, ids and history. Events are published with `POST /rooms/{room}` and
streamed with `GET /rooms/{room}`.

The SSE clients (`support.raw.SSEClient`) speak HTTP/1.1 over raw anyio sockets
(reads may be cancelled by a timeout without losing bytes), undo the chunked
framing themselves, and parse the body with `sseviews.testing.EventParser`, as a
browser would.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import httpx
import pytest
import redis
from support.broadcast import steps
from support.raw import SSEClient, seq_of, summary
from support.redis import REDIS_URL, keys_under, unique_prefix
from support.servers import ServerProcess, publish, start_app_servers

from sseviews.stores.base import format_id

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

#: Bound on any single wait for an event, a response or a process.
TIMEOUT = 5.0


# -- the server processes ---------------------------------------------------------


def _delete_keys(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=TIMEOUT)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def prefix() -> Iterator[str]:
    """A Redis prefix of this test's own; every key under it is deleted afterwards."""
    value = unique_prefix()
    try:
        yield value
    finally:
        _delete_keys(value)


@pytest.fixture
def servers(tmp_path: Path, prefix: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Processes A and B: the same app, two ports, one shared Redis prefix."""
    a, b = start_app_servers(tmp_path, prefix)
    try:
        yield a, b
    finally:
        a.kill()
        b.kill()


def assert_clean_log(server: ServerProcess) -> None:
    log = server.log()
    assert "Traceback" not in log, f"{server.name} logged an error:\n{log}"


# -- the tests ---------------------------------------------------------------------


async def test_event_published_through_one_process_reaches_clients_on_both(
    servers: tuple[ServerProcess, ServerProcess], http: httpx.AsyncClient, prefix: str
) -> None:
    a, b = servers
    room = "fanout"
    async with (
        SSEClient.connect(a, room) as on_a,
        SSEClient.connect(b, room) as on_b,
        SSEClient.connect(b, "elsewhere") as other_room,
    ):
        # The subscription is active before the response head: publish right away.
        first = await publish(http, a, room, {"n": 0, "via": "A"})
        for client in (on_a, on_b):
            event = await client.next_event()
            assert (event.id, event.json()) == (first, {"n": 0, "via": "A"})
            assert client.retry == 100

        # More, through both processes: each client gets all of them, in publish order.
        published = [(first, {"n": 0, "via": "A"})]
        for n, via in enumerate([b, a, b, a], start=1):
            data = {"n": n, "via": via.name}
            published.append((await publish(http, via, room, data), data))
        ids = [event_id for event_id, _ in published]
        assert [seq_of(i) for i in ids] == sorted({seq_of(i) for i in ids}), ids
        for client in (on_a, on_b):
            await client.next_events(4)
            assert summary(client.received) == published
        for client in (on_a, on_b, other_room):
            await client.expect_quiet()
        assert other_room.received == []

    # The processes really used this test's prefix (and so share it).
    assert await keys_under(prefix)
    assert_clean_log(a)
    assert_clean_log(b)


async def test_client_moving_from_a_to_b_gets_exactly_what_it_missed_then_live(
    servers: tuple[ServerProcess, ServerProcess], http: httpx.AsyncClient
) -> None:
    a, b = servers
    room = "resume"
    published: list[tuple[str, Any]] = []

    async def post(via: ServerProcess, n: int) -> None:
        data = {"n": n, "via": via.name}
        published.append((await publish(http, via, room, data), data))

    async with SSEClient.connect(a, room) as on_a:
        for n in range(3):
            await post(a, n)
        seen = await on_a.next_events(3)
        assert summary(seen) == published
    last_id = seen[-1].id
    assert last_id is not None

    # While the client is away, five more are published, through B.
    for n in range(3, 8):
        await post(b, n)
    missed = published[3:]

    async with SSEClient.connect(b, room, last_event_id=last_id) as on_b:
        replayed = await on_b.next_events(len(missed))
        assert summary(replayed) == missed
        # Then live, through either process, with nothing replayed twice.
        await post(a, 8)
        await post(b, 9)
        live = await on_b.next_events(2)
        assert summary(live) == published[8:]
        await on_b.expect_quiet()
        ids = [event.id for event in on_b.received]
        assert len(set(ids)) == len(ids) == 7
    assert_clean_log(a)
    assert_clean_log(b)


async def test_resume_on_b_while_publishing_goes_on_through_both(
    servers: tuple[ServerProcess, ServerProcess], http: httpx.AsyncClient
) -> None:
    """Gap-free and duplicate-free even when events keep coming during the replay."""
    a, b = servers
    room = "busy"
    total = 80
    published: list[tuple[str, Any]] = []
    progress = anyio.Event()

    async def publisher() -> None:
        nonlocal progress
        for n in range(total):
            via = (a, b)[n % 2]
            data = {"n": n, "via": via.name}
            published.append((await publish(http, via, room, data), data))
            progress.set()
            progress = anyio.Event()
            await anyio.sleep(0.003)

    async def published_at_least(count: int) -> None:
        with anyio.fail_after(TIMEOUT):
            while len(published) < count:
                await progress.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(publisher)
        async with SSEClient.connect(a, room) as on_a:
            before = await on_a.next_events(10)
        await published_at_least(30)
        # Reconnect while the publisher is still going: replay and live overlap.
        async with SSEClient.connect(b, room, last_event_id=before[-1].id) as on_b:
            await published_at_least(total)
            after = await on_b.events_until(published[-1][0])
            await on_b.expect_quiet()

    assert summary(before) == published[:10]
    assert summary(after) == published[10:]
    assert_clean_log(a)
    assert_clean_log(b)


async def test_stream_of_two_groups_moving_from_a_to_b_resumes_each_group_exactly(
    servers: tuple[ServerProcess, ServerProcess], http: httpx.AsyncClient
) -> None:
    """A composite id resumes each group after its own position on the other process,
    while both processes keep publishing to both groups."""
    a, b = servers
    rooms = ("mx", "my")  # groups room:mx and room:my, in that order
    total = 80
    published: dict[str, list[str]] = {room: [] for room in rooms}
    count = 0
    progress = anyio.Event()

    async def publisher() -> None:
        nonlocal progress, count
        for n in range(total):
            via, room = (a, b)[n % 2], rooms[(n // 2) % 2]
            published[room].append(await publish(http, via, room, {"n": n}))
            count += 1
            progress.set()
            progress = anyio.Event()
            await anyio.sleep(0.003)

    async def published_at_least(wanted: int) -> None:
        with anyio.fail_after(TIMEOUT):
            while count < wanted:
                await progress.wait()

    async with anyio.create_task_group() as tg:
        async with SSEClient.connect(a, "mx+my") as on_a:
            tg.start_soon(publisher)
            before = await on_a.next_events(10)
        await published_at_least(30)
        # Reconnect while the publisher is still going: replay and live overlap.
        async with SSEClient.connect(b, "mx+my", last_event_id=before[-1].id) as on_b:
            await published_at_least(total)
            final = ".".join(published[room][-1] for room in rooms)
            after = await on_b.events_until(final)
            await on_b.expect_quiet()

    # The stream started at both groups' heads, before their first event.
    start = ".".join(f"{published[room][0][:8]}-0" for room in rooms)
    moved = steps(start, [event.id or "" for event in before + after])
    got = {
        room: [format_id(*p) for i, p in moved if i == index] for index, room in enumerate(rooms)
    }
    assert got == published
    assert_clean_log(a)
    assert_clean_log(b)


@pytest.mark.parametrize("frozen_first", [False, True], ids=["kill", "stop-then-kill"])
async def test_sigkilled_process_loses_nothing_for_a_client_resuming_on_the_other(
    servers: tuple[ServerProcess, ServerProcess], http: httpx.AsyncClient, frozen_first: bool
) -> None:
    """SIGKILL A mid-stream; the client resumes on B with its last id and misses nothing.

    With `frozen_first`, A is SIGSTOPped (then SIGKILLed) while events keep being
    published through B, so some events certainly reached Redis, and A's socket,
    but never the client through A: only B's replay can deliver them.
    """
    a, b = servers
    room = "crash"
    total = 60
    kill_after = 15
    published: list[tuple[str, Any]] = []
    progress = anyio.Event()

    async def publisher() -> None:
        nonlocal progress
        for n in range(total):
            data = {"n": n}
            published.append((await publish(http, b, room, data), data))
            progress.set()
            progress = anyio.Event()
            await anyio.sleep(0.01)

    async def published_at_least(count: int) -> None:
        with anyio.fail_after(TIMEOUT):
            while len(published) < count:
                await progress.wait()

    async with anyio.create_task_group() as tg:
        async with SSEClient.connect(a, room) as on_a:
            tg.start_soon(publisher)
            await on_a.next_events(kill_after)
            published_while_frozen = 0
            if frozen_first:
                os.killpg(a.proc.pid, signal.SIGSTOP)
                await published_at_least(len(published) + 5)
                published_while_frozen = len(published)
            # SIGKILL A mid-stream: no shutdown, no terminal chunk, events in flight lost.
            os.killpg(a.proc.pid, signal.SIGKILL)
            code = await anyio.to_thread.run_sync(a.proc.wait, TIMEOUT)
            assert code == -signal.SIGKILL
            await on_a.wait_closed()
            assert not on_a.completed, "a SIGKILLed server cannot end the body cleanly"
        from_a = on_a.received
        assert len(from_a) >= kill_after
        if frozen_first:
            # At least 4 events went to Redis after A froze: A never delivered them.
            assert len(from_a) <= published_while_frozen - 4, (len(from_a), published_while_frozen)
        # Publishing goes on (through B) while the client is away.
        await published_at_least(len(from_a) + 10)
        async with SSEClient.connect(b, room, last_event_id=from_a[-1].id) as on_b:
            await published_at_least(total)
            from_b = await on_b.events_until(published[-1][0])
            await on_b.expect_quiet()

    assert summary(from_a) + summary(from_b) == published
    assert_clean_log(b)
