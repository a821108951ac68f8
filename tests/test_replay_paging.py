"""Replay in bounded memory: paged history reads, the replay limiter, and what a burst
of resumes that never read costs a real server.

The stores run against the real services: Redis at 127.0.0.1:6379 and PostgreSQL at
127.0.0.1:5432 (database `test`), plus SQLite files and the memory store.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import psutil
import pytest
from starlette.routing import Route
from support.apps import app_for
from support.broadcast import steps
from support.postgres import PG_URL, drop_tables
from support.processes import clean_env
from support.redis import REDIS_URL, delete_prefix
from support.servers import ServerProcess, start_server, uvicorn

from sseviews import (
    RESET_EVENT,
    BackendError,
    Broadcast,
    DisconnectReason,
    Event,
    EventStreamView,
)
from sseviews.stores.base import Page, Position, parse_cursor, parse_id
from sseviews.stores.memory import MemoryStore
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio

KINDS = ["memory", "redis", "sqlite", "postgresql"]
TIMEOUT = 20.0
REPO = Path(__file__).resolve().parent.parent


@dataclass
class History:
    """One isolated history of a kind: memory, Redis (fused live + history), SQLite, PostgreSQL."""

    kind: str
    tmp_path: Path
    prefix: str

    def broadcast(self, **settings: Any) -> Broadcast:
        if self.kind == "memory":
            return Broadcast("memory://", **settings)
        if self.kind == "redis":
            return Broadcast(REDIS_URL, prefix=self.prefix, **settings)
        if self.kind == "sqlite":
            url = f"sqlite+aiosqlite:///{self.tmp_path / self.prefix}.db"
        else:
            url = PG_URL
        return Broadcast("memory://", history=url, prefix=self.prefix, **settings)


@pytest.fixture(params=KINDS)
async def history(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[History]:
    found = History(request.param, tmp_path, f"t{uuid.uuid4().hex[:12]}")
    yield found
    if found.kind == "redis":
        await delete_prefix(found.prefix)
    elif found.kind == "postgresql":
        await drop_tables(found.prefix)


@asynccontextmanager
async def connected(broadcast: Broadcast) -> AsyncIterator[Broadcast]:
    with anyio.fail_after(10):
        await broadcast.connect()
    try:
        yield broadcast
    finally:
        with anyio.fail_after(10):
            await broadcast.disconnect()


def seq_of(event_id: str | None) -> int:
    assert event_id is not None
    return parse_id(event_id)[1]


# -- the stores' pages ------------------------------------------------------------------


async def test_read_page_pages_cover_the_range_in_seq_order_within_the_bound(
    history: History,
) -> None:
    async with connected(history.broadcast()) as broadcast:
        store = broadcast.store
        with anyio.fail_after(TIMEOUT):
            for number in range(150):
                # Three groups interleaved, events of different sizes.
                await broadcast.publish("abc"[number % 3], "x" * (10 + 7 * (number % 11)))
            head = await store.head("a")
            assert head.seq == 50
            everything = await store.read("a", Position(head.epoch, 0))
            assert everything is not None
            assert [seq for seq, _ in everything] == list(range(1, 51))
            after, upto = everything[3][0], head.seq - 4
            expected = [(seq, wire) for seq, wire in everything if after < seq <= upto]
            largest = max(len(wire) for _, wire in expected)
            limit = 400
            pages: list[Page] = []
            cursor = after
            while cursor < upto:
                page = await store.read_page("a", Position(head.epoch, cursor), upto, limit)
                assert page is not None
                assert page.events, "a page before the end of the range holds an event"
                assert page.end > cursor
                pages.append(page)
                cursor = page.end
        assert len(pages) > 3
        assert cursor == upto
        got = [event for page in pages for event in page.events]
        assert got == expected
        for page in pages:
            size = sum(len(wire) for _, wire in page.events)
            assert size < limit + largest
            assert page.events[-1][0] <= page.end
        # All but the last page are full, and end at their last event.
        assert all(page.end == page.events[-1][0] for page in pages[:-1])
        assert all(sum(len(w) for _, w in page.events) >= limit for page in pages[:-1])


async def test_read_page_of_an_empty_range_or_unknown_group_is_empty(history: History) -> None:
    async with connected(history.broadcast()) as broadcast:
        store = broadcast.store
        with anyio.fail_after(TIMEOUT):
            await broadcast.publish("a", "one")
            head = await store.head("a")
            assert await store.read_page("a", head, head.seq, 100) == Page([], head.seq)
            nope = await store.head("nope")
            assert nope.seq == 0
            assert await store.read_page("nope", nope, 0, 100) == Page([], 0)


async def test_read_page_of_an_expired_cursor_or_another_epoch_is_none(history: History) -> None:
    async with connected(history.broadcast(retention=5)) as broadcast:
        store = broadcast.store
        with anyio.fail_after(TIMEOUT):
            ids = [await broadcast.publish("a", f"n{number}") for number in range(10)]
            head = await store.head("a")
            assert await store.read_page("a", Position(head.epoch, 0), head.seq, 10_000) is None
            foreign = "00000000" if head.epoch != "00000000" else "11111111"
            after = Position(foreign, seq_of(ids[4]))
            assert await store.read_page("a", after, head.seq, 10_000) is None
            page = await store.read_page("a", Position(*parse_id(ids[4])), head.seq, 10_000)
        assert page is not None
        assert [seq for seq, _ in page.events] == [seq_of(i) for i in ids[5:]]


# -- a paged resume -----------------------------------------------------------------------


async def test_paged_resume_is_gap_free_and_duplicate_free_while_publishing(
    history: History,
) -> None:
    page_bytes = 600
    async with connected(history.broadcast(replay_page_bytes=page_bytes)) as broadcast:
        with anyio.fail_after(TIMEOUT):
            published = {"a": 0, "b": 0, "c": 0}

            async def publish(number: int, group: str, data: str) -> None:
                await broadcast.publish(group, data)
                published[group] += 1

            cursor = ""
            for number in range(240):
                group = "ab"[number % 2] if number % 5 else "c"
                await publish(number, group, f"{number:04d}" + "y" * 60)
                if number == 9:
                    cursor = await broadcast.last_id("a", "b")
            ids: list[str] = []
            largest_backlog = 0
            saw_pending = False

            async def keep_publishing() -> None:
                for number in range(150):
                    await publish(number, "abc"[number % 3], f"live {number}")
                    if number % 4 == 0:
                        await anyio.sleep(0.001)
                await publish(0, "b", "end")

            async with (
                broadcast.subscribe("a", "b", last_event_id=cursor) as subscription,
                anyio.create_task_group() as tasks,
            ):
                tasks.start_soon(keep_publishing)
                event = Event("")
                while event.data != "end":
                    held = sum(len(wire) for wire in subscription._backlog)
                    largest_backlog = max(largest_backlog, held)
                    saw_pending = saw_pending or subscription.pending_history
                    event = await subscription.__anext__()
                    assert event.id is not None
                    ids.append(event.id)
        # Per group: in order, nothing missing, nothing twice.
        moved = steps(cursor, ids)
        start = parse_cursor(cursor)
        for index, group in enumerate("ab"):
            seqs = [p.seq for i, p in moved if i == index]
            assert seqs == list(range(start[index].seq + 1, published[group] + 1))
        assert len(ids) > 250
        assert saw_pending, "the replay was read in more than one page"
        # The subscription never held more than one page (plus the event that filled it).
        assert largest_backlog < page_bytes + 200


async def test_paged_resume_of_a_view_is_gap_free_while_publishing(history: History) -> None:
    broadcast = history.broadcast(replay_page_bytes=500)
    view = type(
        "Room",
        (EventStreamView,),
        {"broadcast": broadcast, "groups": ["a", "b"], "ping_interval": None},
    )

    app = app_for(broadcast, Route("/room", view))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        with anyio.fail_after(TIMEOUT):
            for n in range(3):
                await broadcast.publish("ab"[n % 2], "z" * 50)
            cursor = await broadcast.last_id("a", "b")
            for n in range(3, 200):
                await broadcast.publish("ab"[n % 2], "z" * 50)
            async with client.stream("/room", headers={"Last-Event-ID": cursor}) as stream:
                for number in range(60):
                    await broadcast.publish("ab"[number % 2], "live")
                    await broadcast.publish("c", "elsewhere")
                got = [(await stream.next_event()).id or "" for _ in range(197 + 60)]
            end = await broadcast.last_id("a", "b")
    moved = steps(cursor, got)
    assert got[-1] == end
    # a had 2 events before the cursor, b 1; then 129 and 128 more.
    assert [p.seq for i, p in moved if i == 0] == list(range(3, 131))
    assert [p.seq for i, p in moved if i == 1] == list(range(2, 131))


async def test_paged_replay_overtaken_by_retention_gets_reset_then_live() -> None:
    broadcast = Broadcast("memory://", retention=20, replay_page_bytes=100)
    async with connected(broadcast):
        with anyio.fail_after(TIMEOUT):
            ids = [await broadcast.publish("a", f"{n:03d}" + "w" * 40) for n in range(20)]
            async with broadcast.subscribe("a", last_event_id=ids[0]) as subscription:
                first = await subscription.__anext__()
                # Retention drops events the replay has not reached yet.
                for n in range(30):
                    await broadcast.publish("a", f"more {n}")
                events: list[Event] = [first]
                while events[-1].event != RESET_EVENT:
                    events.append(await subscription.__anext__())
                reset = events[-1]
                live = await broadcast.publish("a", "after the reset")
                after_reset = await subscription.__anext__()
        replayed = [seq_of(e.id) for e in events[:-1]]
        assert replayed == [seq_of(i) for i in ids[1 : 1 + len(replayed)]]
        assert len(replayed) < 19
        assert reset.json()["reason"] == "expired"
        assert seq_of(reset.id) == 50
        assert after_reset.id == live


class FailingStore(MemoryStore):
    """A memory store whose page reads fail after the first `good` ones."""

    def __init__(self, good: int, **settings: Any) -> None:
        super().__init__(**settings)
        self.good = good

    async def read_page(
        self, group: str, after: Position, upto: int, limit_bytes: int
    ) -> Page | None:
        if self.good == 0:
            raise BackendError("the history went away")
        self.good -= 1
        return await super().read_page(group, after, upto, limit_bytes)


async def test_paged_replay_backend_error_ends_the_subscription() -> None:
    broadcast = Broadcast("memory://", history=FailingStore(1), replay_page_bytes=100)
    async with connected(broadcast):
        with anyio.fail_after(TIMEOUT):
            ids = [await broadcast.publish("a", "v" * 50) for _ in range(10)]
            got: list[str | None] = []
            with pytest.raises(BackendError, match="went away"):
                async with broadcast.subscribe("a", last_event_id=ids[0]) as subscription:
                    async for event in subscription:
                        got.append(event.id)
        assert got == ids[1:3]  # the first page, then the failure


async def test_paged_replay_backend_error_ends_the_view_stream_with_error() -> None:
    broadcast = Broadcast("memory://", history=FailingStore(1), replay_page_bytes=100)
    reasons: list[DisconnectReason] = []
    ended = anyio.Event()

    class Room(EventStreamView):
        groups = ("a",)
        ping_interval = None

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            reasons.append(reason)
            ended.set()

    Room.broadcast = broadcast

    app = app_for(broadcast, Route("/room", Room))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        with anyio.fail_after(TIMEOUT):
            ids = [await broadcast.publish("a", "v" * 50) for _ in range(10)]
            async with client.stream("/room", headers={"Last-Event-ID": ids[0]}) as stream:
                got = [event.id async for event in stream]
            await ended.wait()
    assert got == ids[1:3]
    assert reasons == [DisconnectReason.ERROR]


# -- the replay limiter -----------------------------------------------------------------


class CountingStore(MemoryStore):
    """A memory store that counts the page reads running at once, each taking a while."""

    def __init__(self) -> None:
        super().__init__()
        self.running = 0
        self.most = 0
        self.reads = 0

    async def read_page(
        self, group: str, after: Position, upto: int, limit_bytes: int
    ) -> Page | None:
        self.running += 1
        self.reads += 1
        self.most = max(self.most, self.running)
        try:
            await anyio.sleep(0.01)
            return await super().read_page(group, after, upto, limit_bytes)
        finally:
            self.running -= 1


async def test_max_concurrent_replays_bounds_the_page_reads_running_at_once() -> None:
    store = CountingStore()
    broadcast = Broadcast(
        "memory://", history=store, max_concurrent_replays=2, replay_page_bytes=200
    )
    async with connected(broadcast):
        with anyio.fail_after(TIMEOUT):
            ids = [await broadcast.publish("a", "u" * 60) for _ in range(30)]
            results: dict[int, list[str | None]] = {}

            async def resume(number: int) -> None:
                # Each from its own id: resumes from the same one share their reads.
                got: list[str | None] = []
                start = ids[number]
                async with broadcast.subscribe("a", last_event_id=start) as subscription:
                    while len(got) < 29 - number:
                        got.append((await subscription.__anext__()).id)
                results[number] = got

            async with anyio.create_task_group() as tasks:
                for number in range(8):
                    tasks.start_soon(resume, number)
    assert store.most == 2
    assert store.reads >= 10  # many pages read, two at a time at most
    assert all(got == ids[number + 1 :] for number, got in results.items())
    assert len(results) == 8


async def test_resumes_from_one_id_share_their_page_reads() -> None:
    store = CountingStore()
    broadcast = Broadcast("memory://", history=store, replay_page_bytes=200)
    async with connected(broadcast):
        with anyio.fail_after(TIMEOUT):
            ids = [await broadcast.publish("a", "u" * 60) for _ in range(30)]
            results: list[list[str | None]] = []

            async def resume() -> None:
                got: list[str | None] = []
                async with broadcast.subscribe("a", last_event_id=ids[0]) as subscription:
                    while len(got) < 29:
                        got.append((await subscription.__anext__()).id)
                results.append(got)

            async with anyio.create_task_group() as tasks:
                for _ in range(8):
                    tasks.start_soon(resume)
    assert results == [ids[1:]] * 8
    # 29 events of about 70 bytes in pages of 200: 10 pages, read once for all 8.
    assert store.reads < 8 * 5


def test_broadcast_replay_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_concurrent_replays must be an int >= 1"):
        Broadcast("memory://", max_concurrent_replays=0)
    with pytest.raises(ValueError, match="replay_page_bytes must be an int >= 1"):
        Broadcast("memory://", replay_page_bytes=1.5)  # type: ignore[arg-type]


# -- memory of a burst of resumes that never read, on a real server ---------------------

# 1000 events of 8400 bytes: the default retention of one group holds all of them.
EVENTS = 1000
EVENT_BYTES = 8400
HISTORY_BYTES = EVENTS * EVENT_BYTES
CLIENTS = 50
MAX_BUFFER_BYTES = 1024 * 1024  # EventStreamView.max_buffer_bytes
PAGE_BYTES = 256 * 1024  # sseviews._broadcast.REPLAY_PAGE_BYTES


@pytest.fixture
def replay_server(
    request: pytest.FixtureRequest, tmp_path: Path, history: History
) -> Iterator[tuple[ServerProcess, History]]:
    env = clean_env(PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    env["SSEVIEWS_REPLAY_PREFIX"] = history.prefix
    if history.kind == "redis":
        env["SSEVIEWS_REPLAY_BROADCAST"] = REDIS_URL
    elif history.kind == "postgresql":
        env["SSEVIEWS_REPLAY_HISTORY"] = PG_URL
    elif history.kind == "sqlite":
        env["SSEVIEWS_REPLAY_HISTORY"] = f"sqlite+aiosqlite:///{tmp_path / history.prefix}.db"
    command = uvicorn("tests.apps.replay_app:app", "--http", "httptools", "--no-access-log")
    with start_server(command, tmp_path, env) as server:
        yield server, history


def stalled_client(port: int, last_event_id: str) -> socket.socket:
    """Open `/big` resuming from `last_event_id`, with a small receive buffer, never reading."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        b"GET /big HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n"
        b"Last-Event-ID: " + last_event_id.encode() + b"\r\n\r\n"
    )
    return sock


def read_until(sock: socket.socket, marker: bytes, seconds: float) -> bytes:
    """Read from `sock` until `marker` arrives; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    sock.settimeout(1.0)
    chunks: list[bytes] = []
    tail = b""
    while marker not in tail:
        assert time.monotonic() < deadline, f"{marker!r} did not arrive in {seconds}s"
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            continue
        assert chunk, f"the stream ended before {marker!r}"
        chunks.append(chunk)
        tail = tail[-len(marker) :] + chunk
    return b"".join(chunks)


def rss_of(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


@pytest.mark.slow
@pytest.mark.parametrize("history", ["memory", "redis", "postgresql"], indirect=True)
async def test_replay_memory_of_50_stalled_resumes_of_an_8_mb_history(
    replay_server: tuple[ServerProcess, History],
) -> None:
    server, history = replay_server
    async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as http:
        with anyio.fail_after(40):
            health = (await http.get("/health")).json()
            pid, epoch = health["pid"], health["epoch"]
            reply = await http.post("/fill", params={"count": EVENTS, "size": EVENT_BYTES})
            assert reply.status_code == 200, server.log()
            last = reply.json()["last"]
            # Settle, then the idle level: the history is stored, nobody streams it.
            await anyio.sleep(0.5)
            idle = rss_of(pid)
            started = time.monotonic()
            clients = [stalled_client(server.port, f"{epoch}-0") for _ in range(CLIENTS)]
            try:
                for _ in range(200):
                    if (await http.get("/debug")).json()["subscribers"] == CLIENTS:
                        break
                    await anyio.sleep(0.05)
                else:
                    pytest.fail(f"{CLIENTS} streams did not start:\n{server.log()}")
                # Every stream resumes; each writes until the socket's buffers are full.
                peak = idle
                for _ in range(30):
                    await anyio.sleep(0.1)
                    peak = max(peak, rss_of(pid))
                attached = time.monotonic() - started
                # The streams do replay: one client reads its whole replay, page after page.
                body = read_until(clients[0], f"id: {last}\n".encode(), seconds=15)
            finally:
                for sock in clients:
                    sock.close()
    assert f"id: {epoch}-1\n".encode() in body
    assert RESET_EVENT.encode() not in body
    assert body.count(b"\nid: ") + body.startswith(b"id: ") >= EVENTS - 1
    growth = peak - idle
    bound = CLIENTS * (MAX_BUFFER_BYTES + PAGE_BYTES)
    print(
        f"\nreplay RSS [{history.kind}]: idle {idle / 2**20:.1f} MiB, "
        f"peak {peak / 2**20:.1f} MiB, +{growth / 2**20:.1f} MiB over idle with "
        f"{CLIENTS} stalled resumes of a {HISTORY_BYTES / 2**20:.0f} MiB history "
        f"(bound {bound / 2**20:.0f} MiB; measured for {attached:.1f} s)"
    )
    assert growth < 80 * 2**20
    assert growth < bound
