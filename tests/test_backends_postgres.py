"""PostgresBackend: live delivery with LISTEN/NOTIFY on the machine's PostgreSQL.

Two broadcasts (or backends), each with connections of its own, stand for two
processes; the last test runs two real uvicorns. What PostgreSQL sees is read from
the listening connection itself (`pg_listening_channels()`) and `pg_stat_activity`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import anyio
import anyio.lowlevel
import asyncpg
import httpx
import pytest
from process_helpers import free_port
from test_backends_redis import Recorder

from sseviews import BackendError, Broadcast
from sseviews.backends.postgres import PostgresBackend, channel_name, history_url
from sseviews.stores.sqlalchemy import SQLAlchemyStore

pytestmark = pytest.mark.anyio

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@asynccontextmanager
async def connected_backend(
    prefix: str, *, url: str = PG_URL, linger: float = 1.5, **kwargs: str
) -> AsyncIterator[tuple[PostgresBackend, Recorder]]:
    backend = PostgresBackend(url, prefix=prefix, **kwargs)
    backend.unsubscribe_linger = linger
    recorder = Recorder()
    await backend.connect(recorder.dispatch, recorder.on_failure)
    try:
        yield backend, recorder
    finally:
        await backend.disconnect()


async def listening_channels(backend: PostgresBackend) -> set[str]:
    """What PostgreSQL says the backend's listening connection LISTENs to."""
    while True:
        link = backend._link
        assert link is not None
        try:
            rows = await link.conn.fetch("SELECT pg_listening_channels() AS name")
        except asyncpg.InterfaceError:
            # The backend's writer is running a LISTEN on it right now.
            await anyio.sleep(0.01)
            continue
        return {row["name"] for row in rows}


async def listener_pids(prefix: str) -> list[int]:
    conn = await asyncpg.connect(PG_DSN)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            f"sseviews listen {prefix}",
        )
    finally:
        await conn.close()
    return [row["pid"] for row in rows]


async def terminate_listeners(prefix: str) -> int:
    conn = await asyncpg.connect(PG_DSN)
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity "
            "WHERE application_name = $1",
            f"sseviews listen {prefix}",
        )
    finally:
        await conn.close()
    return sum(1 for row in rows if row["done"])


def wire(seq: int, text: str) -> bytes:
    return f"id: e-{seq}\ndata: {text}\n\n".encode()


# -- names and URLs -------------------------------------------------------------------


def test_channel_name_fits_63_bytes_and_keeps_groups_apart() -> None:
    assert channel_name("app", "room:1") == "app:room:1"
    long_a, long_b = "é" * 100, "é" * 99 + "e"
    assert len(channel_name("a" * 40, long_a).encode()) <= 63
    assert channel_name("app", long_a) != channel_name("app", long_b)
    assert channel_name("app", long_a).startswith("app#")


def test_postgres_backend_rejects_bad_urls_and_prefixes() -> None:
    with pytest.raises(ValueError, match="postgresql"):
        PostgresBackend("mysql://x/y")
    with pytest.raises(ValueError, match="listen_url"):
        PostgresBackend(PG_URL, listen_url="redis://localhost")
    with pytest.raises(ValueError, match="prefix"):
        PostgresBackend(PG_URL, prefix="a:b")
    with pytest.raises(ValueError, match="not both"):
        PostgresBackend(f"{PG_URL}?listen_url={PG_DSN}", listen_url=PG_DSN)


def test_broadcast_url_with_another_postgres_driver_says_asyncpg() -> None:
    with pytest.raises(ValueError, match=r"postgresql\+asyncpg:// URL \(live delivery"):
        Broadcast("postgresql+psycopg://app@db/app")


def test_broadcast_url_selects_postgres_for_live_and_history() -> None:
    broadcast = Broadcast(PG_URL, prefix="sel")
    assert isinstance(broadcast.live, PostgresBackend)
    assert broadcast.live._listen_dsn == broadcast.live._dsn == PG_DSN
    assert isinstance(broadcast.store, SQLAlchemyStore)
    assert history_url(PG_URL) == PG_URL


def test_broadcast_url_listen_url_parameter_serves_listening_and_history() -> None:
    pooled = "postgresql+asyncpg://postgres@127.0.0.1:6432/test?ssl=disable"
    direct = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    url = f"{pooled.replace('?', '?listen_url=' + direct + '&')}"
    broadcast = Broadcast(url, prefix="sel")
    assert isinstance(broadcast.live, PostgresBackend)
    assert broadcast.live._dsn == "postgresql://postgres@127.0.0.1:6432/test?ssl=disable"
    assert broadcast.live._listen_dsn == PG_DSN
    # The history needs a connection that keeps its session: the direct one.
    assert history_url(url) == direct


# -- live delivery ------------------------------------------------------------------------


async def test_postgres_backend_listens_only_to_its_own_groups(pg_prefix: str) -> None:
    async with (
        connected_backend(pg_prefix, linger=0.2) as (one, got_one),
        connected_backend(pg_prefix, linger=0.2) as (two, got_two),
    ):
        with anyio.fail_after(10):
            await one.subscribe(["a", "b"])
            await two.subscribe(["b", "c"])
            assert await listening_channels(one) == {f"{pg_prefix}:a", f"{pg_prefix}:b"}
            assert await listening_channels(two) == {f"{pg_prefix}:b", f"{pg_prefix}:c"}
            for seq, group in enumerate(["a", "b", "c"], 1):
                await one.deliver(group, seq, wire(seq, group))
            await got_one.wait_events(2)
            await got_two.wait_events(2)
            await anyio.sleep(0.1)
            assert [(g, s) for g, s, _ in got_one.events] == [("a", 1), ("b", 2)]
            assert [(g, s) for g, s, _ in got_two.events] == [("b", 2), ("c", 3)]
            # UNLISTEN after the linger, in one query.
            one.unsubscribe(["a", "b"])
            assert one.listening == {"a", "b"}
            while one.listening:  # noqa: ASYNC110 (polls the backend)
                await anyio.sleep(0.05)
            await anyio.sleep(0.1)  # the UNLISTEN's reply
            assert await listening_channels(one) == set()
            assert await listening_channels(two) == {f"{pg_prefix}:b", f"{pg_prefix}:c"}


async def test_postgres_backend_resubscribe_within_linger_costs_no_listen(pg_prefix: str) -> None:
    async with connected_backend(pg_prefix, linger=5) as (backend, _):
        with anyio.fail_after(10):
            await backend.subscribe(["g"])
            backend.unsubscribe(["g"])
            await backend.subscribe(["g"])
            assert backend._channels._dirty == set()
            assert await listening_channels(backend) == {f"{pg_prefix}:g"}


async def test_postgres_backend_batches_concurrent_listens_into_few_queries(
    pg_prefix: str,
) -> None:
    async with connected_backend(pg_prefix) as (backend, got):
        link = backend._link
        assert link is not None
        queries: list[str] = []
        link.conn.add_query_logger(lambda record: queries.append(record.query))
        groups = [f"user:{n}" for n in range(300)]
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for group in groups:
                    tg.start_soon(backend.subscribe, [group])
        listens = [query for query in queries if "LISTEN" in query]
        # The first group goes alone; the others piled up while it ran.
        assert 1 <= len(listens) <= 3, listens
        assert sum(query.count("LISTEN ") for query in listens) == 300
        assert len(await listening_channels(backend)) == 300
        await backend.deliver("user:299", 1, wire(1, "last"))
        with anyio.fail_after(5):
            await got.wait_events(1)


async def test_postgres_backend_subscribe_given_up_before_its_listen_ends(
    pg_prefix: str,
) -> None:
    async with connected_backend(pg_prefix) as (backend, _):
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:

                async def subscribe() -> None:
                    with pytest.raises(BackendError, match="unsubscribed"):
                        await backend.subscribe(["g"])

                tg.start_soon(subscribe)
                # One step: subscribe() now waits, and the writer it woke runs after this.
                await anyio.lowlevel.checkpoint()
                backend.unsubscribe(["g"])
            assert await listening_channels(backend) == set()
            await backend.subscribe(["g"])
            assert await listening_channels(backend) == {f"{pg_prefix}:g"}


async def test_postgres_backend_long_group_names_get_hashed_channels(pg_prefix: str) -> None:
    long_group = "x" * 150
    async with connected_backend(pg_prefix) as (backend, got):
        with anyio.fail_after(10):
            await backend.subscribe([long_group])
            channels = await listening_channels(backend)
            assert channels == {channel_name(pg_prefix, long_group)}
            assert all(len(name.encode()) <= 63 for name in channels)
            await backend.deliver(long_group, 1, wire(1, "long"))
            await got.wait_events(1)
            assert got.events == [(long_group, 1, wire(1, "long"))]


async def test_postgres_backend_groups_sharing_a_channel_stay_apart(
    pg_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hash collision (forced here) costs a wasted notification, never a wrong event."""
    import sseviews.backends.postgres as module

    monkeypatch.setattr(module, "channel_name", lambda prefix, group: f"{prefix}#same")
    async with (
        connected_backend(pg_prefix, linger=0.1) as (sender, _),
        connected_backend(pg_prefix, linger=0.1) as (receiver, got),
    ):
        with anyio.fail_after(10):
            await receiver.subscribe(["a", "b"])
            await sender.deliver("c", 1, wire(1, "c"))  # same channel, nobody's group
            await sender.deliver("a", 2, wire(2, "a"))
            await got.wait_events(1)
            receiver.unsubscribe(["a"])
            while receiver.listening != {"b"}:  # noqa: ASYNC110 (polls the backend)
                await anyio.sleep(0.02)
            await anyio.sleep(0.1)
            # "b" still needs the channel: it was not UNLISTENed with "a".
            assert await listening_channels(receiver) == {f"{pg_prefix}#same"}
            await sender.deliver("a", 3, wire(3, "a"))
            await sender.deliver("b", 4, wire(4, "b"))
            await got.wait_events(2)
            assert [(g, s) for g, s, _ in got.events] == [("a", 2), ("b", 4)]


async def test_postgres_backend_large_events_go_through_the_table_in_order(
    pg_prefix: str,
) -> None:
    async with (
        connected_backend(pg_prefix) as (sender, _),
        connected_backend(pg_prefix) as (receiver, got),
    ):
        with anyio.fail_after(10):
            await receiver.subscribe(["g"])
            header = len(f"{1} g\n".encode())
            sent = [
                wire(1, "small"),
                b"x" * (7999 - header),  # exactly the NOTIFY limit
                b"y" * (8000 - header),  # one byte over: the table
                wire(4, "z" * 200_000),
                b"id: e-5\ndata: \xff\xfe\n\n",  # not text: the table
                wire(6, "small again"),
            ]
            for seq, event in enumerate(sent, 1):
                await sender.deliver("g", seq, event)
            await got.wait_events(len(sent))
            assert got.events == [("g", seq, event) for seq, event in enumerate(sent, 1)]
            conn = await asyncpg.connect(PG_DSN)
            try:
                rows = await conn.fetchval(f'SELECT count(*) FROM "{pg_prefix}_live_payloads"')
            finally:
                await conn.close()
            assert rows == 3


async def test_postgres_backend_deletes_old_payload_rows(pg_prefix: str) -> None:
    backend = PostgresBackend(PG_URL, prefix=pg_prefix)
    backend.payload_ttl = 0.4  # swept every 0.1 s
    got = Recorder()
    await backend.connect(got.dispatch, got.on_failure)
    conn = await asyncpg.connect(PG_DSN)
    try:
        with anyio.fail_after(10):
            await backend.subscribe(["g"])
            await backend.deliver("g", 1, wire(1, "x" * 10_000))
            await got.wait_events(1)
            table = f'"{pg_prefix}_live_payloads"'
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 1
            while await conn.fetchval(f"SELECT count(*) FROM {table}"):  # noqa: ASYNC110
                await anyio.sleep(0.05)
    finally:
        await conn.close()
        await backend.disconnect()


async def test_postgres_broadcasts_publishing_concurrently_keep_one_order(pg_prefix: str) -> None:
    count = 150
    one = Broadcast(PG_URL, prefix=pg_prefix)
    two = Broadcast(PG_URL, prefix=pg_prefix)
    async with one, two:
        received: dict[str, list[int]] = {"one": [], "two": []}
        with anyio.fail_after(60):
            async with one.subscribe("room") as sub_one, two.subscribe("room") as sub_two:

                async def read(name: str, sub: object) -> None:
                    async for event in sub:  # type: ignore[attr-defined]
                        assert event.id is not None
                        received[name].append(int(event.id.rsplit("-", 1)[1]))
                        if len(received[name]) == 2 * count:
                            return

                async def publish(broadcast: Broadcast, tag: str) -> None:
                    for i in range(count):
                        # Every 10th one large: through the table, same order.
                        data = f"{tag}{i}" + ("." * 9000 if i % 10 == 0 else "")
                        await broadcast.publish("room", data)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(read, "one", sub_one)
                    tg.start_soon(read, "two", sub_two)
                    tg.start_soon(publish, one, "a")
                    tg.start_soon(publish, two, "b")
    assert received["one"] == list(range(1, 2 * count + 1))
    assert received["two"] == received["one"]


# -- connection loss ---------------------------------------------------------------------


async def test_postgres_backend_recovers_after_its_listener_is_terminated(
    pg_prefix: str,
) -> None:
    async with (
        connected_backend(pg_prefix) as (sender, _),
        connected_backend(pg_prefix) as (receiver, got),
    ):
        receiver.first_retry_delay = 0.05
        with anyio.fail_after(20):
            await receiver.subscribe(["g", "h"])
            assert receiver.healthy
            old = await listener_pids(pg_prefix)
            seq = 0

            async def publish_until(done: anyio.Event) -> None:
                nonlocal seq
                while not done.is_set():
                    seq += 1
                    await sender.deliver("g", seq, wire(seq, "x"))
                    await anyio.sleep(0.005)

            done = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(publish_until, done)
                await got.wait_events(3)
                assert await terminate_listeners(pg_prefix) == 2
                await got.wait_failures(1)
                assert isinstance(got.failures[0], BackendError)
                while not receiver.healthy:  # noqa: ASYNC110 (polls the backend)
                    await anyio.sleep(0.02)
                before = len(got.events)
                await got.wait_events(before + 3)
                done.set()
            assert await listening_channels(receiver) == {f"{pg_prefix}:g", f"{pg_prefix}:h"}
            assert set(await listener_pids(pg_prefix)).isdisjoint(old)
            seqs = [s for _, s, _ in got.events]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_postgres_backend_publishing_connections_terminated_then_publishing_works(
    pg_prefix: str,
) -> None:
    async with (
        connected_backend(pg_prefix) as (sender, _),
        connected_backend(pg_prefix) as (receiver, got),
    ):
        with anyio.fail_after(10):
            await receiver.subscribe(["g"])
            conn = await asyncpg.connect(PG_DSN)
            try:
                killed = await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = $1",
                    f"sseviews publish {pg_prefix}",
                )
            finally:
                await conn.close()
            assert killed >= 2  # the pools of both backends
            await anyio.sleep(0.1)
            # A dead pooled connection is replaced, or the publish says why: never a hang.
            delivered = []
            for seq in (1, 2):
                try:
                    await sender.deliver("g", seq, wire(seq, "after"))
                    delivered.append(seq)
                except BackendError:
                    pass
            await sender.deliver("g", 3, wire(3, "after"))
            delivered.append(3)
            await got.wait_events(len(delivered))
            assert [s for _, s, _ in got.events] == delivered
            # The listening connection was not touched.
            assert got.failures == []


async def test_postgres_backend_subscribe_while_reconnecting_raises(pg_prefix: str) -> None:
    async with connected_backend(pg_prefix) as (backend, got):
        backend.first_retry_delay = 1.0
        with anyio.fail_after(10):
            await backend.subscribe(["g"])
            await terminate_listeners(pg_prefix)
            await got.wait_failures(1)
            assert not backend.healthy
            with pytest.raises(BackendError, match="lost the connection"):
                await backend.subscribe(["h"])


# -- poolers --------------------------------------------------------------------------------


@pytest.fixture
def pgbouncer() -> Iterator[int]:
    """A pgbouncer in transaction mode on a spare loopback port, in front of the test db."""
    # Its own directory: run as postgres (pgbouncer refuses root), it cannot enter pytest's.
    with tempfile.TemporaryDirectory(prefix="sseviews-pgbouncer-") as name:
        yield from _run_pgbouncer(Path(name))


def _run_pgbouncer(tmp_path: Path) -> Iterator[int]:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    port = free_port()
    user = pwd.getpwuid(os.getuid()).pw_name
    run_as = ["-u", "postgres"] if os.getuid() == 0 else []
    config = tmp_path / "pgbouncer.ini"
    config.write_text(
        "[databases]\n"
        "test = host=127.0.0.1 port=5432 dbname=test\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\n"
        "auth_type = trust\n"
        f"auth_file = {tmp_path / 'users.txt'}\n"
        "pool_mode = transaction\n"
        f"unix_socket_dir = {tmp_path}\n"
        f"logfile = {tmp_path / 'pgbouncer.log'}\n"
    )
    (tmp_path / "users.txt").write_text(f'"postgres" ""\n"{user}" ""\n')
    if run_as:
        tmp_path.chmod(0o755)
        shutil.chown(tmp_path, "postgres")
        for name in ("pgbouncer.ini", "users.txt"):
            shutil.chown(tmp_path / name, "postgres")
    proc = subprocess.Popen(
        [binary, *run_as, str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                log = (tmp_path / "pgbouncer.log").read_text(errors="replace")
                raise AssertionError(f"pgbouncer exited:\n{log}")
            with suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            if time.monotonic() > deadline:
                raise AssertionError("pgbouncer did not start in 10s")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
async def test_postgres_backend_through_pgbouncer_says_listen_does_not_work(
    pg_prefix: str, pgbouncer: int
) -> None:
    pooled = f"postgresql://postgres@127.0.0.1:{pgbouncer}/test"
    backend = PostgresBackend(pooled, prefix=pg_prefix)
    backend.listen_check_timeout = 1.0
    recorder = Recorder()
    with anyio.fail_after(15), pytest.raises(BackendError) as caught:
        await backend.connect(recorder.dispatch, recorder.on_failure)
    message = str(caught.value)
    assert "LISTEN does not work" in message
    assert "listen_url" in message
    assert "transaction mode" in message
    assert not backend.healthy


@pytest.mark.slow
async def test_postgres_backend_listen_url_bypasses_pgbouncer(
    pg_prefix: str, pgbouncer: int
) -> None:
    pooled = f"postgresql://postgres@127.0.0.1:{pgbouncer}/test"
    async with (
        connected_backend(pg_prefix, url=f"{pooled}?listen_url={PG_URL}") as (sender, _),
        connected_backend(pg_prefix, url=pooled, listen_url=PG_DSN) as (receiver, got),
    ):
        with anyio.fail_after(10):
            await receiver.subscribe(["g"])
            sent = [wire(1, "small"), wire(2, "z" * 20_000), wire(3, "small")]
            for seq, event in enumerate(sent, 1):
                await sender.deliver("g", seq, event)
            await got.wait_events(3)
            assert got.events == [("g", seq, event) for seq, event in enumerate(sent, 1)]


@pytest.mark.slow
async def test_postgres_broadcast_behind_pgbouncer_with_listen_url_publishes_and_replays(
    pg_prefix: str, pgbouncer: int
) -> None:
    pooled = f"postgresql+asyncpg://postgres@127.0.0.1:{pgbouncer}/test"
    url = f"{pooled}?listen_url={PG_URL}"
    one = Broadcast(url, prefix=pg_prefix)
    two = Broadcast(url, prefix=pg_prefix)
    async with one, two:
        with anyio.fail_after(15):
            first = await one.publish("room", "before")
            async with two.subscribe("room", last_event_id=first) as sub:
                ids = [await one.publish("room", text) for text in ("a", "b" * 9000, "c")]
                events = [await sub.__anext__() for _ in ids]
    assert [event.id for event in events] == ids
    assert [len(event.data) for event in events] == [1, 9000, 1]


# -- two processes -------------------------------------------------------------------------


@pytest.mark.slow
async def test_postgres_two_processes_resuming_clients_get_every_event_once_in_order(
    pg_prefix: str, tmp_path: Path
) -> None:
    import test_multiprocess as mp

    a, b = await anyio.to_thread.run_sync(
        mp._start_servers, tmp_path, pg_prefix, ("A", "B"), PG_URL
    )
    try:
        room = "pg"
        total = 120
        published: list[str] = []
        clients: dict[str, list[str]] = {}
        streams: dict[str, int] = {}  # streams each client opened

        async def follow(name: str, server: mp.Server) -> None:
            """Stream `room` as a browser does: resume with Last-Event-ID after each end."""
            got: list[str] = []
            clients[name] = got
            streams[name] = 0
            last: str | None = None
            while len(got) < total:
                try:
                    async with mp.SSEClient.connect(server, room, last_event_id=last) as client:
                        streams[name] += 1
                        while len(got) < total:
                            try:
                                event = await client.next_event()
                            except AssertionError:
                                break  # the stream ended: reconnect
                            if event.id is None:
                                continue
                            got.append(event.id)
                            last = event.id
                except AssertionError:
                    pass  # refused while the backend recovers (503): retry
                await anyio.sleep(0.1)  # the stream's retry

        async def publish_all(http: httpx.AsyncClient) -> None:
            for i in range(total):
                server = (a, b)[i % 2]
                published.append(await mp.publish(http, server, room, {"n": i}))
                if i == total // 3:
                    assert await terminate_listeners(pg_prefix) == 2
                await anyio.sleep(0.01)

        async with httpx.AsyncClient(timeout=mp.TIMEOUT) as http:
            with anyio.fail_after(90):
                async with anyio.create_task_group() as tg:
                    for name, server in (("a1", a), ("a2", a), ("b1", b), ("b2", b)):
                        tg.start_soon(follow, name, server)
                    await anyio.sleep(0.5)
                    await publish_all(http)
        seqs = [mp.seq_of(event_id) for event_id in published]
        assert seqs == list(range(1, total + 1))
        for name, got in clients.items():
            assert got == published, f"{name} got {got}"
            # Its stream ended when its process lost the listener; it resumed.
            assert streams[name] >= 2, streams
        for server in (a, b):
            assert "lost the listening connection" in server.log()
    finally:
        a.kill()
        b.kill()
