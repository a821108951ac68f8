"""Presence on a real Redis Cluster (3 masters, 3 replicas): `ClusterPresence`.

Every group's presence keys and its live channel share the group's slot; the
tests pick groups served by each master, listen to announcements with a raw
`SSUBSCRIBE` connection to the master that serves the group's channel, and check
where each key lives.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio
from redis.asyncio.connection import Connection
from redis.crc import key_slot
from support.apps import member_app
from support.failover import FAILOVER_TIMEOUT
from support.redis import unique_prefix
from support.redis_topology import HOST, RedisCluster, RedisNode

from sseviews import BackendError, Broadcast
from sseviews._redis import group_key
from sseviews.backends._redis_presence import ClusterPresence
from sseviews.backends.redis_cluster import RedisClusterBackend
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio

TIMEOUT = 1.5  # presence_timeout of these tests' processes
WAIT = 5.0  # bound on any single wait for a message


def master_of(cluster: RedisCluster, name: str) -> RedisNode:
    """The master that serves the slot of key or channel `name`."""
    slot = key_slot(name.encode())
    for master in cluster.masters():
        if any(first <= slot <= last for first, last in cluster.slot_ranges(master)):
            return master
    raise AssertionError(f"no master serves slot {slot}")


def groups_on_each_master(cluster: RedisCluster, prefix: str) -> list[str]:
    """One group per master, the first served by masters[0], and so on."""
    masters = cluster.masters()
    found: dict[int, str] = {}
    n = 0
    while len(found) < len(masters):
        group = f"room:{n}"
        master = master_of(cluster, group_key(prefix, "live", group))
        found.setdefault(masters.index(master), group)
        n += 1
    return [found[i] for i in range(len(masters))]


@pytest.fixture
async def cluster(redis_cluster: RedisCluster) -> AsyncIterator[tuple[RedisCluster, str]]:
    """The cluster and a key prefix of this test's own (its keys deleted afterwards)."""
    prefix = unique_prefix()
    yield redis_cluster, prefix
    for master in redis_cluster.masters():
        with master.client() as node:
            for key in node.scan_iter(match=f"{prefix}:*", count=1000):
                node.delete(key)


@asynccontextmanager
async def cluster_client(cluster: RedisCluster) -> AsyncIterator[redis.asyncio.RedisCluster]:
    client = redis.asyncio.RedisCluster(
        host=HOST, port=cluster.nodes[0].port, decode_responses=False, protocol=2
    )
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def shard_listener(cluster: RedisCluster, channel: str) -> AsyncIterator[Connection]:
    """A raw connection to the master serving `channel`, subscribed with SSUBSCRIBE."""
    conn = Connection(host=HOST, port=master_of(cluster, channel).port, protocol=2)
    await conn.connect()
    try:
        await conn.send_command("SSUBSCRIBE", channel)
        with anyio.fail_after(WAIT):
            assert await conn.read_response() == [b"ssubscribe", channel.encode(), 1]
        yield conn
    finally:
        await conn.disconnect()


async def next_message(conn: Connection) -> bytes:
    with anyio.fail_after(WAIT):
        kind, _, data = await conn.read_response()
    assert kind == b"smessage"
    assert isinstance(data, bytes)
    return data


def announcement(event: str, entry: bytes) -> bytes:
    return b"0\0event: %s\ndata: %s\n\n" % (event.encode(), entry)


def entry(member: str) -> bytes:
    return json.dumps({"id": member, "info": {"user": member}, "joined_at": 1.0}).encode()


def keys_on(node: RedisNode, prefix: str) -> set[str]:
    with node.client() as client:
        return {key.decode() for key in client.scan_iter(match=f"{prefix}:*", count=1000)}


@pytest.fixture
def anyio_backend() -> Iterator[str]:
    yield "asyncio"


async def test_cluster_presence_lists_members_of_groups_on_every_shard(
    cluster: tuple[RedisCluster, str],
) -> None:
    topology, prefix = cluster
    groups = groups_on_each_master(topology, prefix)
    async with cluster_client(topology) as client:
        a = ClusterPresence(client, prefix, "process-a", TIMEOUT)
        b = ClusterPresence(client, prefix, "process-b", TIMEOUT)
        # One member in every group (one on each shard), another in one group.
        await a.join("ann", groups, entry("ann"), False)
        await b.join("bo", groups[1:2], entry("bo"), False)
        for group in groups:
            expected = [entry("ann"), entry("bo")] if group == groups[1] else [entry("ann")]
            assert sorted(await a.list(group, 1000)) == sorted(expected)
            assert await b.count(group) == len(expected)
        assert len(await a.list(groups[1], 1)) == 1
        assert await a.count("room:nobody") == 0
        assert await a.list("room:nobody", 10) == []

        # Each group's keys live on the master that serves its channel.
        for group in groups:
            master = master_of(topology, group_key(prefix, "live", group))
            for kind in ("presence", "presence-owners"):
                assert group_key(prefix, kind, group) in keys_on(master, prefix)

        await a.leave("ann", groups[:2], False)
        assert [await a.count(group) for group in groups] == [0, 1, 1]
        assert await a.list(groups[1], 10) == [entry("bo")]
        # Leaving again, or a member never joined, changes nothing.
        await a.leave("ann", groups[:2], False)
        await a.leave("zed", groups, True)
        assert [await a.count(group) for group in groups] == [0, 1, 1]


async def test_cluster_presence_announces_join_and_leave_on_the_groups_shard(
    cluster: tuple[RedisCluster, str],
) -> None:
    topology, prefix = cluster
    first, _, last = groups_on_each_master(topology, prefix)
    async with (
        cluster_client(topology) as client,
        shard_listener(topology, group_key(prefix, "live", first)) as on_first,
        shard_listener(topology, group_key(prefix, "live", last)) as on_last,
    ):
        presence = ClusterPresence(client, prefix, "process-a", TIMEOUT)
        await presence.join("quiet", [first, last], entry("quiet"), False)
        # One node forgot the script (restarted): only its share is run again, so
        # no group hears a join twice.
        master_of(topology, group_key(prefix, "live", last)).execute("SCRIPT", "FLUSH")
        await presence.join("ann", [first, last], entry("ann"), True)
        # Nothing was announced for the quiet member: ann's join comes first.
        for conn in (on_first, on_last):
            assert await next_message(conn) == announcement("sseviews.join", entry("ann"))
        await presence.leave("quiet", [first, last], False)
        await presence.leave("ann", [last], True)
        assert await next_message(on_last) == announcement("sseviews.leave", entry("ann"))
        await presence.leave("ann", [first], True)
        assert await next_message(on_first) == announcement("sseviews.leave", entry("ann"))


async def test_cluster_presence_sweeps_a_silent_process_within_the_timeout(
    cluster: tuple[RedisCluster, str],
) -> None:
    """A process that stops beating (as if killed) loses its members, leave announced."""
    topology, prefix = cluster
    first, _, last = groups_on_each_master(topology, prefix)
    async with (
        cluster_client(topology) as client,
        shard_listener(topology, group_key(prefix, "live", first)) as on_first,
        shard_listener(topology, group_key(prefix, "live", last)) as on_last,
    ):
        alive = ClusterPresence(client, prefix, "alive", TIMEOUT)
        dead = ClusterPresence(client, prefix, "dead", TIMEOUT)
        await alive.join("ann", [first], entry("ann"), False)
        await dead.join("bo", [first, last], entry("bo"), True)
        assert await dead.beat(True) is True
        last_beat = time.monotonic()
        for conn in (on_first, on_last):
            assert await next_message(conn) == announcement("sseviews.join", entry("bo"))

        async def heartbeat() -> None:
            while True:
                assert await alive.beat(True) is True
                await anyio.sleep(TIMEOUT / 6)

        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            for conn in (on_first, on_last):
                assert await next_message(conn) == announcement("sseviews.leave", entry("bo"))
            swept = time.monotonic() - last_beat
            tg.cancel_scope.cancel()
        assert swept <= TIMEOUT
        # The heartbeat may have been cancelled in mid-sweep: the next one finishes
        # it (a sweep done twice removes and announces nothing twice).
        assert await alive.beat(True) is True
        assert await alive.list(first, 10) == [entry("ann")]
        assert await alive.count(last) == 0
        # Nothing of the dead process is left: its members, owners, groups set.
        everything = set().union(*(keys_on(master, prefix) for master in topology.masters()))
        assert not [key for key in everything if "dead" in key]
        assert group_key(prefix, "presence", last) not in everything

        # The silent process learns it was swept; its leave now announces nothing,
        # and what it joins from now on is listed (and swept) again.
        assert await dead.beat(True) is False
        await dead.leave("bo", [first, last], True)
        await dead.join("cy", [last], entry("cy"), True)
        assert await next_message(on_last) == announcement("sseviews.join", entry("cy"))
        assert await dead.beat(True) is True
        assert await alive.list(last, 10) == [entry("cy")]
        await anyio.sleep(TIMEOUT)
        assert await alive.beat(True) is True
        assert await next_message(on_last) == announcement("sseviews.leave", entry("cy"))
        assert await alive.count(last) == 0


async def test_cluster_presence_drop_removes_every_member_now(
    cluster: tuple[RedisCluster, str],
) -> None:
    topology, prefix = cluster
    groups = groups_on_each_master(topology, prefix)
    async with (
        cluster_client(topology) as client,
        shard_listener(topology, group_key(prefix, "live", groups[1])) as listener,
    ):
        presence = ClusterPresence(client, prefix, "process-a", TIMEOUT)
        other = ClusterPresence(client, prefix, "process-b", TIMEOUT)
        await other.join("keeper", groups[1:2], entry("keeper"), False)
        # More members in one group than one sweep call removes.
        crowd = [f"m{n}" for n in range(1200)]
        for member in crowd:
            await presence.join(member, groups[1:2], entry(member), False)
        await presence.join("ann", groups, entry("ann"), True)
        assert await next_message(listener) == announcement("sseviews.join", entry("ann"))
        assert await presence.count(groups[1]) == 1202
        # Scripts forgotten (a restarted or promoted node): drop loads them again.
        for master in topology.masters():
            master.execute("SCRIPT", "FLUSH")
        await presence.drop()
        assert await next_message(listener) == announcement("sseviews.leave", entry("ann"))
        assert [await presence.count(group) for group in groups] == [0, 1, 0]
        assert await presence.list(groups[1], 10) == [entry("keeper")]
        await other.drop()
    for master in topology.masters():
        assert keys_on(master, prefix) == set()


async def test_cluster_presence_forgets_groups_left_at_the_next_beat(
    cluster: tuple[RedisCluster, str],
) -> None:
    topology, prefix = cluster
    groups = groups_on_each_master(topology, prefix)
    processes_key = f"{prefix}:presence-processes"
    groups_key = group_key(prefix, "presence-groups", "process-a")
    async with cluster_client(topology) as client:
        presence = ClusterPresence(client, prefix, "process-a", TIMEOUT)
        await presence.join("ann", groups, entry("ann"), False)
        await presence.join("bo", groups[:1], entry("bo"), False)
        assert sorted(await client.smembers(groups_key)) == sorted(g.encode() for g in groups)
        await presence.leave("ann", groups, False)
        assert await presence.beat(True) is True
        assert await client.smembers(groups_key) == {groups[0].encode()}
        await presence.leave("bo", groups[:1], False)
        assert await presence.beat(False) is True
        assert await client.exists(groups_key) == 0
        # Still registered until it drops: the next join needs no registration.
        assert await client.zscore(processes_key, "process-a") is not None
        await presence.drop()
        assert await client.exists(processes_key) == 0


async def test_cluster_presence_join_during_a_pruning_lists_its_group_again(
    cluster: tuple[RedisCluster, str],
) -> None:
    """A group pruned from the process's groups set while a member joins it is added
    back before the member is written, so a sweep would still find the member."""
    topology, prefix = cluster
    group = groups_on_each_master(topology, prefix)[0]
    groups_key = group_key(prefix, "presence-groups", "process-a")
    async with cluster_client(topology) as client:
        presence = ClusterPresence(client, prefix, "process-a", TIMEOUT)
        await presence.join("ann", [group], entry("ann"), False)
        await presence.leave("ann", [group], False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(presence.beat, True)
            # Until the SREM of the group is in flight (nothing signals it).
            with anyio.fail_after(WAIT):
                while presence._pruned.is_set():
                    await anyio.lowlevel.checkpoint()
            await presence.join("bo", [group], entry("bo"), False)
        assert await client.smembers(groups_key) == {group.encode()}
        assert await presence.list(group, 10) == [entry("bo")]


async def test_cluster_presence_works_in_the_other_masters_groups_while_one_is_down(
    cluster: tuple[RedisCluster, str],
) -> None:
    """A master SIGKILLed, before its replica takes over: joins, lists and counts of
    the groups the other masters serve go on, whether the masters know the scripts
    or not (a script is run on its keys' master only, never loaded on every one)."""
    topology, prefix = cluster
    groups = groups_on_each_master(topology, prefix)
    masters = topology.masters()
    # Liveness is per process, in keys of their own slots: the registrations and
    # this process's groups set must be on masters that stay up.
    process = "process-a"
    home = {
        master_of(topology, f"{prefix}:presence-processes").port,
        master_of(topology, group_key(prefix, "presence-groups", process)).port,
    }
    victim = next(master for master in reversed(masters) if master.port not in home)
    kept = [g for g in groups if master_of(topology, group_key(prefix, "live", g)) != victim]
    assert len(kept) == 2
    replica = topology.replica_of(victim)
    async with cluster_client(topology) as client:
        presence = ClusterPresence(client, prefix, process, TIMEOUT)
        await presence.join("ann", kept[:1], entry("ann"), False)  # registered
        try:
            for master in masters:
                master.execute("SCRIPT", "FLUSH")
            await anyio.to_thread.run_sync(topology.kill_master, victim)
            with anyio.fail_after(WAIT):
                # One group (one script call), then both (a pipeline across masters).
                await presence.join("bo", kept[1:], entry("bo"), False)
                await presence.join("cy", kept, entry("cy"), True)
                assert sorted(await presence.list(kept[0], 10)) == sorted(
                    [entry("ann"), entry("cy")]
                )
                assert sorted(await presence.list(kept[1], 10)) == sorted(
                    [entry("bo"), entry("cy")]
                )
                assert [await presence.count(group) for group in kept] == [2, 2]
                await presence.leave("cy", kept, True)
                assert [await presence.count(group) for group in kept] == [1, 1]
            # All of it ran while the victim was down and not replaced, not once a
            # failover had given its slots a master again.
            assert replica.info("replication")["role"] == "slave"
        finally:
            # Restarted only once its replica took over, as after any failover: a
            # master back before that may rejoin the cluster in an odd state.
            if not victim.running:
                await anyio.to_thread.run_sync(
                    topology.wait_for_failover, victim, replica, FAILOVER_TIMEOUT
                )
            await anyio.to_thread.run_sync(topology.heal)


async def present(
    client: EventStreamClient, room: str, user: str, open_streams: dict[str, Any], stop: anyio.Event
) -> None:
    """A browser-like member of `room`: it reconnects whenever its stream ends.
    `open_streams[user]` lists its streams, the last one open (or ending)."""
    while not stop.is_set():
        try:
            async with client.stream(f"/room/{room}?user={user}") as stream:
                open_streams[user].append(stream)
                while not stream.ended and not stop.is_set():  # noqa: ASYNC110 (two conditions)
                    await anyio.sleep(0.05)
        except TimeoutError:
            pass  # no response head in time: try again, as EventSource does
        await anyio.sleep(0.1)


async def users(broadcast: Broadcast, group: str) -> list[str] | None:
    """The users listed in `group` (None while its master cannot answer), after
    checking that the count agrees."""
    try:
        entries = await broadcast.presence(group)
        count = await broadcast.presence_count(group)
    except BackendError:
        return None
    assert count == len(entries), (count, entries)
    return sorted(entry.info["user"] for entry in entries)


@pytest.mark.slow
async def test_cluster_presence_lists_the_reconnected_members_of_lost_groups_once(
    cluster: tuple[RedisCluster, str],
) -> None:
    """A master SIGKILLed and its replica promoted: the streams of its groups end and
    reconnect, and its groups list each reconnected member once (the entries of
    the ended streams, replicated to the new master, are removed), while the other
    masters' groups keep their members throughout."""
    topology, prefix = cluster
    lost, kept = groups_on_each_master(topology, prefix)[:2]
    victim = master_of(topology, group_key(prefix, "live", lost))
    replica = topology.replica_of(victim)
    timeout = 3.0
    broadcast = Broadcast(topology.url(), prefix=prefix)
    assert isinstance(broadcast.live, RedisClusterBackend)
    broadcast.live.presence_timeout = timeout
    room = {group: group.removeprefix("room:") for group in (lost, kept)}
    members = {lost: ["ann", "bo"], kept: ["cy"]}
    streams: dict[str, Any] = {user: [] for names in members.values() for user in names}
    stop = anyio.Event()

    def reconnected() -> bool:
        return all(
            len(streams[user]) >= 2
            and streams[user][-1].status_code == 200
            and not streams[user][-1].ended
            for user in members[lost]
        )

    async def listed(group: str, expected: list[str], seconds: float) -> None:
        with anyio.fail_after(seconds):
            while (seen := await users(broadcast, group)) != expected:  # noqa: ASYNC110 (polls Redis)
                await anyio.sleep(0.1)
        assert seen == expected

    try:
        async with EventStreamClient(member_app(broadcast), timeout=WAIT) as client:
            async with anyio.create_task_group() as tg:
                for group, names in members.items():
                    for user in names:
                        tg.start_soon(present, client, room[group], user, streams, stop)
                for group, names in members.items():
                    await listed(group, names, WAIT)
                # The entries of the streams about to end are on the replica too.
                probe = group_key(prefix, "probe", lost)
                assert await anyio.to_thread.run_sync(lambda: victim.wait_replicated(probe=probe))
                await anyio.to_thread.run_sync(topology.kill_master, victim)
                await anyio.to_thread.run_sync(
                    topology.wait_for_failover, victim, replica, FAILOVER_TIMEOUT
                )
                with anyio.fail_after(FAILOVER_TIMEOUT):
                    while not reconnected():  # noqa: ASYNC110 (polls the streams)
                        await anyio.sleep(0.05)
                # Each member of the lost group is listed once: the entries of its
                # ended stream (on the new master too) go, by the leave retried.
                await listed(lost, members[lost], timeout)
                # And stays so: no entry of an ended stream comes back, no sweep
                # removes a live member, no stream ends again.
                count = {user: len(streams[user]) for user in streams}
                for _ in range(int(timeout * 2 / 0.25)):
                    assert await users(broadcast, lost) == members[lost]
                    assert await users(broadcast, kept) == members[kept]
                    await anyio.sleep(0.25)
                assert {user: len(streams[user]) for user in streams} == count
                assert count["cy"] == 1, count
                stop.set()
            for group in members:
                await listed(group, [], WAIT)
    finally:
        stop.set()
        await broadcast.disconnect()
