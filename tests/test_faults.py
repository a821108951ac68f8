"""Faults against a real uvicorn, in a subprocess, on loopback: half-open clients, and
Redis or PostgreSQL lost mid-stream.

The app under test is `tests/apps/hostile_app.py`; the broadcast it streams is
configured from the environment (`memory://`, a `redis-server` of the test's own,
or a PostgreSQL history). The test reads what happened to each stream (and why it
ended) from the app's `GET /debug?id=<tag>`.

The bounds, and what they are measured from:

- A client that stops reading while events flow is dropped `send_timeout` after
  the write that blocked (the app records when its last event was taken).
- A client that vanishes from an idle stream is noticed only by the pings, and
  only once the socket's buffers are full: then the next ping blocks for
  `send_timeout`. With pings larger than those buffers the bound is
  `ping_interval + send_timeout + 1 s` from the moment the client went silent.
- Redis killed: every open stream ends cleanly (terminal chunk) within 3 s;
  publishing answers 503 at once; after a restart on the same port new streams
  are served again within a few seconds (the backend reconnects with backoff).
- PostgreSQL connections terminated: each publish answers (200, or 503) within
  5 s, and a client resuming from its `Last-Event-ID` gets every stored event.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import psutil
import pytest
from support.postgres import PG_DSN, PG_URL, drop_tables
from support.processes import clean_env, free_port
from support.raw import RawConnection
from support.redis import RedisServer, unique_prefix
from support.servers import ServerProcess, start_server, uvicorn

from sseviews import RESET_EVENT, Event
from sseviews.testing import EventParser

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

REPO = Path(__file__).resolve().parent.parent
APP = "tests.apps.hostile_app:app"
UVICORN = uvicorn(APP, "--http", "httptools")
HOST = "127.0.0.1"
#: Bound on any single answer or event.
TIMEOUT = 5.0
#: The settings of FloodView and VanishView in the app.
SEND_TIMEOUT = 1.0
PING_INTERVAL = 0.5


# -- the server process -----------------------------------------------------------


async def records_of(
    http: httpx.AsyncClient, server: ServerProcess, tag: str
) -> list[dict[str, Any]]:
    """What the app recorded about the streams tagged `tag`."""
    with anyio.fail_after(TIMEOUT):
        response = await http.get(f"{server.base_url}/debug", params={"id": tag})
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["records"]
    return found


async def wait_record(
    http: httpx.AsyncClient, server: ServerProcess, tag: str, kind: str
) -> dict[str, Any]:
    """The first `kind` record of stream `tag`, once there is one (callers bound the wait)."""
    while True:
        for record in await records_of(http, server, tag):
            if record["kind"] == kind:
                return record
        await anyio.sleep(0.02)


async def publish(
    http: httpx.AsyncClient, server: ServerProcess, room: str, data: Any
) -> httpx.Response:
    with anyio.fail_after(TIMEOUT):
        return await http.post(f"{server.base_url}/rooms/{room}", json=data)


def sseviews_lines(server: ServerProcess, client_port: int) -> list[str]:
    who = f"({HOST}:{client_port})"
    return [
        line for line in server.log().splitlines() if line.startswith("sseviews ") and who in line
    ]


def seq_of(event_id: str | None) -> int:
    assert event_id is not None
    return int(event_id.rsplit("-", 1)[1])


# -- a raw HTTP/1.1 client ----------------------------------------------------------


def get(path: str, *, last_event_id: str | None = None) -> bytes:
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/event-stream\r\n"
    if last_event_id is not None:
        request += f"Last-Event-ID: {last_event_id}\r\n"
    return (request + "\r\n").encode()


class SSEStream:
    """One event stream over a `RawConnection`, parsed as a browser would."""

    def __init__(self, conn: RawConnection) -> None:
        self.conn = conn
        self.parser = EventParser()
        self.ready: list[Event] = []
        self.received: list[Event] = []
        self.ended = False  # the terminal chunk came: a clean end

    @classmethod
    async def open(
        cls, server: ServerProcess, path: str, *, last_event_id: str | None = None
    ) -> SSEStream:
        with anyio.fail_after(TIMEOUT):
            conn = await RawConnection.connect(server.port, read_size=1 << 20)
            try:
                await conn.send(get(path, last_event_id=last_event_id))
                head = await conn.read_head()
                assert head.status == 200, head
                assert head.headers["content-type"] == "text/event-stream; charset=utf-8"
            except BaseException:
                conn.close()
                raise
        return cls(conn)

    async def next_event(self) -> Event | None:
        """The next event; None once the stream has ended (callers bound the wait)."""
        while not self.ready:
            if self.ended:
                return None
            chunk = await self.conn.read_chunk()
            if not chunk:
                self.ended = True
            events = self.parser.feed(chunk)
            self.ready += events
            self.received += events
        return self.ready.pop(0)

    async def events_until(self, last_id: str) -> list[Event]:
        """Events up to and including `last_id`."""
        events: list[Event] = []
        with anyio.fail_after(TIMEOUT):
            while not events or events[-1].id != last_id:
                event = await self.next_event()
                assert event is not None, f"the stream ended before {last_id}: {events}"
                assert seq_of(event.id) <= seq_of(last_id), (event.id, last_id)
                events.append(event)
        return events

    def close(self) -> None:
        self.conn.close()


# -- half-open clients --------------------------------------------------------------------


async def test_fault_client_that_stops_reading_is_dropped_by_send_timeout(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """8 KiB every 5 ms to a client that never reads (4 KiB receive buffer): once the
    socket is full, the blocked write is given up after send_timeout (1 s)."""
    with start_server(UVICORN, tmp_path, clean_env(PYTHONPATH=str(REPO))) as server:
        tag = "stalled"
        connected = time.time()
        stalled = await RawConnection.connect(server.port, rcvbuf=4096, read_size=1 << 20)
        try:
            await stalled.send(get(f"/flood?id={tag}"))
            with anyio.fail_after(15):
                disconnect = await wait_record(http, server, tag, "disconnect")
            client_port = stalled.local_port
        finally:
            stalled.close()
        [closing] = [r for r in await records_of(http, server, tag) if r["kind"] == "finally"]

        assert disconnect["reason"] == "send_timeout"
        # The last event events() could hand over marks the write that blocked (the
        # writer takes no more than 64 KiB = 8 events, 40 ms, after it).
        stalled_for = disconnect["t"] - closing["last_yield"]
        assert SEND_TIMEOUT - 0.1 <= stalled_for <= SEND_TIMEOUT + 1.0, stalled_for
        assert any(
            "stream ended (send_timeout)" in line for line in sseviews_lines(server, client_port)
        )
        print(
            f"\nFIGURE stopped reading: dropped {stalled_for:.2f}s after the write blocked "
            f"({disconnect['t'] - connected:.2f}s after connecting, "
            f"{closing['sent'] * 8} KiB absorbed by the socket buffers first)"
        )
        # A reading client is served as before.
        stream = await SSEStream.open(server, "/ticks?id=after-stall")
        try:
            with anyio.fail_after(TIMEOUT):
                events = [await stream.next_event() for _ in range(3)]
        finally:
            stream.close()
        assert [event.id for event in events if event] == ["0", "1", "2"]


def _kernel_send_buffer_max() -> int:
    """The most a TCP socket may buffer for sending (Linux: tcp_wmem's maximum)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 * 1024 * 1024


async def test_fault_vanished_client_is_dropped_by_ping_write_timeout(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A client that vanished (simulated: it stops reading and never closes, so no FIN
    reaches the server) on an idle stream is dropped by the ping that cannot be written.

    A ping blocks only when the socket's buffers are full. On loopback the kernel
    grows the send buffer up to tcp_wmem's maximum (4 MiB here): 64 KiB pings every
    0.5 s were still absorbed after 16 s. So the pings here are larger than that
    buffer. uvicorn's send() waits for its transport to drain before it writes, not
    after: the first ping (at ping_interval) overfills the buffers and returns, the
    second (at 2 x ping_interval) blocks, and send_timeout drops the client 1 s later,
    2.0 s after it went silent. The bound asserted: ping_interval + send_timeout + 1 s.
    """
    ping_bytes = min(_kernel_send_buffer_max() + 1024 * 1024, 64 * 1024 * 1024)
    bound = PING_INTERVAL + SEND_TIMEOUT + 1.0
    with start_server(UVICORN, tmp_path, clean_env(PYTHONPATH=str(REPO))) as server:
        vanished = await RawConnection.connect(server.port, rcvbuf=4096, read_size=1 << 20)
        # The same view, with a client that reads: the big pings alone drop nobody.
        reader = await RawConnection.connect(server.port, read_size=1 << 20)
        try:
            await reader.send(get(f"/vanish?id=reader&ping_bytes={ping_bytes}"))
            await vanished.send(get(f"/vanish?id=vanished&ping_bytes={ping_bytes}"))
            with anyio.fail_after(TIMEOUT):
                await vanished.read_head()
            silent_since = time.time()  # from now on it reads nothing, and stays open
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader.drain)
                with anyio.fail_after(bound + 3):
                    disconnect = await wait_record(http, server, "vanished", "disconnect")
                reader_records = await records_of(http, server, "reader")
                tg.cancel_scope.cancel()
            client_port = vanished.local_port
        finally:
            vanished.close()
            reader.close()

        records = await records_of(http, server, "vanished")
        dropped_after = disconnect["t"] - silent_since
        pings = [r for r in records if r["kind"] == "ping" and r["t"] < disconnect["t"]]
        assert disconnect["reason"] == "send_timeout", records
        assert dropped_after <= bound, (dropped_after, records)
        assert pings, "no ping was attempted before the drop"
        assert disconnect["t"] - pings[-1]["t"] >= SEND_TIMEOUT - 0.1
        assert any(
            "stream ended (send_timeout)" in line for line in sseviews_lines(server, client_port)
        )
        # The reading client got whole pings and was still open when the other was dropped.
        assert "disconnect" not in [r["kind"] for r in reader_records], reader_records
        assert reader.received >= ping_bytes
        print(
            f"\nFIGURE vanished client: {ping_bytes // 1024} KiB pings every {PING_INTERVAL}s, "
            f"dropped {dropped_after:.2f}s after going silent "
            f"({len(pings)} ping(s) attempted; bound {bound:.1f}s)"
        )


# -- Redis lost mid-stream ------------------------------------------------------------------


async def test_fault_redis_killed_and_restarted_mid_stream(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    redis_server = RedisServer(free_port())
    redis_server.start()
    try:
        env = clean_env(
            PYTHONPATH=str(REPO),
            SSEVIEWS_FAULT_BROADCAST=redis_server.url,
            SSEVIEWS_FAULT_PREFIX=unique_prefix(),
        )
        with start_server(UVICORN, tmp_path, env) as server:
            stream = await SSEStream.open(server, "/rooms/r?id=before")
            try:
                response = await publish(http, server, "r", {"n": 0})
                assert response.status_code == 200, response.text
                first_id = response.json()["id"]
                with anyio.fail_after(TIMEOUT):
                    event = await stream.next_event()
                assert event is not None and (event.id, event.json()) == (first_id, {"n": 0})

                # SIGKILL Redis: the open stream ends cleanly, on an event boundary.
                redis_server.kill()
                killed = time.monotonic()
                with anyio.fail_after(3):
                    assert await stream.next_event() is None
                ended_in = time.monotonic() - killed
            finally:
                stream.close()
            assert stream.ended and stream.parser.retry == 100
            with anyio.fail_after(TIMEOUT):
                disconnect = await wait_record(http, server, "before", "disconnect")
            assert disconnect["reason"] == "error"

            # While Redis is down, publishing fails at once with 503 (BackendError).
            asked = time.monotonic()
            response = await publish(http, server, "r", {"n": "lost"})
            refused_in = time.monotonic() - asked
            assert response.status_code == 503, response.text
            assert refused_in < 2.0
            # ... and a new stream is answered 200 and ended at once: EventSource retries.
            down = await SSEStream.open(server, "/rooms/r?id=while-down")
            try:
                with anyio.fail_after(2):
                    assert await down.next_event() is None
            finally:
                down.close()
            assert down.ended and down.received == []
            # Down long enough for the backend's reconnection backoff to grow (0.1 s,
            # doubling, at most 2 s between attempts).
            await anyio.sleep(1.5)

            # Redis back on the same port (empty: no persistence).
            redis_server.start()
            restarted = time.monotonic()
            attempts = 0
            with anyio.fail_after(10):
                while True:
                    attempts += 1
                    live = await SSEStream.open(server, f"/rooms/r?id=after-{attempts}")
                    try:
                        response = await publish(http, server, "r", {"n": attempts})
                        if response.status_code == 200:
                            event = await live.next_event()
                            if event is not None:
                                break
                    finally:
                        live.close()
                    await anyio.sleep(0.1)
            back_in = time.monotonic() - restarted
            assert (event.id, event.json()) == (response.json()["id"], {"n": attempts})
            assert back_in < 5.0

            # The history died with Redis: the old id gets a reset event, then live events.
            resumed = await SSEStream.open(server, "/rooms/r?id=resumed", last_event_id=first_id)
            try:
                with anyio.fail_after(TIMEOUT):
                    reset = await resumed.next_event()
                    assert reset is not None and reset.event == RESET_EVENT
                    assert reset.json()["reason"] == "unknown_epoch"
                    response = await publish(http, server, "r", {"n": "after-reset"})
                    assert response.status_code == 200, response.text
                    event = await resumed.next_event()
            finally:
                resumed.close()
            assert event is not None and event.json() == {"n": "after-reset"}
            assert seq_of(event.id) > seq_of(reset.id)

            log = server.log()
            assert "Traceback" not in log, log
            assert "lost the subscription to Redis" in log
            assert "subscribed again to Redis" in log
            print(
                f"\nFIGURE Redis SIGKILL: stream ended in {ended_in * 1000:.0f} ms; publish "
                f"refused (503) in {refused_in * 1000:.0f} ms; after restart, a stream got a "
                f"new event {back_in:.2f}s later ({attempts} attempt(s))"
            )
    finally:
        redis_server.kill()


# -- PostgreSQL lost mid-stream -------------------------------------------------------------


async def _terminate_app_connections(server: ServerProcess) -> int:
    """pg_terminate_backend() every PostgreSQL session of the server process."""
    ports = [
        conn.laddr.port
        for conn in psutil.Process(server.proc.pid).net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == 5432
    ]
    if not ports:
        return 0
    db = await asyncpg.connect(PG_DSN, timeout=TIMEOUT)
    try:
        rows = await db.fetch(
            "SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity "
            "WHERE client_port = ANY($1::int[]) AND pid <> pg_backend_pid()",
            ports,
            timeout=TIMEOUT,
        )
    finally:
        await db.close()
    return sum(1 for row in rows if row["done"])


async def _stored_ids(prefix: str, group: str, after: int) -> list[int]:
    db = await asyncpg.connect(PG_DSN, timeout=TIMEOUT)
    try:
        rows = await db.fetch(
            f'SELECT seq FROM "{prefix}_v2_events" WHERE grp = $1 AND seq > $2 ORDER BY seq',
            group,
            after,
            timeout=TIMEOUT,
        )
    finally:
        await db.close()
    return [int(row["seq"]) for row in rows]


async def test_fault_postgres_connections_terminated_mid_stream(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    prefix = f"sseviews_fault_{uuid.uuid4().hex[:16]}"
    room = "pg"
    acked: list[str] = []  # ids of the publishes answered 200, in order
    statuses: dict[int, int] = {}
    slowest = 0.0
    terminated = 0

    async def post(n: int) -> None:
        nonlocal slowest
        started = time.monotonic()
        response = await publish(http, server, room, {"n": n})  # bounded: never hangs
        slowest = max(slowest, time.monotonic() - started)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code in (200, 503), response.text
        if response.status_code == 200:
            acked.append(response.json()["id"])

    try:
        env = clean_env(
            PYTHONPATH=str(REPO), SSEVIEWS_FAULT_HISTORY=PG_URL, SSEVIEWS_FAULT_PREFIX=prefix
        )
        with start_server(UVICORN, tmp_path, env) as server:
            first = await SSEStream.open(server, f"/rooms/{room}?id=first")
            try:
                for n in range(5):
                    await post(n)
                assert statuses == {200: 5}
                terminated += await _terminate_app_connections(server)
                assert terminated >= 1, "the app held no PostgreSQL connection"
                # The pool notices the dead connections (pre-ping) and replaces them.
                for n in range(5, 10):
                    await post(n)
                assert statuses == {200: 10}, statuses

                # Terminate again and again while publishes are in flight.
                publishing = True
                async with anyio.create_task_group() as tg:

                    async def publisher() -> None:
                        nonlocal publishing
                        for n in range(10, 50):
                            await post(n)
                        publishing = False

                    tg.start_soon(publisher)
                    while publishing:
                        terminated += await _terminate_app_connections(server)
                        await anyio.sleep(0.005)
                live = await first.events_until(acked[-1])
            finally:
                first.close()
            # Live: exactly what was stored (the stream started before the first
            # publish), so in order, no duplicate, nothing acknowledged missing.
            live_ids = [event.id for event in live]
            assert set(acked) <= set(live_ids), sorted(set(acked) - set(live_ids))
            stored = await _stored_ids(prefix, f"room:{room}", 0)
            assert [seq_of(i) for i in live_ids] == stored, (live_ids, stored)

            # The client left after the 20th event; 10 more are published (and the
            # connections terminated once more) before it comes back.
            left_at = live_ids[19]
            terminated += await _terminate_app_connections(server)
            for n in range(50, 60):
                await post(n)
            resumed = await SSEStream.open(
                server, f"/rooms/{room}?id=resumed", last_event_id=left_at
            )
            try:
                replay = await resumed.events_until(acked[-1])
                response = await publish(http, server, room, {"n": 60})
                assert response.status_code == 200, response.text
                with anyio.fail_after(TIMEOUT):
                    tail = await resumed.next_event()
            finally:
                resumed.close()
            assert tail is not None
            assert (tail.id, tail.json()) == (response.json()["id"], {"n": 60})
            # Gap-free: every event stored after the cursor, once, in order, then live.
            stored = await _stored_ids(prefix, f"room:{room}", seq_of(left_at))
            assert [seq_of(event.id) for event in [*replay, tail]] == stored
            assert {seq_of(i) for i in acked if seq_of(i) > seq_of(left_at)} <= set(stored)

            log = server.log()
            assert "Traceback" not in log, log
            print(
                f"\nFIGURE PostgreSQL: {terminated} sessions terminated mid-stream; "
                f"publishes {statuses}; slowest answer {slowest * 1000:.0f} ms; "
                f"replay of {len(replay)} events after {left_at} gap-free"
            )
    finally:
        await drop_tables(prefix)
