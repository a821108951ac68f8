"""A live backend on Redis Cluster sharded pub/sub: one connection per shard master.

Each group's channel, `{prefix}:live:{<escaped group>}`, carries the group's hash
tag, so it lives in the slot of the group's keys: a `RedisStore` on the same
cluster publishes each event with `SPUBLISH` from the script that gives it its
id, on the master that owns the slot, and `deliver` does the same for ephemeral
events. A process holds one pub/sub connection per master that owns a group its
streams use (`SSUBSCRIBE`), so at most as many as the cluster has masters, never
one per group; each connection has its own `Channels` (wanted groups, linger,
batching, confirmation waits; see `_channels.py`).

A shard's connection can go away in two ways, and both end only the
subscriptions of the groups it carried (`GroupsLost`), which resume from the
history:

- the connection fails (its master was killed, a failover): the backend reloads
  the slot map until another node owns the slots, moves the groups to it, and
  subscribes them there;
- the master tells this process `sunsubscribe` for a channel it did not ask to
  leave: the channel's slot moved to another master (a resharding).

A `SSUBSCRIBE` answered with `MOVED` or `ASK` (the slot map was out of date)
never delivered anything: the group moves to the node named, and its callers go
on waiting there.

Presence is kept by `ClusterPresence` (`_redis_presence.py`), whose scripts each
touch one group's slot; one heartbeat task per backend refreshes this process's
registration and sweeps dead processes. Without that module, the presence
methods raise `NotImplementedError`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import anyio
import redis.asyncio
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ResponseError

from .._exceptions import BackendError
from .._redis import (
    REDIS_ERRORS,
    check_cluster,
    close_client,
    cluster_pool_size,
    describe,
    live_channel,
    live_message,
    open_cluster_client,
    redis_errors,
)
from ._channels import Channels, Rerouted, Send
from ._common import first_error
from .base import Dispatch, GroupsLost, OnFailure
from .redis import _RedisPresenceBackend, connect_or_close, dispatch_message

__all__ = ["RedisClusterBackend"]

logger = logging.getLogger("sseviews.redis")

# How many times a subscribe follows its groups to another shard before it fails.
_MAX_REROUTES = 5


def _cluster_presence(client: Any, prefix: str, process: str, timeout: float) -> Any:
    """A `ClusterPresence`, or None where that module is missing."""
    try:
        module = importlib.import_module("sseviews.backends._redis_presence")
    except ImportError:
        return None
    return module.ClusterPresence(client, prefix, process, timeout)


class _Shard:
    """The pub/sub connection to one master, and the channels it carries."""

    __slots__ = ("channels", "conn", "host", "linked", "name", "pending", "port", "task")

    def __init__(self, host: str, port: int, channels: Channels[bytes]) -> None:
        self.host = host
        self.port = port
        self.name = f"{host}:{port}"
        self.channels = channels
        self.conn: AbstractConnection | None = None
        self.task: asyncio.Task[None] | None = None
        # Set while a connection is attached.
        self.linked = asyncio.Event()
        # (subscribe?, channel) of each command sent and not answered yet, in order:
        # an error reply answers the oldest one.
        self.pending: deque[tuple[bool, bytes]] = deque()


class RedisClusterBackend(_RedisPresenceBackend):
    """Carries events between processes with Redis Cluster sharded pub/sub.

    Args:
        url_or_client: A `redis+cluster://host:port[,host:port...]/` URL
            (`rediss+cluster://` for TLS), or a ready `redis.asyncio.RedisCluster`
            client (which the backend does not close).
        prefix: Prefix of the channels; use the prefix of the `RedisStore`.
        presence_timeout: Bound, in seconds, on how long the members of a process
            that died without cleaning up stay listed.

    Raises:
        ValueError: A bad URL or prefix.
        TypeError: `url_or_client` is neither a str nor a RedisCluster client.
    """

    def __init__(
        self,
        url_or_client: str | redis.asyncio.RedisCluster,
        *,
        prefix: str = "sseviews",
        presence_timeout: float = 30.0,
    ) -> None:
        self._init_redis(prefix, presence_timeout)
        self._presence: Any = None  # a ClusterPresence, made by connect()
        self._client, self._owned = open_cluster_client(url_or_client)
        self.prefix = prefix
        self._where = describe(self._client)
        self._connected = False
        self._dispatch: Dispatch | None = None
        self._on_failure: OnFailure | None = None
        # Shard connections by master name ("host:port").
        self._shards: dict[str, _Shard] = {}
        # The shard each group in use (or lingering) is wanted on.
        self._route: dict[str, _Shard] = {}
        self._refreshing = asyncio.Lock()
        self._refreshed_at = -math.inf
        # Publishes wait here for a free connection (see cluster_pool_size).
        self._limiter = asyncio.Semaphore(cluster_pool_size(self._client))

    @property
    def healthy(self) -> bool:
        """False before `connect` and after `disconnect`. A shard that is failing
        over refuses only the subscriptions of its own groups."""
        return self._connected

    @property
    def shard_connections(self) -> int:
        """How many pub/sub connections this backend holds (one per master in use)."""
        return sum(1 for shard in self._shards.values() if shard.conn is not None)

    async def connect(self, dispatch: Dispatch, on_failure: OnFailure) -> None:
        """Load the slot map and open a pub/sub connection to each master.

        Raises:
            BackendError: The cluster cannot be reached, or the nodes are not in
                cluster mode.
            RuntimeError: The backend is already connected.
        """
        if self._connected:
            raise RuntimeError("this RedisClusterBackend is already connected")
        try:
            await check_cluster(self._client, self._where)
            self._where = describe(self._client)
        except BaseException:
            if self._owned:
                with anyio.move_on_after(1, shield=True):
                    await close_client(self._client)
            raise
        self._dispatch = dispatch
        self._on_failure = on_failure
        self._refreshing = asyncio.Lock()
        self._connected = True
        for node in self._client.get_primaries():
            self._shard(node.host, int(node.port))
        self._presence = _cluster_presence(
            self._client, self.prefix, self._process, self.presence_timeout
        )
        if self._presence is not None:
            self._heartbeat = asyncio.get_running_loop().create_task(
                self._beat(), name=f"sseviews redis cluster presence heartbeat {self.prefix}"
            )
        # Wait (bounded) for the masters' connections, so the first streams need
        # not; a master that cannot be reached now is retried in the background.
        with anyio.move_on_after(self.attempt_timeout):
            for shard in list(self._shards.values()):
                await shard.linked.wait()

    async def disconnect(self) -> None:
        """Close every shard connection, and the client if made from a URL."""
        self._connected = False
        heartbeat, self._heartbeat = self._heartbeat, None
        with anyio.move_on_after(1, shield=True):
            if heartbeat is not None:
                heartbeat.cancel()
                await asyncio.wait({heartbeat})
                # Streams still listed (a server stopping) leave now, not at the timeout.
                try:
                    await self._presence.drop()
                except (*REDIS_ERRORS, BackendError) as exc:
                    logger.warning("removing this process's presence failed: %s", exc)
        self._presence = None
        shards, self._shards = list(self._shards.values()), {}
        self._route.clear()
        with anyio.move_on_after(1, shield=True):
            for shard in shards:
                shard.channels.close()
                if shard.task is not None:
                    shard.task.cancel()
            tasks = {shard.task for shard in shards if shard.task is not None}
            if tasks:
                await asyncio.wait(tasks)
        with anyio.move_on_after(1, shield=True):
            for shard in shards:
                if shard.conn is not None:
                    await shard.conn.disconnect(nowait=True)
                    shard.conn = None
            if self._owned:
                await close_client(self._client)

    async def deliver(self, group: str, seq: int, wire: bytes) -> None:
        """Publish one event with `SPUBLISH` on the master of the group's slot.

        Raises:
            BackendError: The cluster cannot be reached.
        """
        with redis_errors(f"publishing to {self._where}"):
            async with self._limiter:
                await self._client.execute_command(
                    "SPUBLISH", self._channel(group), live_message(seq, wire)
                )

    # -- presence ----------------------------------------------------------------------

    def _presence_of(self) -> Any:
        if self._presence is None:
            raise NotImplementedError(
                "presence on Redis Cluster needs sseviews.backends._redis_presence "
                "(ClusterPresence), which this installation lacks"
                if self._connected
                else f"the backend is not connected to {self._where}"
            )
        return self._presence

    async def _script_join(
        self, member: str, groups: Sequence[str], entry: bytes, announce: bool
    ) -> None:
        # One script on each group's master.
        await self._presence_of().join(member, groups, entry, announce)

    async def _script_leave(self, member: str, groups: Sequence[str], announce: bool) -> None:
        await self._presence_of().leave(member, groups, announce)

    async def _script_beat(self, present: bool) -> bool:
        return bool(await self._presence_of().beat(present))

    async def _script_list(self, group: str, limit: int) -> list[bytes]:
        entries: list[bytes] = await self._presence_of().list(group, limit)
        return entries

    async def _script_count(self, group: str) -> int:
        count: int = await self._presence_of().count(group)
        return count

    # -- which groups this process receives ------------------------------------------

    def _channel(self, group: str) -> bytes:
        return live_channel(self.prefix, group).encode()

    def _owner(self, group: str) -> tuple[str, int]:
        node = self._client.nodes_manager.get_node_from_slot(key_slot(self._channel(group)))
        return node.host, int(node.port)

    def _shard(self, host: str, port: int) -> _Shard:
        """The shard of the master at host:port, started if new."""
        name = f"{host}:{port}"
        shard = self._shards.get(name)
        if shard is None:
            channels = Channels(
                self._channel,
                linger=self.unsubscribe_linger,
                attempt_timeout=self.attempt_timeout,
                where=f"Redis Cluster master {name}",
            )
            channels.open()
            shard = self._shards[name] = _Shard(host, port, channels)
            shard.task = asyncio.get_running_loop().create_task(
                self._run(shard), name=f"sseviews redis cluster shard {name}"
            )
        return shard

    async def subscribe(self, groups: Sequence[str]) -> None:
        """`SSUBSCRIBE` to the channels of `groups` on their masters; return once
        each master confirmed.

        Raises:
            BackendError: The backend is not connected, or a group's master cannot
                be reached (it is failing over: the group stays wanted).
        """
        if not self._connected:
            raise BackendError(f"the backend is not connected to {self._where}")
        todo = list(dict.fromkeys(groups))
        for _ in range(_MAX_REROUTES):
            by_shard: dict[_Shard, list[str]] = {}
            for group in todo:
                shard = self._route.get(group)
                if shard is None:
                    try:
                        shard = self._shard(*self._owner(group))
                    except REDIS_ERRORS as exc:
                        raise BackendError(f"no master for group {group!r}: {exc}") from exc
                    self._route[group] = shard
                by_shard.setdefault(shard, []).append(group)
            rerouted: list[str] = []
            errors: list[BackendError] = []

            if len(by_shard) == 1:
                [(shard, mine)] = by_shard.items()
                await self._subscribe_on(shard, mine, rerouted, errors)
            else:
                # Every shard's confirmation at once; errors are collected, so the
                # caller gets one BackendError, never a group of them.
                async with anyio.create_task_group() as tg:
                    for shard, mine in by_shard.items():
                        tg.start_soon(self._subscribe_on, shard, mine, rerouted, errors)
            if errors:
                raise errors[0]
            if not rerouted:
                return
            todo = rerouted
        raise BackendError(f"the slots of groups {todo!r} kept moving; try again")

    async def _subscribe_on(
        self,
        shard: _Shard,
        groups: list[str],
        rerouted: list[str],
        errors: list[BackendError],
    ) -> None:
        if not shard.linked.is_set():
            # A master found since connect(): its connection is being opened.
            with anyio.move_on_after(self.attempt_timeout):
                await shard.linked.wait()
        try:
            await shard.channels.subscribe(groups)
        except Rerouted:
            rerouted.extend(groups)
        except BackendError as exc:
            errors.append(exc)

    def unsubscribe(self, groups: Sequence[str]) -> None:
        """Unsubscribe from the channels of `groups` after `unsubscribe_linger` seconds,
        unless they are subscribed to again meanwhile."""
        for group in groups:
            shard = self._route.get(group)
            if shard is not None:
                # The route stays while the group lingers: a new stream finds it.
                shard.channels.unsubscribe([group])

    def _move(self, shard: _Shard, groups: Sequence[str], owner: tuple[str, int]) -> None:
        """Take `groups` from `shard` to the shard of `owner`, still wanted there."""
        moved = shard.channels.release(groups)
        target = self._shard(*owner)
        for group in groups:
            if self._route.get(group) is shard:
                del self._route[group]
        for group in moved:
            self._route[group] = target
        if moved:
            target.channels.want(moved)

    async def _refresh(self, failed: str | None = None) -> None:
        """Reload the slot map (at most one reload at a time, and not again within
        0.2 s: concurrent callers share one)."""
        asked = time.monotonic()
        async with self._refreshing:
            if self._refreshed_at >= asked - 0.2:
                return
            with anyio.fail_after(self.attempt_timeout):
                await self._client.nodes_manager.initialize(last_failed_node_name=failed)
            self._refreshed_at = time.monotonic()

    async def _reroute(self, shard: _Shard) -> None:
        """Move the groups of `shard` whose slots another master owns now."""
        channels = shard.channels
        groups = [g for g, s in self._route.items() if s is shard]
        by_owner: dict[tuple[str, int], list[str]] = {}
        for group in groups:
            owner = self._owner(group)
            if owner != (shard.host, shard.port):
                by_owner.setdefault(owner, []).append(group)
        for owner, moving in by_owner.items():
            logger.info("%d group(s) of %s moved to %s:%d", len(moving), channels.where, *owner)
            self._move(shard, moving, owner)

    # -- one shard's connection ------------------------------------------------------

    def _new_connection(self, shard: _Shard) -> AbstractConnection:
        node = self._client.get_node(shard.host, shard.port)
        if node is None:
            node = self._client.get_nodes()[0]
            kwargs: dict[str, Any] = {**node.connection_kwargs}
            kwargs["host"], kwargs["port"] = shard.host, shard.port
        else:
            kwargs = {**node.connection_kwargs}
        kwargs.update(
            # This backend reconnects itself, after telling the broadcast.
            retry=Retry(NoBackoff(), 0),
            retry_on_error=[],
            retry_on_timeout=False,
            health_check_interval=0,
            decode_responses=False,
        )
        if issubclass(node.connection_class, Connection):
            kwargs["socket_keepalive"] = True
        conn: AbstractConnection = node.connection_class(**kwargs)
        return conn

    async def _open(self, shard: _Shard) -> AbstractConnection:
        with anyio.fail_after(self.attempt_timeout):
            return await connect_or_close(self._new_connection(shard))

    def _sender(self, shard: _Shard, conn: AbstractConnection) -> Send:
        async def send(subscribe: list[bytes], unsubscribe: list[bytes]) -> None:
            # One channel per command: a sharded command's channels must share a
            # slot, and an error reply then answers exactly one channel.
            commands: list[list[bytes | str]] = []
            for channel in unsubscribe:
                commands.append(["SUNSUBSCRIBE", channel])
                shard.pending.append((False, channel))
            for channel in subscribe:
                commands.append(["SSUBSCRIBE", channel])
                shard.pending.append((True, channel))
            if not conn.is_connected:
                raise ConnectionError(f"the connection to {shard.name} was closed")
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)

        return send

    async def _run(self, shard: _Shard) -> None:
        """Keep `shard`'s connection up, until its groups live elsewhere."""
        channels = shard.channels
        delay = self.first_retry_delay
        try:
            while self._connected:
                try:
                    conn = await self._open(shard)
                except (*REDIS_ERRORS, TimeoutError) as exc:
                    logger.debug("connecting to %s failed: %s", shard.name, exc)
                    if await self._abandoned(shard):
                        return
                    await anyio.sleep(delay)
                    delay = min(delay * 2, self.max_retry_delay)
                    continue
                delay = self.first_retry_delay
                shard.conn = conn
                shard.pending.clear()
                channels.attach(self._sender(shard, conn))
                shard.linked.set()
                error = await self._serve(shard, conn)
                shard.linked.clear()
                lost = set(channels.wanted) | set(channels.sent)
                channels.detach()
                shard.conn = None
                await conn.disconnect(nowait=True)
                if not self._connected:
                    return
                logger.warning(
                    "lost the subscription to %s (%s); ending the live subscribers of its "
                    "%d group(s) and reconnecting",
                    channels.where,
                    error,
                    len(lost),
                )
                self._fail(lost, f"lost the connection to {channels.where}: {error}")
                if await self._abandoned(shard, failed=True):
                    return
        except Exception:
            logger.exception("the connection to %s stopped", shard.name)
            raise

    async def _abandoned(self, shard: _Shard, *, failed: bool = False) -> bool:
        """Reload the slot map and move the groups that another master owns now.
        Return True (and forget the shard) when it is no master any more and has no
        group left; otherwise its connection is tried again."""
        try:
            await self._refresh(shard.name if failed else None)
            await self._reroute(shard)
        except (*REDIS_ERRORS, TimeoutError) as exc:
            logger.debug("reloading the slot map of %s failed: %s", self._where, exc)
            return False
        masters = {node.name for node in self._client.get_primaries()}
        if shard.name in masters or any(s is shard for s in self._route.values()):
            return False
        if self._shards.get(shard.name) is shard:
            del self._shards[shard.name]
        shard.channels.close()
        return True

    def _fail(self, groups: set[str], message: str) -> None:
        on_failure = self._on_failure
        if not groups or on_failure is None:
            return
        try:
            on_failure(GroupsLost(message, groups))
        except Exception:
            logger.exception("on_failure callback failed")

    async def _serve(self, shard: _Shard, conn: AbstractConnection) -> BaseException:
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(shard, conn), name="sseviews redis shard reader")
        writer = loop.create_task(shard.channels.run(), name="sseviews redis shard writer")
        error = await first_error(
            {reader, writer}, (reader, writer), REDIS_ERRORS, logger, f"reading from {shard.name}"
        )
        return error or ConnectionError("the subscription ended")

    async def _read(self, shard: _Shard, conn: AbstractConnection) -> None:
        channels = shard.channels
        pending = shard.pending
        dispatch = self._dispatch
        assert dispatch is not None
        while True:
            try:
                reply = await conn.read_response(
                    disable_decoding=True, timeout=math.inf, push_request=True
                )
            except ResponseError as exc:
                # An error reply to the oldest command in flight.
                if pending:
                    subscribing, channel = pending.popleft()
                    channels.refused()
                    if subscribing:
                        await self._refused(shard, channel, exc)
                continue
            if not isinstance(reply, list) or len(reply) != 3:
                continue
            kind, channel, body = reply
            if kind == b"smessage":
                group = channels.group_of(channel)
                if group is not None:
                    dispatch_message(dispatch, group, channel, body)
            elif kind == b"ssubscribe":
                if pending:
                    pending.popleft()
                channels.confirmed_by_server(True, channel)
            elif kind == b"sunsubscribe":
                if pending and pending[0] == (False, channel):
                    pending.popleft()
                    channels.confirmed_by_server(False, channel)
                else:
                    await self._evicted(shard, channel)

    async def _refused(self, shard: _Shard, channel: bytes, error: ResponseError) -> None:
        """A master refused `SSUBSCRIBE` (MOVED, ASK): nothing was delivered; move the
        group to the node named, or to its owner in a fresh slot map."""
        group = shard.channels.group_of(channel)
        if group is None:
            return
        words = str(error).split()
        owner: tuple[str, int] | None = None
        if len(words) == 3 and words[0] == "MOVED":
            host, _, port = words[2].rpartition(":")
            if port.isdigit():
                owner = (host or shard.host, int(port))
        elif words[:1] != ["ASK"]:
            logger.warning("%s refused to subscribe to %r: %s", shard.name, channel, error)
        try:
            # The map is out of date; ASK (a slot being migrated) waits for its end.
            await self._refresh()
            if owner is None:
                owner = self._owner(group)
        except (*REDIS_ERRORS, TimeoutError) as exc:
            logger.debug("reloading the slot map failed: %s", exc)
        if owner is None or owner == (shard.host, shard.port):
            # Asked again here after a pause; its callers ask again (Rerouted).
            wanted = shard.channels.release([group])
            await anyio.sleep(0.1)
            if wanted and group not in shard.channels.wanted:
                self._route[group] = shard
                shard.channels.want(wanted)
            return
        self._move(shard, [group], owner)

    async def _evicted(self, shard: _Shard, channel: bytes) -> None:
        """The master unsubscribed this process from `channel` on its own: the slot
        moved away. Its subscribers may miss events: end them, and follow the slot."""
        group = shard.channels.group_of(channel)
        if group is None:
            return
        self._fail({group}, f"the slot of group {group!r} moved away from {shard.name}")
        try:
            await self._refresh()
            owner = self._owner(group)
        except (*REDIS_ERRORS, TimeoutError) as exc:
            logger.warning("reloading the slot map after a slot moved failed: %s", exc)
            owner = None
        if owner is None or owner == (shard.host, shard.port):
            # Not moved as far as the map says: subscribe again here.
            wanted = shard.channels.release([group])
            self._route[group] = shard
            shard.channels.want(wanted)
            return
        self._move(shard, [group], owner)
