"""Redis Cluster: `redis+cluster://` URLs, the store and the sharded pub/sub backend
on a real cluster of 3 masters and 3 replicas (`tests/support/redis_topology.py`),
and streams that follow a master's failover.

The failover tests SIGKILL the master of some groups while events are published
and check the guarantee of `tests/test_redis_sentinel.py`: every event whose
publish() returned an id reaches each subscriber exactly once, in id order, or
that subscriber gets `sseviews.reset` after its last event before the gap; no id
is ever issued twice with different data. They also check that only the
subscriptions of the killed master's groups end.
"""

from __future__ import annotations

import importlib
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest
import redis.asyncio
from redis.crc import key_slot
from support.broadcast import Recorder, no_deliver
from support.failover import (
    FAILOVER_TIMEOUT,
    FailoverDrill,
    Published,
    Subscriber,
    conflicting_ids,
    judge,
    position_of,
)
from support.redis import unique_prefix
from support.redis_topology import HOST, RedisCluster, RedisNode
from support.servers import ServerProcess, start_app_servers

from sseviews import BackendError, Broadcast, Event
from sseviews._redis import ClusterURL, group_key, open_cluster_client, parse_cluster_url
from sseviews.backends.base import GroupsLost
from sseviews.backends.redis import RedisBackend
from sseviews.backends.redis_cluster import RedisClusterBackend
from sseviews.stores.redis import RedisStore

pytestmark = pytest.mark.anyio

TIMEOUT = 5.0


def data(text: str) -> bytes:
    return b"data: %s\n\n" % text.encode()


def slot_of(prefix: str, group: str) -> int:
    return key_slot(group_key(prefix, "live", group).encode())


def groups_by_master(
    cluster: RedisCluster, prefix: str, per_master: int, stem: str = "g"
) -> dict[int, list[str]]:
    """`per_master` group names whose slots lie on each master, by master port."""
    ranges = {master.port: cluster.slot_ranges(master) for master in cluster.masters()}
    found: dict[int, list[str]] = {port: [] for port in ranges}
    n = 0
    while any(len(names) < per_master for names in found.values()):
        group = f"{stem}{n}"
        slot = slot_of(prefix, group)
        for port, spans in ranges.items():
            if any(first <= slot <= last for first, last in spans):
                if len(found[port]) < per_master:
                    found[port].append(group)
        n += 1
    return found


# -- URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7001/",
            ClusterURL([("10.0.0.1", 7000), ("10.0.0.2", 7001)]),
        ),
        ("redis+cluster://node", ClusterURL([("node", 6379)])),
        ("redis+cluster://[::1]:7000,[::1]/", ClusterURL([("::1", 7000), ("::1", 6379)])),
        (
            "rediss+cluster://app:s%40cret@h:1/?socket_timeout=2.5&ssl_cert_reqs=none",
            ClusterURL(
                [("h", 1)],
                tls=True,
                username="app",
                password="s@cret",
                options={"socket_timeout": 2.5, "ssl_cert_reqs": "none"},
            ),
        ),
    ],
)
def test_redis_cluster_url_parses(url: str, expected: ClusterURL) -> None:
    assert parse_cluster_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://h:1/0", "a path"),
        ("redis+cluster://h:1,,h:2/", "an empty node host"),
        ("redis+cluster://h:port/", "a bad port"),
        ("redis+cluster://h:70000/", "a bad port"),
        ("redis+cluster://[::1/", "a malformed IPv6 address"),
        ("redis+cluster://h/?socket_timeout=soon", "socket_timeout='soon'"),
        ("redis+cluster://h/?db=1", "unknown query parameter 'db'"),
        ("redis+cluster://h/?ssl_ca_certs=/ca.pem", "without rediss+cluster"),
        ("redis+cluster://h/#frag", "a #fragment"),
    ],
)
def test_redis_cluster_url_malformed_is_refused_where_it_enters(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="Redis Cluster URL") as info:
        parse_cluster_url(url)
    assert message in str(info.value)
    assert "redis+cluster://10.0.0.1:6379" in str(info.value)  # the example
    with pytest.raises(ValueError, match=re.escape(message)):
        Broadcast(url)


def test_redis_cluster_client_never_retries_a_command_that_may_have_run() -> None:
    client, owned = open_cluster_client("redis+cluster://127.0.0.1:7000/")
    assert owned
    # A connection error or a timeout after the command was sent: no second run.
    assert client.retry.get_retries() == 0
    assert isinstance(client, redis.asyncio.RedisCluster)


def test_redis_cluster_url_given_to_the_single_redis_backend_names_the_cluster_one() -> None:
    with pytest.raises(ValueError, match="RedisClusterBackend"):
        RedisBackend("redis+cluster://127.0.0.1:7000/")


def test_redis_cluster_url_hides_its_password_in_errors() -> None:
    with pytest.raises(ValueError) as info:
        parse_cluster_url("redis+cluster://app:secret@h:port/")
    assert "secret" not in str(info.value)


async def test_redis_cluster_url_of_a_single_redis_is_refused() -> None:
    broadcast = Broadcast("redis+cluster://127.0.0.1:6379/", prefix=unique_prefix())
    with anyio.fail_after(TIMEOUT), pytest.raises(BackendError, match="not a Redis Cluster node"):
        await broadcast.connect()


# -- the seam: a backend that lost some groups --------------------------------------------


async def test_broadcast_groups_lost_ends_only_those_groups_subscriptions() -> None:
    async with Broadcast() as broadcast:
        async with (
            broadcast.subscribe("a") as a,
            broadcast.subscribe("b") as b,
            broadcast.subscribe("b", "c") as bc,
            broadcast.subscribe("c") as c,
        ):
            broadcast._fail_all(GroupsLost("shard lost", ["b"]))
            assert isinstance(b.error, GroupsLost) and isinstance(bc.error, GroupsLost)
            assert a.error is None and c.error is None
            await broadcast.publish("a", "still here")
            with anyio.fail_after(TIMEOUT):
                event = await a.__anext__()
            assert event.data == "still here"


# -- one process on the cluster -------------------------------------------------------------


async def test_redis_cluster_store_and_backend_publish_and_receive_on_every_shard(
    redis_cluster: RedisCluster,
) -> None:
    prefix = unique_prefix()
    by_master = groups_by_master(redis_cluster, prefix, per_master=3)
    groups = [group for names in by_master.values() for group in names]
    store = RedisStore(redis_cluster.url(), prefix=prefix, publish=True)
    backend = RedisClusterBackend(redis_cluster.url(), prefix=prefix)
    recorder = Recorder()
    await store.connect()
    try:
        await backend.connect(recorder.dispatch, recorder.on_failure)
        try:
            assert "Redis Cluster" in backend._where
            with anyio.fail_after(TIMEOUT):
                await backend.subscribe(groups)
            # One pub/sub connection per master, whatever the number of groups.
            assert backend.shard_connections == 3
            positions = {}
            for group in groups:
                positions[group] = [
                    await store.append(group, data(f"{group}-{n}"), no_deliver) for n in range(2)
                ]
            with anyio.fail_after(FAILOVER_TIMEOUT):  # every event
                await recorder.wait_until(lambda: len(recorder.events) == 2 * 9)
            for group in groups:
                got = [(seq, wire) for g, seq, wire in recorder.events if g == group]
                assert [seq for seq, _ in got] == [1, 2]
                assert [wire.split(b"\n", 1)[0] for _, wire in got] == [
                    f"id: {p.epoch}-{p.seq}".encode() for p in positions[group]
                ]
            # Each group's events are on the master of its slot.
            for port, names in by_master.items():
                node = next(n for n in redis_cluster.nodes if n.port == port)
                for group in names:
                    assert node.execute("XLEN", group_key(prefix, "g", group)) == 2
            # Ephemeral events go through SPUBLISH on the group's master.
            await backend.deliver(groups[0], 0, b"event: typing\ndata: x\n\n")
            with anyio.fail_after(FAILOVER_TIMEOUT):  # the ephemeral event
                await recorder.wait_until(lambda: len(recorder.events) == 19)
            assert recorder.events[-1][:2] == (groups[0], 0)
            assert recorder.failures == []
        finally:
            await backend.disconnect()
    finally:
        await store.disconnect()


async def test_redis_cluster_broadcast_streams_groups_of_every_shard_in_one_subscription(
    redis_cluster: RedisCluster,
) -> None:
    prefix = unique_prefix()
    by_master = groups_by_master(redis_cluster, prefix, per_master=1, stem="room")
    groups = sorted(names[0] for names in by_master.values())
    async with Broadcast(redis_cluster.url(), prefix=prefix) as broadcast:
        first = await broadcast.publish(groups[0], "before")
        async with broadcast.subscribe(*groups) as subscription:
            ids = [await broadcast.publish(group, group) for group in groups]
            with anyio.fail_after(TIMEOUT):
                live = [await subscription.__anext__() for _ in groups]
            assert [event.data for event in live] == groups
            cursor = live[0].id
        # A browser resuming with the composite id after the first event.
        async with broadcast.subscribe(*groups, last_event_id=cursor) as resumed:
            with anyio.fail_after(TIMEOUT):
                replay = [await resumed.__anext__() for _ in groups[1:]]
            assert [event.data for event in replay] == groups[1:]
            assert replay[-1].id == await broadcast.last_id(*groups)
        assert first.endswith("-1") and all(i.endswith("-1") or i.endswith("-2") for i in ids)


async def test_redis_cluster_burst_of_publishes_waits_for_connections(
    redis_cluster: RedisCluster,
) -> None:
    """150 concurrent publishes to one group's master: more than a node's pool holds
    (64); they wait for a connection instead of failing."""
    async with Broadcast(redis_cluster.url(), prefix=unique_prefix()) as broadcast:
        ids: list[str] = []

        async def publish(n: int) -> None:
            ids.append(await broadcast.publish("burst", {"n": n}))

        with anyio.fail_after(TIMEOUT * 2):
            async with anyio.create_task_group() as tg:
                for n in range(150):
                    tg.start_soon(publish, n)
        assert sorted(position_of(i)[1] for i in ids) == list(range(1, 151))


# -- a slot moved ---------------------------------------------------------------------------


def move_slot(cluster: RedisCluster, slot: int, source: RedisNode, target: RedisNode) -> None:
    """Migrate `slot` and its keys from master `source` to master `target`, as a
    resharding does."""
    source_id = str(source.execute("CLUSTER", "MYID"))
    target_id = str(target.execute("CLUSTER", "MYID"))
    target.execute("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.execute("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    while keys := source.execute("CLUSTER", "GETKEYSINSLOT", slot, 100):
        assert isinstance(keys, list)
        source.execute("MIGRATE", HOST, target.port, "", 0, 5000, "KEYS", *keys)
    others = [node for node in cluster.masters() if node not in (source, target)]
    for node in (target, source, *others):
        node.execute("CLUSTER", "SETSLOT", slot, "NODE", target_id)


async def test_redis_cluster_slot_moved_ends_only_its_groups_streams_and_follows_it(
    redis_cluster: RedisCluster,
) -> None:
    prefix = unique_prefix()
    masters = redis_cluster.masters()
    # A master that was once a promoted replica (earlier tests' failovers) cannot
    # tell a group that moved to it from one it lost in a failover: the group
    # starts a new epoch there. Move the slot to a master never promoted.
    # (When every master was, the reset that follows is checked instead.)
    # (redis-py reads an all-zero replid2 as the int 0.)
    fresh = [m for m in masters if not str(m.info("replication")["master_replid2"]).strip("0")]
    target = fresh[0] if fresh else masters[1]
    source = next(m for m in masters if m is not target)
    moving, staying = groups_by_master(redis_cluster, prefix, per_master=2)[source.port]
    async with Broadcast(redis_cluster.url(), prefix=prefix) as broadcast:
        async with (
            broadcast.subscribe(moving) as moved_stream,
            broadcast.subscribe(staying) as kept_stream,
        ):
            first = await broadcast.publish(moving, "before")
            with anyio.fail_after(TIMEOUT):
                assert (await moved_stream.__anext__()).id == first
            await anyio.to_thread.run_sync(
                move_slot, redis_cluster, slot_of(prefix, moving), source, target
            )
            # Redis unsubscribed this process from the moved slot's channel: that
            # stream ends (it may have missed events), the other one goes on.
            with anyio.fail_after(TIMEOUT), pytest.raises(GroupsLost) as lost:
                await moved_stream.__anext__()
            assert lost.value.groups == {moving}
            assert kept_stream.error is None
            await broadcast.publish(staying, "kept")
            with anyio.fail_after(TIMEOUT):
                assert (await kept_stream.__anext__()).data == "kept"
        second = await broadcast.publish(moving, "after")
        async with broadcast.subscribe(moving, last_event_id=first) as resumed:
            with anyio.fail_after(TIMEOUT):
                event = await resumed.__anext__()
            if fresh:
                # A browser resumes: its group's history moved with the slot (same epoch).
                assert (event.id, event.data) == (second, "after")
            else:
                assert second.split("-")[0] != first.split("-")[0]
                assert event.event == "sseviews.reset" and event.id == second
                assert event.json()["groups"] == [moving]
            third = await broadcast.publish(moving, "live")
            with anyio.fail_after(TIMEOUT):
                assert (await resumed.__anext__()).id == third
        assert target.execute("XLEN", group_key(prefix, "g", moving)) == (3 if fresh else 2)
        assert f"{HOST}:{target.port}" in {shard.name for shard in broadcast.live._shards.values()}


async def test_redis_cluster_backend_follows_moved_when_its_slot_map_is_stale(
    redis_cluster: RedisCluster,
) -> None:
    prefix = unique_prefix()
    masters = redis_cluster.masters()
    source, target = masters[0], masters[1]
    [group] = groups_by_master(redis_cluster, prefix, per_master=1)[source.port]
    store = RedisStore(redis_cluster.url(), prefix=prefix, publish=True)
    backend = RedisClusterBackend(redis_cluster.url(), prefix=prefix)
    recorder = Recorder()
    await store.connect()
    try:
        await backend.connect(recorder.dispatch, recorder.on_failure)
        try:
            # The slot moves after the backend read the map: its SSUBSCRIBE goes to
            # the old owner, which answers MOVED.
            await anyio.to_thread.run_sync(
                move_slot, redis_cluster, slot_of(prefix, group), source, target
            )
            with anyio.fail_after(TIMEOUT):
                await backend.subscribe([group])
            assert backend._route[group].name == f"{HOST}:{target.port}"
            position = await store.append(group, data("moved"), no_deliver)
            with anyio.fail_after(FAILOVER_TIMEOUT):  # the event
                await recorder.wait_until(lambda: recorder.events)
            assert recorder.events == [
                (group, 1, f"id: {position.epoch}-1\n".encode() + data("moved"))
            ]
            assert recorder.failures == []
        finally:
            await backend.disconnect()
    finally:
        await store.disconnect()


# -- a master killed -----------------------------------------------------------------------


@pytest.mark.slow
async def test_redis_cluster_backend_failover_ends_only_the_killed_masters_groups(
    redis_cluster: RedisCluster,
) -> None:
    prefix = unique_prefix()
    by_master = groups_by_master(redis_cluster, prefix, per_master=2)
    victim = redis_cluster.masters()[0]
    replica = redis_cluster.replica_of(victim)
    lost = set(by_master[victim.port])
    kept = [group for port, names in by_master.items() if port != victim.port for group in names]
    store = RedisStore(redis_cluster.url(), prefix=prefix, publish=True)
    backend = RedisClusterBackend(redis_cluster.url(), prefix=prefix)
    recorder = Recorder()
    await store.connect()
    try:
        await backend.connect(recorder.dispatch, recorder.on_failure)
        try:
            with anyio.fail_after(TIMEOUT):
                await backend.subscribe([*lost, *kept])
            await anyio.to_thread.run_sync(redis_cluster.kill_master, victim)
            with anyio.fail_after(FAILOVER_TIMEOUT):  # the failure
                await recorder.wait_until(lambda: recorder.failures)
            [failure] = recorder.failures
            assert isinstance(failure, GroupsLost) and failure.groups == lost
            # The other masters' groups are delivered while the victim is down.
            for group in kept:
                await store.append(group, data("during"), no_deliver)
            with anyio.fail_after(FAILOVER_TIMEOUT):  # the kept groups' events
                await recorder.wait_until(lambda: len(recorder.events) == 4)
            await anyio.to_thread.run_sync(
                redis_cluster.wait_for_failover, victim, replica, FAILOVER_TIMEOUT
            )
            # The lost groups are subscribed again on the promoted replica, with no
            # new subscribe() call: their events arrive once that is done (those
            # published before are in the history, for the streams that resume).
            before = len(recorder.events)

            def arrived() -> set[str]:
                return {g for g, _, _ in recorder.events[before:]}

            with anyio.fail_after(FAILOVER_TIMEOUT):
                while not arrived() >= lost:
                    for group in sorted(lost - arrived()):
                        try:
                            await store.append(group, data("after"), no_deliver)
                        except BackendError:
                            pass
                    await anyio.sleep(0.1)
            assert backend.shard_connections == 3
            assert f"{HOST}:{victim.port}" not in backend._shards
            assert len(recorder.failures) == 1
        finally:
            await backend.disconnect()
    finally:
        await store.disconnect()


@pytest.mark.slow
async def test_redis_cluster_failover_resets_the_lost_group_of_a_stream_and_replays_the_other(
    redis_cluster: RedisCluster,
) -> None:
    """A stream of two groups on two masters; one master is SIGKILLed and its replica
    promoted. The browser resumes with its last id: the lost group (a new epoch)
    gets the reset, and the other group's events after that id are replayed
    exactly, none missed and none twice, then live."""
    prefix = unique_prefix()
    by_master = groups_by_master(redis_cluster, prefix, per_master=1)
    victim = redis_cluster.masters()[0]
    replica = redis_cluster.replica_of(victim)
    [lost] = by_master[victim.port]
    [kept] = next(names for port, names in by_master.items() if port != victim.port)
    async with Broadcast(redis_cluster.url(), prefix=prefix) as broadcast:
        start = await broadcast.last_id(lost, kept)
        async with broadcast.subscribe(lost, kept, last_event_id=start) as stream:
            for n in range(3):
                await broadcast.publish(lost, f"lost {n}")
                await broadcast.publish(kept, f"kept {n}")
            with anyio.fail_after(TIMEOUT):
                seen = [await stream.__anext__() for _ in range(6)]
            await anyio.to_thread.run_sync(redis_cluster.kill_master, victim)
            # The lost group's stream ends; the kept group's events go on meanwhile.
            with anyio.fail_after(TIMEOUT), pytest.raises(GroupsLost):
                await stream.__anext__()
        last = seen[-1].id
        assert last is not None
        missed = [await broadcast.publish(kept, f"kept {n}") for n in range(3, 6)]
        await anyio.to_thread.run_sync(
            redis_cluster.wait_for_failover, victim, replica, FAILOVER_TIMEOUT
        )
        with anyio.fail_after(FAILOVER_TIMEOUT):
            while True:
                try:
                    new = await broadcast.publish(lost, "lost new")
                    break
                except BackendError:
                    await anyio.sleep(0.1)
        # The promoted replica gave the lost group a new epoch.
        assert new.split("-")[0] != seen[0].id.split(".")[0].split("-")[0]
        order = sorted([lost, kept])
        with anyio.fail_after(FAILOVER_TIMEOUT):
            while True:
                try:
                    resumed = broadcast.subscribe(lost, kept, last_event_id=last)
                    stream = await resumed.__aenter__()
                    break
                except BackendError:
                    await anyio.sleep(0.1)
        try:
            with anyio.fail_after(TIMEOUT):
                reset = await stream.__anext__()
                replayed = [await stream.__anext__() for _ in missed]
            assert reset.event == "sseviews.reset"
            assert reset.json()["groups"] == [lost]
            assert reset.json()["reason"] == "unknown_epoch"
            positions = dict(zip(order, (reset.id or "").split("."), strict=True))
            assert positions[lost] == new
            assert positions[kept] == last.split(".")[order.index(kept)]
            assert [e.data for e in replayed] == ["kept 3", "kept 4", "kept 5"]
            assert [(e.id or "").split(".")[order.index(kept)] for e in replayed] == missed
            live = await broadcast.publish(kept, "kept live")
            with anyio.fail_after(TIMEOUT):
                event = await stream.__anext__()
            assert (event.data, (event.id or "").split(".")[order.index(kept)]) == (
                "kept live",
                live,
            )
        finally:
            await resumed.__aexit__(None, None, None)


# -- two uvicorn processes: the failover guarantee ---------------------------------------


@pytest.fixture
def cluster_servers(
    tmp_path: Path, redis_cluster: RedisCluster
) -> Iterator[tuple[str, ServerProcess, ServerProcess]]:
    """Processes A and B of the multi-process app on the cluster, and their prefix."""
    prefix = unique_prefix()
    a, b = start_app_servers(tmp_path, prefix, ("A", "B"), redis_cluster.url())
    try:
        yield prefix, a, b
    finally:
        a.kill()
        b.kill()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    timeout = httpx.Timeout(TIMEOUT, read=30.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        yield client


def per_room(subscriber: Subscriber, published: list[Published]) -> list[Subscriber]:
    """A stream of several rooms, as one virtual subscriber per room: its events of
    that room, each with the room's position read from its composite id (so a wrong
    position is a wrong id to `judge`), and the resets that name the room's group."""
    room_of = {p.data["n"]: p for p in published}
    rooms = subscriber.room.split("+")
    # A composite id has one position per group, in the order of the group names.
    order = sorted(rooms, key=lambda room: f"room:{room}")
    views = []
    for room in rooms:
        view = Subscriber(subscriber.server, room, connects=subscriber.connects)
        index = order.index(room)
        for event in subscriber.received:
            if event.event == "sseviews.reset":
                if f"room:{room}" in event.json()["groups"]:
                    view.received.append(event)
            elif event.event is None and event.id is not None:
                match = room_of.get(event.json().get("n"))
                if match is not None and match.room == room:
                    view.received.append(Event(event.data, id=event.id.split(".")[index]))
        views.append(view)
    return views


@pytest.mark.slow
async def test_redis_cluster_failover_keeps_the_guarantee_for_subscribers_on_two_processes(
    cluster_servers: tuple[str, ServerProcess, ServerProcess],
    redis_cluster: RedisCluster,
    http: httpx.AsyncClient,
) -> None:
    """SIGKILL the master of room `lost` while events are published through A to it
    and to room `kept` (on another master); after the kill they are published
    through B. Subscribers of both rooms on A and B, and of a stream of both rooms
    (its groups on two masters), must keep the guarantee; those of `kept` alone
    must never be ended, and the stream of both must resume `kept` exactly, with a
    reset of `lost` only."""
    prefix, a, b = cluster_servers
    by_master = groups_by_master(redis_cluster, prefix, per_master=1, stem="room:r")
    ports = list(by_master)
    victim = next(n for n in redis_cluster.masters() if n.port == ports[0])
    replica = redis_cluster.replica_of(victim)
    lost_room = by_master[ports[0]][0].removeprefix("room:")
    kept_room = by_master[ports[1]][0].removeprefix("room:")
    rooms = (lost_room, kept_room)
    both = f"{lost_room}+{kept_room}"
    subscribers = [Subscriber(server, room) for server in (a, b) for room in (*rooms, both)]
    drill = FailoverDrill(http, (a, b), rooms, subscribers, TIMEOUT)

    async def fail_over(drill: FailoverDrill) -> None:
        started = time.monotonic()
        await anyio.to_thread.run_sync(redis_cluster.kill_master, victim)
        drill.via = b
        await anyio.to_thread.run_sync(
            redis_cluster.wait_for_failover, victim, replica, FAILOVER_TIMEOUT
        )
        drill.stats["failover_s"] = round(time.monotonic() - started, 2)

    await drill.run(fail_over)
    published = drill.published

    views = [view for subscriber in subscribers for view in per_room(subscriber, published)]
    streams = [s.room for s in subscribers for _ in s.room.split("+")]
    outcomes = [judge(view, published) for view in views]
    # A composite id is a position of its stream, not an event's: two streams of
    # both rooms may reach one position by different events. Ids issued twice are
    # looked for among the rooms' own ids, those of one-room streams and the
    # positions read from the composite ones.
    one_room = [s for s in subscribers if "+" not in s.room]
    conflicts = conflicting_ids(published, [*one_room, *views])
    report = {
        "published": len(published),
        "failed_publishes": drill.failed,
        "killed_after": drill.killed_at,
        **drill.stats,
        "epochs": sorted({position_of(p.id)[0] for p in published}),
        "conflicting_count": len(conflicts),
        "subscribers": [
            {
                "name": o.name,
                "stream": stream,
                "returned": o.returned,
                "received": o.received,
                "resets": o.resets,
                "missed_with_reset": o.missed_with_reset,
                "missed_silently": len(o.missed_silently),
                "duplicates": len(o.duplicates),
                "out_of_order": len(o.out_of_order),
                "connects": s.connects,
            }
            for o, s, stream in zip(outcomes, views, streams, strict=True)
        ],
    }
    print("CLUSTER FAILOVER REPORT", json.dumps(report))
    assert not conflicts, report
    for outcome in outcomes:
        assert not outcome.missed_silently, (outcome.name, outcome.missed_silently[:10], report)
        assert not outcome.duplicates, (outcome.name, outcome.duplicates[:10], report)
        assert not outcome.out_of_order, (outcome.name, outcome.out_of_order[:10], report)
    for outcome, view in zip(outcomes, views, strict=True):
        if view.room == kept_room:
            # The kept room never needs a reset: alone, its streams go on; in a
            # stream with the lost room, they resume it exactly after the failover.
            assert outcome.resets == 0 and outcome.missed_with_reset == 0, (outcome.name, report)
    for subscriber in subscribers:
        if subscriber.room == kept_room:
            # Only the streams of the killed master's groups were ended.
            assert subscriber.connects == 1, report
        else:
            # Theirs ended at the failover, and resumed.
            assert subscriber.connects >= 2, report


# -- presence (ClusterPresence, from the presence-on-cluster work) --------------------------


async def test_redis_cluster_backend_keeps_presence_per_group_and_announces_joins(
    redis_cluster: RedisCluster,
) -> None:
    try:
        importlib.import_module("sseviews.backends._redis_presence")
    except ImportError:
        pytest.skip("ClusterPresence (sseviews/backends/_redis_presence.py) is not merged yet")
    prefix = unique_prefix()
    by_master = groups_by_master(redis_cluster, prefix, per_master=1, stem="p")
    groups = sorted(names[0] for names in by_master.values())
    one = RedisClusterBackend(redis_cluster.url(), prefix=prefix)
    two = RedisClusterBackend(redis_cluster.url(), prefix=prefix)
    recorder = Recorder()
    await one.connect(recorder.dispatch, recorder.on_failure)
    try:
        await two.connect(Recorder().dispatch, Recorder().on_failure)
        try:
            with anyio.fail_after(TIMEOUT):
                await one.subscribe(groups)
                await two.presence_join("m1", groups, b'{"id":"m1"}', True)
                await one.presence_join("m2", groups[:1], b'{"id":"m2"}', False)
                for group in groups:
                    assert await one.presence_list(group, 10) in (
                        [b'{"id":"m1"}'],
                        [b'{"id":"m1"}', b'{"id":"m2"}'],
                        [b'{"id":"m2"}', b'{"id":"m1"}'],
                    )
                assert await two.presence_count(groups[0]) == 2
                assert [await two.presence_count(group) for group in groups[1:]] == [1, 1]
            # The join of m1 was announced on each group's channel, on its master.
            with anyio.fail_after(FAILOVER_TIMEOUT):  # 3 joins
                await recorder.wait_until(lambda: len(recorder.events) == 3)
            assert sorted(g for g, _, _ in recorder.events) == groups
            assert all(seq == 0 and b"sseviews.join" in wire for _, seq, wire in recorder.events)
            with anyio.fail_after(TIMEOUT):
                await two.presence_leave("m1", groups, b'{"id":"m1"}', False)
                assert [await one.presence_count(group) for group in groups] == [1, 0, 0]
        finally:
            await two.disconnect()
    finally:
        await one.disconnect()
