"""A live backend on Redis pub/sub: a process subscribes to the channels of its groups.

Each group has a channel of its own, `{prefix}:live:{<escaped group>}` (named as
the group's keys are, so on Redis Cluster it shares their slot), and each message
on it is `seq \\0 wire`. A `RedisStore` created with `publish=True` publishes it
from the script that assigns the seq, so a process receives events in id order;
`deliver` publishes it for stores that assign ids elsewhere (SQL), and for
ephemeral events.

A backend holds one pub/sub connection of its own. It is subscribed to a group's
channel while a subscription of this process uses the group (`subscribe`), and
for `unsubscribe_linger` seconds after the last one left, so a browser that
reconnects at once costs no round trip. One writer task sends what was asked
while its previous command was in flight as one `UNSUBSCRIBE` and one `SUBSCRIBE`
with many channels each. One reader task parses each message, calls `dispatch`
in order, and wakes the callers waiting for a confirmation. When the connection
is lost the backend calls `on_failure`, then reconnects with backoff and
subscribes again to the groups still in use.

Presence (see `_PRESENCE_SCRIPT`) lives in three kinds of keys:

- `{prefix}:presence:{group}`: a hash, member id -> entry JSON (the group name
  with `%` and `:` escaped, so no prefix and group can name another's key);
- `{prefix}:presence-proc:{process}`: a hash, member id -> the groups it joined;
- `{prefix}:presence-procs`: a sorted set, process -> the time its entries expire.

Each process refreshes its own deadline with one heartbeat task; any process
that finds another's deadline passed removes that process's members (announcing
their leave, on each group's channel), so the members of a killed process vanish
within `presence_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import Any

import anyio
import redis.asyncio
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from .._exceptions import BackendError
from .._redis import (
    LUA_LIVE,
    REDIS_ERRORS,
    close_client,
    cluster_node_error,
    describe,
    live_channel,
    live_channel_base,
    live_message,
    open_client,
    parse_live_message,
    redis_errors,
)
from ._channels import Channels, Send
from ._common import ReconnectingBackend, first_error
from .base import Dispatch, OnFailure

__all__ = ["RedisBackend"]

logger = logging.getLogger("sseviews.redis")

# Channels per SUBSCRIBE or UNSUBSCRIBE command: a batch larger than this (a
# reconnection with many groups in use) is sent as several commands in one write,
# so Redis serves other clients between them.
_CHANNELS_PER_COMMAND = 1000


async def connect_or_close(conn: AbstractConnection) -> AbstractConnection:
    """Connect `conn`; disconnect it again if that fails or is cancelled."""
    try:
        await conn.connect()  # type: ignore[no-untyped-call]
    except BaseException:
        with anyio.CancelScope(shield=True):
            await conn.disconnect(nowait=True)
        raise
    return conn


def dispatch_message(dispatch: Dispatch, group: str, channel: bytes, body: bytes) -> None:
    """Hand one `live_message` of `group` to `dispatch`."""
    try:
        seq_number, wire = parse_live_message(body)
    except ValueError:
        logger.warning("ignoring a malformed message on %r", channel.decode(errors="replace"))
        return
    try:
        dispatch(group, seq_number, wire)
    except Exception:
        logger.exception("dispatching event %d of %r failed", seq_number, group)


class _RedisPresenceBackend(ReconnectingBackend):
    """What `RedisBackend` and `RedisClusterBackend` share: the prefix check, and
    presence around their scripts (the `_script_*` methods)."""

    _where: str  # the server, for messages

    def _init_redis(self, prefix: str, presence_timeout: float) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty str, got {prefix!r}")
        self._init_presence(presence_timeout)
        # Leaves that failed (Redis down): retried by the heartbeat, or the member
        # would stay listed for as long as this process lives.
        self._unleft: list[tuple[str, tuple[str, ...], bool]] = []

    async def _script_join(
        self, member: str, groups: Sequence[str], entry: bytes, announce: bool
    ) -> None:
        raise NotImplementedError

    async def _script_leave(self, member: str, groups: Sequence[str], announce: bool) -> None:
        raise NotImplementedError

    async def _script_beat(self, present: bool) -> bool:
        """Refresh this process's deadline and sweep dead processes; return False
        if this process had been removed meanwhile."""
        raise NotImplementedError

    async def _script_list(self, group: str, limit: int) -> list[bytes]:
        raise NotImplementedError

    async def _script_count(self, group: str) -> int:
        raise NotImplementedError

    async def presence_join(
        self, member: str, groups: Sequence[str], entry: bytes, announce: bool
    ) -> None:
        """List `member` in `groups` (the script also announces it)."""
        with self._joining(), redis_errors(f"joining presence on {self._where}"):
            await self._script_join(member, groups, entry, announce)

    async def presence_leave(
        self, member: str, groups: Sequence[str], entry: bytes, announce: bool
    ) -> None:
        """Remove `member` from `groups` (the script also announces it)."""
        try:
            with redis_errors(f"leaving presence on {self._where}"):
                await self._script_leave(member, groups, announce)
        except BaseException:
            self._unleft.append((member, tuple(groups), announce))
            raise
        self._present -= 1

    async def presence_list(self, group: str, limit: int) -> list[bytes]:
        """Return at most `limit` entries of `group`, after removing dead processes'."""
        with redis_errors(f"reading presence from {self._where}"):
            return await self._script_list(group, limit)

    async def presence_count(self, group: str) -> int:
        """Return the number of members of `group`, after removing dead processes'."""
        with redis_errors(f"reading presence from {self._where}"):
            return await self._script_count(group)

    async def _beat(self) -> None:
        """Refresh this process's deadline and sweep dead processes, every timeout/6."""
        while self._heartbeat is not None:  # disconnect() clears it, then cancels this task
            try:
                # asyncio's own timeout (these backends are asyncio-only): it lets the
                # native cancellation from disconnect() through, where anyio's
                # fail_after swallowed it and the heartbeat never ended.
                async with asyncio.timeout(self.attempt_timeout):
                    while self._unleft:
                        member, groups, announce = self._unleft[-1]
                        await self._script_leave(member, groups, announce)
                        self._unleft.pop()
                        self._present -= 1
                    kept = await self._script_beat(self._present > 0)
                if not kept:
                    logger.warning(
                        "this process missed its presence heartbeats for more than %ss: "
                        "other processes removed its members from presence",
                        self.presence_timeout,
                    )
            except (*REDIS_ERRORS, BackendError, TimeoutError) as exc:
                if self._heartbeat is None:
                    # Cancelled by disconnect() in mid-command: redis-py may report
                    # that cancellation as a connection error. Stop, don't retry.
                    return
                logger.warning("presence heartbeat to %s failed: %s", self._where, exc)
            except Exception:
                logger.exception("presence heartbeat to %s failed", self._where)
            if self._heartbeat is None:
                return
            await anyio.sleep(self.presence_timeout / 6)


class RedisBackend(_RedisPresenceBackend):
    """Carries events between processes with Redis pub/sub, one channel per group.

    Args:
        url_or_client: A `redis://host:port/db` URL, a
            `redis+sentinel://host:port[,host:port...]/service[/db]` URL (the
            backend follows the master through failovers), or a ready
            `redis.asyncio.Redis` client (which the backend does not close).
        prefix: Prefix of the pub/sub channels; use the prefix of the `RedisStore`.
        presence_timeout: Bound, in seconds, on how long the members of a process
            that died without cleaning up stay listed.

    Raises:
        ValueError: A bad URL or prefix.
        TypeError: `url_or_client` is neither a str nor a Redis client.
    """

    def __init__(
        self,
        url_or_client: str | redis.asyncio.Redis,
        *,
        prefix: str = "sseviews",
        presence_timeout: float = 30.0,
    ) -> None:
        self._init_redis(prefix, presence_timeout)
        self._client, self._owned = open_client(url_or_client)
        self.prefix = prefix
        self._where = describe(self._client)
        self._task: asyncio.Task[None] | None = None
        self._conn: AbstractConnection | None = None  # None while disconnected or reconnecting
        self._healthy = False
        # The groups in use, and what the pub/sub connection is subscribed to.
        self._channels = Channels(
            self._channel,
            linger=self.unsubscribe_linger,
            attempt_timeout=self.attempt_timeout,
            where=self._where,
        )

    @property
    def healthy(self) -> bool:
        """False before `connect`, after `disconnect`, and while reconnecting."""
        return self._healthy

    async def connect(self, dispatch: Dispatch, on_failure: OnFailure) -> None:
        """Open the pub/sub connection, and start calling `dispatch` for the events of
        the groups subscribed to.

        Raises:
            BackendError: Redis cannot be reached, or is a Redis Cluster node.
            RuntimeError: The backend is already connected.
        """
        if self._task is not None:
            raise RuntimeError("this RedisBackend is already connected")
        try:
            with redis_errors(f"subscribing to {self._where}"):
                await self._check_not_cluster()
                conn = await self._open()
        except BaseException:
            if self._owned:
                with anyio.move_on_after(1, shield=True):
                    await close_client(self._client)
            raise
        channels = self._channels
        # Read now: an app (or a test) may change them after construction.
        channels.linger = self.unsubscribe_linger
        channels.attempt_timeout = self.attempt_timeout
        channels.open()
        self._conn = conn
        channels.attach(self._sender(conn))
        self._healthy = True
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(
            self._run(conn, dispatch, on_failure), name=f"sseviews redis reader {self.prefix}"
        )
        self._heartbeat = loop.create_task(
            self._beat(), name=f"sseviews redis presence heartbeat {self.prefix}"
        )

    async def disconnect(self) -> None:
        """Stop the reader, unsubscribe, and close the client if made from a URL."""
        task, self._task = self._task, None
        heartbeat, self._heartbeat = self._heartbeat, None
        self._healthy = False
        # Runs even if the caller is cancelled, and ends within a second.
        with anyio.move_on_after(1, shield=True):
            if heartbeat is not None:
                heartbeat.cancel()
                await asyncio.wait({heartbeat})
                # Streams still listed (a server stopping) leave now, not at the timeout.
                try:
                    await self._presence("drop")
                except REDIS_ERRORS as exc:
                    logger.warning("removing this process's presence failed: %s", exc)
            if task is not None:
                task.cancel()
                await asyncio.wait({task})
        conn, self._conn = self._conn, None
        self._channels.close()
        # Closed even when a step above ran out of time: nothing may stay open.
        with anyio.move_on_after(1, shield=True):
            if conn is not None:
                await conn.disconnect(nowait=True)
            if self._owned:
                await close_client(self._client)

    async def deliver(self, group: str, seq: int, wire: bytes) -> None:
        """Publish one stored event to the processes that serve `group`.

        Raises:
            BackendError: Redis cannot be reached.
        """
        with redis_errors(f"publishing to {self._where}"):
            await self._client.publish(live_channel(self.prefix, group), live_message(seq, wire))

    # -- which groups this process receives ------------------------------------------

    async def subscribe(self, groups: Sequence[str]) -> None:
        """Subscribe to the channels of `groups`; return once Redis confirmed them.

        Groups already subscribed (or lingering, see `unsubscribe_linger`) cost
        no round trip. Requests made while the previous command is in flight go
        to Redis together, as one `SUBSCRIBE`.

        Raises:
            BackendError: The backend is not connected, or lost its connection
                before Redis confirmed (the groups stay wanted, and are
                subscribed again once it reconnects).
        """
        await self._channels.subscribe(groups)

    def unsubscribe(self, groups: Sequence[str]) -> None:
        """Unsubscribe from the channels of `groups` after `unsubscribe_linger` seconds,
        unless they are subscribed to again meanwhile."""
        self._channels.unsubscribe(groups)

    def _channel(self, group: str) -> bytes:
        return live_channel(self.prefix, group).encode()

    # -- the pub/sub connection ------------------------------------------------------

    def _new_connection(self) -> AbstractConnection:
        pool = self._client.connection_pool
        kwargs: dict[str, Any] = {
            **pool.connection_kwargs,
            # A silent reconnect would resubscribe over a gap: this backend
            # reconnects itself, after telling the broadcast with on_failure.
            "retry": Retry(NoBackoff(), 0),
            "retry_on_error": [],
            "retry_on_timeout": False,
            "health_check_interval": 0,
            "decode_responses": False,
        }
        if issubclass(pool.connection_class, Connection):
            # Notice a peer that vanished without closing the socket.
            kwargs["socket_keepalive"] = True
        conn: AbstractConnection = pool.connection_class(**kwargs)
        return conn

    # A plain client on a Redis Cluster node reaches only that node's slots. Asked
    # on a connection of its own, so connect() leaves the client's pool untouched.
    async def _check_not_cluster(self) -> None:
        conn = self._new_connection()
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
            await conn.send_command("INFO", "cluster", check_health=False)
            reply = await conn.read_response()
        except ResponseError:  # INFO refused (a restricted managed Redis): nothing to tell
            return
        finally:
            with anyio.CancelScope(shield=True):
                await conn.disconnect(nowait=True)
        if isinstance(reply, bytes) and b"cluster_enabled:1" in reply:
            raise cluster_node_error(self._where)

    async def _open(self) -> AbstractConnection:
        return await connect_or_close(self._new_connection())

    def _sender(self, conn: AbstractConnection) -> Send:
        async def send(subscribe: list[bytes], unsubscribe: list[bytes]) -> None:
            step = _CHANNELS_PER_COMMAND
            commands: list[list[bytes | str]] = [
                [name, *channels[i : i + step]]
                for name, channels in (("UNSUBSCRIBE", unsubscribe), ("SUBSCRIBE", subscribe))
                for i in range(0, len(channels), step)
            ]
            if not conn.is_connected:
                # send_packed_command would open a new socket that nobody reads.
                raise ConnectionError(f"the connection to {self._where} was closed")
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)

        return send

    def _recovered(self) -> None:
        # Every group in use is subscribed again after a reconnection.
        self._healthy = True
        logger.info("subscribed again to %s", self._where)

    async def _run(
        self, conn: AbstractConnection, dispatch: Dispatch, on_failure: OnFailure
    ) -> None:
        channels = self._channels
        try:
            while True:
                error = await self._serve(conn, dispatch)
                self._healthy = False
                self._conn = None
                channels.detach()
                await conn.disconnect(nowait=True)
                logger.warning(
                    "lost the subscription to %s (%s); ending live subscribers and reconnecting",
                    self._where,
                    error,
                )
                failure = BackendError(f"lost the connection to {self._where}: {error}")
                failure.__cause__ = error
                try:
                    on_failure(failure)
                except Exception:
                    logger.exception("on_failure callback failed")
                conn = self._conn = await self._reconnect()
                # The writer subscribes to every group still in use, then sets healthy.
                channels.attach(self._sender(conn), self._recovered)
        finally:
            with anyio.CancelScope(shield=True):
                await conn.disconnect(nowait=True)

    async def _serve(self, conn: AbstractConnection, dispatch: Dispatch) -> Exception:
        """Read and write on `conn` until it fails; return why."""
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(conn, dispatch), name="sseviews redis pubsub reader")
        writer = loop.create_task(self._channels.run(), name="sseviews redis pubsub writer")
        error = await first_error(
            {reader, writer}, (reader, writer), REDIS_ERRORS, logger, f"reading from {self._where}"
        )
        # None is unreachable: both loop forever.
        return error or ConnectionError("the subscription ended")

    async def _read(self, conn: AbstractConnection, dispatch: Dispatch) -> None:
        channels = self._channels
        while True:
            # math.inf: block without the client's socket_timeout, as PubSub does.
            reply = await conn.read_response(
                disable_decoding=True, timeout=math.inf, push_request=True
            )
            if not isinstance(reply, list) or len(reply) != 3:
                continue
            kind, channel, body = reply
            if kind == b"message":
                group = channels.group_of(channel)
                if group is None:
                    continue
                dispatch_message(dispatch, group, channel, body)
            elif kind == b"subscribe" or kind == b"unsubscribe":
                channels.confirmed_by_server(kind == b"subscribe", channel)

    async def _reconnect(self) -> AbstractConnection:
        delay = self.first_retry_delay
        while True:
            await anyio.sleep(delay)
            try:
                with anyio.fail_after(self.attempt_timeout):
                    return await self._open()
            except REDIS_ERRORS as exc:
                logger.debug("reconnecting to %s failed: %s", self._where, exc)
            except Exception:
                # Keep trying: giving up would leave the backend unhealthy for good.
                logger.exception("unexpected error reconnecting to %s", self._where)
            delay = min(delay * 2, self.max_retry_delay)

    # -- presence ----------------------------------------------------------------------

    async def _presence(self, op: str, *args: str | bytes | int) -> Any:
        prefix = self.prefix
        return await self._client.eval(
            _PRESENCE_SCRIPT,
            0,
            op,
            f"{prefix}:presence:",
            f"{prefix}:presence-procs",
            f"{prefix}:presence-proc:",
            live_channel_base(prefix),
            self._process,
            # The process's deadline is refreshed every timeout/6 and lies timeout*2/3
            # ahead: once it passes, the next heartbeat of any process (at most
            # timeout/6 later) removes the members, within the timeout.
            repr(self.presence_timeout * 2 / 3),
            *args,
        )

    async def _script_join(
        self, member: str, groups: Sequence[str], entry: bytes, announce: bool
    ) -> None:
        await self._presence("join", member, entry, "1" if announce else "0", *groups)

    async def _script_leave(self, member: str, groups: Sequence[str], announce: bool) -> None:
        await self._presence("leave", member, "1" if announce else "0", *groups)

    async def _script_beat(self, present: bool) -> bool:
        return bool(await self._presence("beat", "1" if present else "0") != 0)

    async def _script_list(self, group: str, limit: int) -> list[bytes]:
        entries: list[bytes] = await self._presence("list", group, limit)
        return entries

    async def _script_count(self, group: str) -> int:
        count: int = await self._presence("count", group)
        return count


# Every presence operation, in one script so that each is atomic and costs one
# round trip. ARGV: op, group key base, processes key, process key base, live
# channel base (`live_channel_base`), this process, registration lifetime (s), then
# the op's own arguments.
# A member's value in its process hash is `announce \0 group \0 group ...`.
# Group names never hold NUL or whitespace (check_group), entries never hold NUL.
_PRESENCE_SCRIPT = (
    LUA_LIVE
    + r"""
local op, gbase, procs, pbase, cbase, proc = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local lifetime = tonumber(ARGV[7])

local function gkey(group)
  return gbase .. (string.gsub(group, '[%%:]', {['%'] = '%25', [':'] = '%3A'}))
end


local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function split(s)
  local parts, start = {}, 1
  while true do
    local i = string.find(s, '\0', start, true)
    if not i then
      parts[#parts + 1] = string.sub(s, start)
      return parts
    end
    parts[#parts + 1] = string.sub(s, start, i - 1)
    start = i + 1
  end
end

local function announce(group, event, entry)
  redis.call('PUBLISH', live_channel(cbase, group), live_event(event, entry))
end

-- Remove a member from its groups (announcing its leave if asked).
local function remove(member, value)
  local parts = split(value)
  for j = 2, #parts do
    local key = gkey(parts[j])
    if parts[1] == '1' then
      local entry = redis.call('HGET', key, member)
      if entry then announce(parts[j], LEAVE_EVENT, entry) end
    end
    redis.call('HDEL', key, member)
  end
end

local function drop(process)
  local pkey = pbase .. process
  local all = redis.call('HGETALL', pkey)
  for i = 1, #all, 2 do remove(all[i], all[i + 1]) end
  redis.call('DEL', pkey)
  redis.call('ZREM', procs, process)
end

local function sweep()
  local dead = redis.call('ZRANGEBYSCORE', procs, '-inf', now(), 'LIMIT', 0, 100)
  for _, process in ipairs(dead) do drop(process) end
end

if op == 'join' then
  local member, entry, flag = ARGV[8], ARGV[9], ARGV[10]
  local groups = {}
  for i = 11, #ARGV do groups[#groups + 1] = ARGV[i] end
  redis.call('ZADD', procs, now() + lifetime, proc)
  redis.call('HSET', pbase .. proc, member, flag .. '\0' .. table.concat(groups, '\0'))
  for _, group in ipairs(groups) do
    redis.call('HSET', gkey(group), member, entry)
    if flag == '1' then announce(group, JOIN_EVENT, entry) end
  end
  return 1
elseif op == 'leave' then
  local member, flag = ARGV[8], ARGV[9]
  local pkey = pbase .. proc
  -- Gone already when another process swept this one (a missed heartbeat): then
  -- its leave was announced by that process.
  if redis.call('HDEL', pkey, member) == 1 then
    local groups = {}
    for i = 10, #ARGV do groups[#groups + 1] = ARGV[i] end
    remove(member, flag .. '\0' .. table.concat(groups, '\0'))
  end
  return 1
elseif op == 'beat' then
  sweep()
  local known = redis.call('ZSCORE', procs, proc)
  if ARGV[8] == '1' then
    redis.call('ZADD', procs, now() + lifetime, proc)
    if not known and redis.call('EXISTS', pbase .. proc) == 0 then return 0 end
  elseif redis.call('EXISTS', pbase .. proc) == 0 then
    redis.call('ZREM', procs, proc)
  end
  return 1
elseif op == 'list' then
  sweep()
  local key, limit = gkey(ARGV[8]), tonumber(ARGV[9])
  if redis.call('HLEN', key) <= limit then return redis.call('HVALS', key) end
  local entries, cursor = {}, '0'
  repeat
    local page = redis.call('HSCAN', key, cursor, 'COUNT', 500)
    cursor = page[1]
    for i = 2, #page[2], 2 do
      if #entries < limit then entries[#entries + 1] = page[2][i] end
    end
  until cursor == '0' or #entries >= limit
  return entries
elseif op == 'count' then
  sweep()
  return redis.call('HLEN', gkey(ARGV[8]))
elseif op == 'drop' then
  drop(proc)
  return 1
end
return redis.error_reply('unknown presence operation ' .. op)
"""
)
