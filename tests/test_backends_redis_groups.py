"""RedisBackend subscribes a process only to the groups it serves, on the real Redis.

Each group has its own channel, `{prefix}:live:{<escaped group>}`. These tests
look at what Redis sees (`PUBSUB`, `CLIENT LIST`, and MONITOR for the commands
sent) while two broadcasts, each with connections of its own, stand for two
processes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from support.broadcast import Recorder, data
from support.redis import REDIS_URL, monitor, redis_client

from sseviews import JOIN_EVENT, LEAVE_EVENT, BackendError, Broadcast, Event, Subscription
from sseviews._redis import group_key
from sseviews.backends.redis import RedisBackend

pytestmark = pytest.mark.anyio


def channel(prefix: str, group: str) -> str:
    return group_key(prefix, "live", group)


async def subscribed_channels(prefix: str) -> set[str]:
    async with redis_client() as client:
        channels = await client.pubsub_channels(f"{prefix}:live:*")
    return {name.decode() for name in channels}


async def wait_channels(prefix: str, expected: set[str]) -> None:
    while await subscribed_channels(prefix) != expected:  # noqa: ASYNC110 (polls Redis)
        await anyio.sleep(0.02)


def redis_broadcast(prefix: str, linger: float = 1.5, url: str = REDIS_URL) -> Broadcast:
    broadcast = Broadcast(url, prefix=prefix)
    assert isinstance(broadcast.live, RedisBackend)
    broadcast.live.unsubscribe_linger = linger
    return broadcast


@asynccontextmanager
async def connected_backend(
    prefix: str, linger: float = 1.5, url: str = REDIS_URL
) -> AsyncIterator[tuple[RedisBackend, Recorder]]:
    backend = RedisBackend(url, prefix=prefix)
    backend.unsubscribe_linger = linger
    recorder = Recorder()
    await backend.connect(recorder.dispatch, recorder.on_failure)
    try:
        yield backend, recorder
    finally:
        await backend.disconnect()


async def next_event(subscription: Subscription) -> Event:
    return await subscription.__anext__()


# -- which channels a process is subscribed to ------------------------------------------


async def test_redis_backend_subscribes_only_to_the_groups_in_use(prefix: str) -> None:
    broadcast = redis_broadcast(prefix)
    with anyio.fail_after(10):
        async with broadcast:
            assert await subscribed_channels(prefix) == set()
            async with broadcast.subscribe("room:a", "room:{b}"), broadcast.subscribe("room:a"):
                assert await subscribed_channels(prefix) == {
                    f"{prefix}:live:{{room%3Aa}}",
                    f"{prefix}:live:{{room%3A%7Bb%7D}}",
                }
                async with redis_client() as client:
                    numsub = await client.pubsub_numsub(channel(prefix, "room:a"))
                # One subscription per process, however many streams use the group.
                assert numsub == [(channel(prefix, "room:a").encode(), 1)]
                await broadcast.publish("room:c", "nobody here")
                assert await subscribed_channels(prefix) == {
                    channel(prefix, "room:a"),
                    channel(prefix, "room:{b}"),
                }


async def test_redis_backend_unsubscribes_after_the_linger(prefix: str) -> None:
    broadcast = redis_broadcast(prefix, linger=0.5)
    with anyio.fail_after(10):
        async with broadcast:
            async with broadcast.subscribe("a"), broadcast.subscribe("b") as only_b:
                async with broadcast.subscribe("a"):
                    pass
                # Group a still has a subscription: it stays, whatever the linger.
                await anyio.sleep(0.7)
                assert await subscribed_channels(prefix) == {
                    channel(prefix, "a"),
                    channel(prefix, "b"),
                }
            left = anyio.current_time()
            # Both left: still subscribed during the linger, then no more.
            assert await subscribed_channels(prefix) == {channel(prefix, "a"), channel(prefix, "b")}
            await wait_channels(prefix, set())
            assert anyio.current_time() - left >= 0.45
            assert only_b.error is None


async def test_redis_backend_resubscribe_within_the_linger_costs_no_command(prefix: str) -> None:
    broadcast = redis_broadcast(prefix, linger=1.0)
    publisher = redis_broadcast(prefix)
    with anyio.fail_after(10):
        async with broadcast, publisher, monitor(prefix) as log:
            async with broadcast.subscribe("a"):
                pass
            # A browser reconnecting at once: the channel never went away.
            async with broadcast.subscribe("a") as subscription:
                event_id = await publisher.publish("a", "again")
                assert (await next_event(subscription)).id == event_id
            await log.sync()
            assert log.named("SUBSCRIBE") == [[channel(prefix, "a")]]
            assert log.named("UNSUBSCRIBE") == []
            await wait_channels(prefix, set())
            await log.sync()
            assert log.named("UNSUBSCRIBE") == [[channel(prefix, "a")]]


async def test_redis_backend_batches_concurrent_subscribes_into_one_command(prefix: str) -> None:
    groups = [f"user:{i}" for i in range(300)]
    with anyio.fail_after(20):
        async with connected_backend(prefix, linger=0.2) as (backend, recorder):
            async with monitor(prefix) as log:
                async with anyio.create_task_group() as tg:
                    for group in groups:
                        tg.start_soon(backend.subscribe, [group])
                await log.sync()
                subscribes = log.named("SUBSCRIBE")
                assert len(subscribes) == 1
                assert sorted(subscribes[0]) == sorted(channel(prefix, g) for g in groups)
                # Every caller returned after the confirmation: every channel works.
                assert await subscribed_channels(prefix) == {channel(prefix, g) for g in groups}
                backend.unsubscribe(groups)
                await wait_channels(prefix, set())
                await log.sync()
                unsubscribes = log.named("UNSUBSCRIBE")
                assert len(unsubscribes) == 1
                assert sorted(unsubscribes[0]) == sorted(channel(prefix, g) for g in groups)
            assert recorder.failures == []


async def test_redis_backend_concurrent_subscribes_of_one_group_share_its_confirmation(
    prefix: str,
) -> None:
    with anyio.fail_after(10):
        async with connected_backend(prefix) as (backend, recorder):
            async with monitor(prefix) as log:

                async def subscribe(i: int) -> None:
                    await backend.subscribe(["shared", f"own:{i}"])
                    # Confirmed for this caller too: what it publishes now comes back.
                    await backend.deliver("shared", i + 1, data(str(i)))

                async with anyio.create_task_group() as tg:
                    for i in range(50):
                        tg.start_soon(subscribe, i)
                await recorder.wait_events(50)
                await log.sync()
            subscribed = [name for command in log.named("SUBSCRIBE") for name in command]
            assert subscribed.count(channel(prefix, "shared")) == 1
            assert len(subscribed) == 51
            assert sorted(seq for _, seq, _ in recorder.events) == list(range(1, 51))


async def test_redis_backend_holds_one_pubsub_connection_for_many_groups(prefix: str) -> None:
    # The client name marks this backend's connections in CLIENT LIST.
    url = f"{REDIS_URL}?client_name={prefix}"
    groups = [f"g{i}" for i in range(500)]
    with anyio.fail_after(20):
        async with connected_backend(prefix, url=url) as (backend, _):
            await backend.subscribe(groups)
            async with redis_client() as client:
                clients = [c for c in await client.client_list() if c["name"] == prefix]
    pubsub = [c for c in clients if "P" in c["flags"]]
    assert len(pubsub) == 1
    assert pubsub[0]["sub"] == "500"


async def test_redis_backend_subscribe_when_not_connected_raises_backend_error(
    prefix: str,
) -> None:
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    with anyio.fail_after(5), pytest.raises(BackendError, match="not connected"):
        await backend.subscribe(["a"])
    async with connected_backend(prefix) as (connected, _):
        await connected.subscribe(["a"])
    with anyio.fail_after(5), pytest.raises(BackendError, match="not connected"):
        await connected.subscribe(["a"])


async def test_redis_backend_churn_of_joins_and_leaves_keeps_every_subscription_live(
    prefix: str,
) -> None:
    # No linger: groups are subscribed and unsubscribed all the time, so joins
    # land while an UNSUBSCRIBE of the same channel is in flight.
    broadcast = redis_broadcast(prefix, linger=0)
    publisher = redis_broadcast(prefix)
    rounds = 0
    with anyio.fail_after(30):
        async with broadcast, publisher:

            async def churn(worker: int) -> None:
                nonlocal rounds
                for i in range(15):
                    group = f"g{(worker + i) % 4}"
                    async with broadcast.subscribe(group) as subscription:
                        # Subscribed once attached: a publish from now on arrives.
                        event_id = await publisher.publish(group, f"{worker}-{i}")
                        while (await next_event(subscription)).id != event_id:
                            pass
                    rounds += 1
                    await anyio.sleep((worker + i) % 3 * 0.002)

            async with anyio.create_task_group() as tg:
                for worker in range(12):
                    tg.start_soon(churn, worker)
            await wait_channels(prefix, set())
    assert rounds == 12 * 15


# -- what reaches a process ------------------------------------------------------------------


async def test_broadcast_redis_process_receives_no_event_of_groups_it_does_not_serve(
    prefix: str,
) -> None:
    serving = redis_broadcast(prefix)
    publisher = redis_broadcast(prefix)
    received: list[tuple[str, int]] = []
    dispatch = serving._dispatch

    def recording_dispatch(group: str, seq: int, wire: bytes) -> None:
        received.append((group, seq))
        dispatch(group, seq, wire)

    serving._dispatch = recording_dispatch  # type: ignore[method-assign]
    with anyio.fail_after(10):
        async with serving, publisher:
            async with serving.subscribe("a") as subscription, publisher.subscribe("b"):
                ids = []
                for i in range(50):
                    await publisher.publish("b", f"b{i}")
                    ids.append(await publisher.publish("a", f"a{i}"))
                    await publisher.publish_ephemeral("b", "typing")
                for event_id in ids:
                    assert (await next_event(subscription)).id == event_id
    assert {group for group, _ in received} == {"a"}
    assert len(received) == 50


async def test_broadcast_redis_resume_is_gap_free_while_another_process_publishes(
    prefix: str,
) -> None:
    publisher = redis_broadcast(prefix)
    published: list[str] = []
    with anyio.fail_after(60):
        async with publisher:

            async def publish_forever() -> None:
                i = 0
                while True:
                    published.append(await publisher.publish("busy", f"e{i}"))
                    i += 1

            async with anyio.create_task_group() as tg:
                tg.start_soon(publish_forever)
                for _ in range(12):
                    while len(published) < 20:  # noqa: ASYNC110
                        await anyio.sleep(0.005)
                    cursor = published[-10]
                    # A process that does not serve the group yet: its subscribe, the
                    # history read and the live events race the publisher.
                    serving = redis_broadcast(prefix)
                    async with serving, serving.subscribe("busy", last_event_id=cursor) as sub:
                        start = published.index(cursor) + 1
                        wanted = len(published) + 30
                        got = []
                        while len(got) < wanted - start:
                            got.append((await next_event(sub)).id)
                    assert got == published[start:wanted]
                tg.cancel_scope.cancel()


async def test_broadcast_redis_presence_and_ephemeral_events_reach_the_group_channel(
    prefix: str,
) -> None:
    # The presence script names the channel in Lua: it must escape as group_key does.
    group = "room:{x}%25y"
    watcher = redis_broadcast(prefix)
    other = redis_broadcast(prefix)
    entry = b'{"id":"m-1","info":{}}'
    with anyio.fail_after(10):
        async with watcher, other, watcher.subscribe(group) as subscription:
            assert isinstance(other.live, RedisBackend)
            await other.live.presence_join("m-1", [group, "elsewhere"], entry, True)
            await other.publish_ephemeral(group, Event("typing", event="typing"))
            await other.live.presence_leave("m-1", [group, "elsewhere"], entry, True)
            events = [await next_event(subscription) for _ in range(3)]
    assert [(e.event, e.id) for e in events] == [
        (JOIN_EVENT, None),
        ("typing", None),
        (LEAVE_EVENT, None),
    ]
    assert events[0].data == events[2].data == entry.decode()


# -- connection loss ---------------------------------------------------------------------------


async def test_redis_backend_resubscribes_the_groups_in_use_after_client_kill(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"{REDIS_URL}?client_name={prefix}"
    broadcast = redis_broadcast(prefix, linger=0, url=url)
    publisher = redis_broadcast(prefix)
    live = broadcast.live
    with anyio.fail_after(20), caplog.at_level(logging.INFO, logger="sseviews.redis"):
        async with broadcast, publisher:
            async with broadcast.subscribe("kept") as kept:
                async with broadcast.subscribe("gone") as gone:
                    async with redis_client() as client:
                        ours = [c for c in await client.client_list() if c["name"] == prefix]
                        (pubsub,) = [c for c in ours if "P" in c["flags"]]
                        await client.client_kill_filter(_id=pubsub["id"])
                    with pytest.raises(BackendError):
                        await next_event(gone)
                # "gone" left during the outage; "kept" failed too but is still
                # open (its stream has not ended yet): only "kept" is subscribed again.
                assert isinstance(kept.error, BackendError)
                while not live.healthy:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
                await wait_channels(prefix, {channel(prefix, "kept")})
            await wait_channels(prefix, set())
            async with broadcast.subscribe("kept") as again:
                assert await subscribed_channels(prefix) == {channel(prefix, "kept")}
                event_id = await publisher.publish("kept", "after the kill")
                assert (await next_event(again)).id == event_id
    messages = [r.getMessage() for r in caplog.records]
    assert any("subscribed again" in message for message in messages)
