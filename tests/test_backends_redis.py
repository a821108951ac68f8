"""RedisBackend against the real Redis on 127.0.0.1:6379, and against a redis-server
of its own that the fault test kills and restarts."""

from __future__ import annotations

import logging

import anyio
import pytest
import redis.asyncio
from support.broadcast import Recorder, data, no_deliver
from support.processes import free_port
from support.redis import (
    REDIS_URL,
    RedisServer,
    redis_client,
    unique_prefix,
)

from sseviews import BackendError
from sseviews._redis import LUA_LIVE, live_channel, live_channel_base, parse_live_message
from sseviews.backends.redis import RedisBackend
from sseviews.stores.base import id_line
from sseviews.stores.redis import RedisStore

pytestmark = pytest.mark.anyio


# -- delivery ------------------------------------------------------------------------


async def test_redis_backend_receives_concurrent_publishes_in_id_order(prefix: str) -> None:
    # Two "processes", each with its store and its backend, publishing at once.
    stores = [RedisStore(REDIS_URL, prefix=prefix, publish=True) for _ in range(2)]
    backends = [RedisBackend(REDIS_URL, prefix=prefix) for _ in range(2)]
    recorders = [Recorder(), Recorder()]
    stored: dict[tuple[str, int], bytes] = {}

    async def publish(store: RedisStore, group: str, text: str) -> None:
        async def deliver(seq: int, wire: bytes) -> None:
            stored[group, seq] = wire

        await store.append(group, data(text), deliver)

    with anyio.fail_after(10):
        for store in stores:
            await store.connect()
        for backend, recorder in zip(backends, recorders, strict=True):
            await backend.connect(recorder.dispatch, recorder.on_failure)
            await backend.subscribe(["room:0", "room:1", "room:2"])
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(publish, stores[i % 2], f"room:{i % 3}", str(i))
        for recorder in recorders:
            await recorder.wait_events(200)
        for backend in backends:
            await backend.disconnect()
        for store in stores:
            await store.disconnect()

    assert len(stored) == 200
    for group, count in (("room:0", 67), ("room:1", 67), ("room:2", 66)):
        # Each group's ids are consecutive, and reach every process in id order.
        expected = [(group, seq, stored[group, seq]) for seq in range(1, count + 1)]
        for recorder in recorders:
            assert [event for event in recorder.events if event[0] == group] == expected
    for recorder in recorders:
        assert len(recorder.events) == 200
        assert recorder.failures == []


async def test_redis_backend_deliver_reaches_every_backend(prefix: str) -> None:
    sender = RedisBackend(REDIS_URL, prefix=prefix)
    receiver = RedisBackend(REDIS_URL, prefix=prefix)
    sent, received = Recorder(), Recorder()
    wire = id_line("0badcafe", 7) + b"data: \x00binary\xff\n\n"
    with anyio.fail_after(5):
        await sender.connect(sent.dispatch, sent.on_failure)
        await receiver.connect(received.dispatch, received.on_failure)
        for backend in (sender, receiver):
            await backend.subscribe(["orders:42", "orders:43"])
        await sender.deliver("orders:42", 7, wire)
        await sender.deliver("orders:43", 8, wire)
        await received.wait_events(2)
        await sent.wait_events(2)
        await sender.disconnect()
        await receiver.disconnect()
    assert received.events == sent.events == [("orders:42", 7, wire), ("orders:43", 8, wire)]


async def test_redis_backend_ignores_other_prefixes(prefix: str) -> None:
    mine = RedisBackend(REDIS_URL, prefix=prefix)
    other = RedisBackend(REDIS_URL, prefix=unique_prefix())
    recorder = Recorder()
    with anyio.fail_after(5):
        await mine.connect(recorder.dispatch, recorder.on_failure)
        await mine.subscribe(["a"])
        await other.deliver("a", 1, data("other"))
        await mine.deliver("a", 2, data("mine"))
        await recorder.wait_events(1)
        await mine.disconnect()
        await other.disconnect()
    assert recorder.events == [("a", 2, data("mine"))]


async def test_redis_backend_skips_malformed_messages(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    recorder = Recorder()
    with anyio.fail_after(5), caplog.at_level(logging.WARNING, logger="sseviews.redis"):
        await backend.connect(recorder.dispatch, recorder.on_failure)
        await backend.subscribe(["a"])
        async with redis_client() as client:
            await client.publish(f"{prefix}:live:{{a}}", b"no separators")
            await client.publish(f"{prefix}:live:{{a}}", b"not-a-number\x00data: x\n\n")
        await backend.deliver("a", 1, data("ok"))
        await recorder.wait_events(1)
        await backend.disconnect()
    assert recorder.events == [("a", 1, data("ok"))]
    assert recorder.failures == []
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) == 2


async def test_redis_backend_survives_a_failing_dispatch(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    recorder = Recorder()

    def dispatch(group: str, seq: int, wire: bytes) -> None:
        recorder.dispatch(group, seq, wire)
        if seq == 1:
            raise RuntimeError("boom")

    with anyio.fail_after(5), caplog.at_level(logging.ERROR, logger="sseviews.redis"):
        await backend.connect(dispatch, recorder.on_failure)
        await backend.subscribe(["a"])
        await backend.deliver("a", 1, data("1"))
        await backend.deliver("a", 2, data("2"))
        await recorder.wait_events(2)
        assert backend.healthy
        await backend.disconnect()
    assert recorder.seqs == [1, 2]
    assert any("dispatching event 1" in r.getMessage() for r in caplog.records)


# -- lifecycle -----------------------------------------------------------------------


async def test_redis_backend_healthy_only_while_connected(prefix: str) -> None:
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    recorder = Recorder()
    assert not backend.healthy
    with anyio.fail_after(5):
        await backend.connect(recorder.dispatch, recorder.on_failure)
        assert backend.healthy
        with pytest.raises(RuntimeError, match="already connected"):
            await backend.connect(recorder.dispatch, recorder.on_failure)
        await backend.disconnect()
    assert not backend.healthy
    assert recorder.failures == []


async def test_redis_backend_disconnect_stops_delivery_within_a_second(prefix: str) -> None:
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    recorder = Recorder()
    with anyio.fail_after(5):
        await backend.connect(recorder.dispatch, recorder.on_failure)
        await backend.subscribe(["a"])
    with anyio.fail_after(1):
        await backend.disconnect()
    async with redis_client() as client:
        with anyio.fail_after(5):
            subscribers = await client.pubsub_numsub(f"{prefix}:live:{{a}}")
            await client.publish(f"{prefix}:live:{{a}}", b"1\x00data: late\n\n")
            await anyio.sleep(0.1)
    assert subscribers == [(f"{prefix}:live:{{a}}".encode(), 0)]
    assert recorder.events == []
    assert recorder.failures == []


async def test_redis_backend_accepts_a_client_and_leaves_it_open(prefix: str) -> None:
    recorder = Recorder()
    async with redis_client() as client:
        backend = RedisBackend(client, prefix=prefix)
        with anyio.fail_after(5):
            await backend.connect(recorder.dispatch, recorder.on_failure)
            await backend.subscribe(["a"])
            await backend.deliver("a", 1, data("1"))
            await recorder.wait_events(1)
            await backend.disconnect()
            assert await client.ping()


async def test_redis_backend_unreachable_raises_backend_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", prefix=unique_prefix())
    recorder = Recorder()
    with caplog.at_level(logging.WARNING, logger="sseviews.redis"):
        with anyio.fail_after(5), pytest.raises(BackendError, match="subscribing"):
            await backend.connect(recorder.dispatch, recorder.on_failure)
        with anyio.fail_after(5), pytest.raises(BackendError, match="publishing"):
            await backend.deliver("a", 1, data("1"))
    assert not backend.healthy
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_redis_backend_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="prefix"):
        RedisBackend(REDIS_URL, prefix="")
    with pytest.raises(ValueError, match="redis://"):
        RedisBackend("http://127.0.0.1:6379")


# -- faults --------------------------------------------------------------------------


@pytest.mark.slow
async def test_redis_backend_fails_then_recovers_when_the_server_restarts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = RedisServer(free_port())
    prefix = unique_prefix()
    recorder = Recorder()
    backend: RedisBackend | None = None
    store: RedisStore | None = None
    try:
        server.start()
        backend = RedisBackend(server.url, prefix=prefix)
        store = RedisStore(server.url, prefix=prefix, publish=True)
        with anyio.fail_after(5):
            await backend.connect(recorder.dispatch, recorder.on_failure)
            await backend.subscribe(["a"])
            await store.connect()

        async def publish_forever(store: RedisStore) -> None:
            while True:
                try:
                    await store.append("a", data("tick"), no_deliver)
                except BackendError:
                    pass
                await anyio.sleep(0.01)

        with caplog.at_level(logging.INFO, logger="sseviews.redis"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(publish_forever, store)
                with anyio.fail_after(5):
                    await recorder.wait_events(5)
                server.kill()
                with anyio.fail_after(2):
                    await recorder.wait_failures(1)
                assert not backend.healthy
                assert isinstance(recorder.failures[0], BackendError)
                tg.cancel_scope.cancel()

            # Down for a while: publishing raises, and the backend keeps retrying.
            with anyio.fail_after(5):
                with pytest.raises(BackendError):
                    await store.append("a", data("while down"), no_deliver)
                await anyio.sleep(1)
            assert not backend.healthy
            assert len(recorder.failures) == 1

            server.start()
            with anyio.fail_after(10):
                # The backend reports recovery only through `healthy`: poll it.
                while not backend.healthy:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
                # The group's history is gone with the server: it starts a new epoch,
                # so no id is issued twice.
                seen = store._seen.get("a")
                assert seen is not None
                delivered_before = len(recorder.events)
                position = await store.append("a", data("after restart"), no_deliver)
                await recorder.wait_events(delivered_before + 1)

        assert position.epoch != seen.epoch
        assert position.seq == 1
        assert recorder.events[-1] == (
            "a",
            1,
            id_line(position.epoch, 1) + data("after restart"),
        )
        assert len(recorder.failures) == 1
        levels = [(r.levelno, r.getMessage()) for r in caplog.records]
        assert any(level == logging.WARNING and "lost" in msg for level, msg in levels)
        assert any(level == logging.INFO and "subscribed again" in msg for level, msg in levels)
    finally:
        with anyio.fail_after(5):
            if backend is not None:
                await backend.disconnect()
            if store is not None:
                await store.disconnect()
        server.kill()


async def test_redis_backend_disconnect_after_a_delivery_closes_everything(prefix: str) -> None:
    # The presence heartbeat, cancelled in mid-command, used to swallow its
    # cancellation: disconnect() then ran out of its 1 s bound and left the
    # pub/sub connection and the client's pool open (a ResourceWarning later).
    import gc

    import redis.asyncio.connection

    from sseviews import Broadcast

    broadcast = Broadcast(REDIS_URL, prefix=prefix)
    await broadcast.connect()
    async with broadcast.subscribe("a") as subscription:
        await broadcast.publish("a", "one")
        with anyio.fail_after(2):
            await subscription.__anext__()
    started = anyio.current_time()
    await broadcast.disconnect()
    assert anyio.current_time() - started < 0.5
    gc.collect()
    still_open = [
        conn
        for conn in gc.get_objects()
        if isinstance(conn, redis.asyncio.connection.AbstractConnection)
        and getattr(conn, "_writer", None) is not None
    ]
    assert still_open == []


async def test_redis_live_contract_is_the_same_in_lua_and_python() -> None:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    script = LUA_LIVE + "return {live_channel(ARGV[1], ARGV[2]), live_event(JOIN_EVENT, ARGV[3])}"
    try:
        for group in ["plain", "a:b", "{tag}", "100%", "%3A", "é:{x}%"]:
            channel, message = await client.eval(
                script, 0, live_channel_base("p"), group, '{"id": 1}'
            )
            assert channel.decode() == live_channel("p", group)
            assert parse_live_message(message) == (0, b'event: sseviews.join\ndata: {"id": 1}\n\n')
    finally:
        await client.aclose()
