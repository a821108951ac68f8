"""A history store in Redis: one Redis Stream per group, and per group its own ids.

Keys, all under a configurable prefix (default `"sseviews"`), two per group:

- `{prefix}:m:{<group>}`: a hash: `epoch` (the group's epoch, made when the group
  is first used), `last` (the group's last seq: its events are numbered 1, 2, 3...)
  and `trim` (the highest seq trimmed from it), so a cursor older than the retained
  history, or a stream that was evicted, is detected; and `srv`, the replication id
  of the Redis master that last ran a script for the group: on a replica promoted
  by a failover it is the new master's previous id, which starts a new epoch for
  the group (its newest events may not have been replicated).
- `{prefix}:g:{<group>}`: the group's stream; entry id `{seq}-0`, fields `w` (the
  wire bytes, `id:` line included) and `t` (Redis time in ms, for age retention).

In a group's keys the group name is escaped (`%`, `:`, `{` and `}` as `%XX`) and
wrapped in braces: no prefix plus group can spell another prefix's key, and the
braces are the Redis Cluster hash tag, so every key of a group (and its channel)
is in one hash slot. Each script touches only one group's keys: nothing is shared
between groups. A group's keys expire `max_age` (else `idle_expiry`) seconds after
its last event; its next use starts a new epoch.

A group whose hash is missing (expired, evicted, or lost in a restart) starts a new
epoch, so its old ids are never issued again. So does a group whose `last` is below
a seq of the same epoch that this store issued or saw (a restored snapshot, a
failover to a lagging replica): the store remembers that per group, for the most
recent groups.

`append` runs one Lua script that takes the seq, stores the event, trims the group
and (with `publish=True`) publishes it on the group's channel,
`{prefix}:live:{<escaped group>}` (in the slot of the group's keys), so events reach
the `RedisBackend` of every process that serves the group, in id order.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import anyio
import redis.asyncio

from .._exceptions import BackendError
from .._redis import (
    CLUSTER_SCHEMES,
    LUA_LIVE,
    ClusterScript,
    check_cluster,
    check_not_cluster,
    close_client,
    cluster_pool_size,
    describe,
    group_key,
    live_channel,
    open_client,
    open_cluster_client,
    redis_errors,
)
from .base import Deliver, HistoryStore, Page, Position, SeenPositions, check_idle_expiry, new_epoch

__all__ = ["RedisStore", "group_key"]

logger = logging.getLogger("sseviews.redis")

_EPOCH = re.compile(rb"[0-9a-f]{8}")


# Every script starts with this. KEYS[1..2]: the group's hash and stream.
# ARGV[1..4]: the group's epoch this process knows ('' for none), the highest seq it
# issued or saw in it, an epoch to start if needed, the group's time to live in ms
# (0: none). It starts a new epoch for the group when the group has none (new,
# expired, evicted or lost), when its last seq is below one this process saw (a
# restored snapshot), or when this server is a replica promoted since the group's
# last script ran on its master (a failover): the hash's `srv` field keeps the
# replication id of the master that last ran a script for the group, and a
# promoted replica has a new id, with that one as its previous id (replid2). A
# group last written on a master before that one (several failovers, the group
# untouched in between) has neither id: on a promoted server it starts a new epoch
# too. Asynchronous replication may have lost the master's newest events of the
# group, which other processes or browsers saw, and no process can tell which, so
# their ids must never be issued again with other data. A master restarted from its
# AOF gets a new replication id but no previous one (it was not promoted), so its
# groups keep their epochs. `renewed` is 1 when
# the group had an epoch, 2 when it was known to this process but its keys are gone.
# `renew()` also serves the scripts that follow.
_PRELUDE = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local head = tonumber(redis.call('HGET', KEYS[1], 'last') or '0')
local owner = redis.call('HGET', KEYS[1], 'srv')
local info = redis.pcall('INFO', 'replication')
local server, previous = nil, nil
if type(info) == 'string' then
  server = string.match(info, 'master_replid:(%x+)')
  previous = string.match(info, 'master_replid2:(%x+)')
end
local renewed = 0
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl = tonumber(ARGV[4])
local function renew()
  -- What is left of the old epoch can never be resumed.
  redis.call('DEL', KEYS[1], KEYS[2])
  epoch = ARGV[3]
  head = 0
  owner = nil
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'last', '0')
  if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
end
-- A promoted replica keeps the replication id of its master as its previous one;
-- a server that was never promoted since its start has none (all zeros).
local promoted = previous and not string.match(previous, '^0+$')
if not epoch or (epoch == ARGV[1] and head < tonumber(ARGV[2]))
    or (server and owner and owner ~= server and (owner == previous or promoted)) then
  if epoch then renewed = 1 elseif ARGV[1] ~= '' then renewed = 2 end
  renew()
end
if server and owner ~= server then
  redis.call('HSET', KEYS[1], 'srv', server)
  owner = server
end
"""

# Takes the group's next seq, stores the event and trims the group, atomically.
# ARGV[5..8]: wire (without id line), retention (0: none), max age in ms (0: none),
# how to publish ('': don't; 'PUBLISH', or 'SPUBLISH' on a Redis Cluster) on the
# group's live channel, KEYS[3]: a key to the cluster, as it shares the group's hash
# tag, so the group's slot. The message is `live_message` (the wire with its id line).
_APPEND = (
    LUA_LIVE
    + _PRELUDE
    + """
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #newest > 0 and tonumber(string.match(newest[1][1], '^%d+')) > head then
  -- The stream is ahead of its counter (its hash went back alone): a new epoch.
  renewed = 1
  renew()
  if server then redis.call('HSET', KEYS[1], 'srv', server) end
end
local seq = string.format('%d', redis.call('HINCRBY', KEYS[1], 'last', 1))
local wire = 'id: ' .. epoch .. '-' .. seq .. '\\n' .. ARGV[5]
redis.call('XADD', KEYS[2], seq .. '-0', 'w', wire, 't', now)

-- Seqs have no gap: with a count bound, what is trimmed is known.
local trimmed = 0
local retention = tonumber(ARGV[6])
if retention > 0 and tonumber(seq) > retention then
  trimmed = tonumber(seq) - retention
end
local max_age = tonumber(ARGV[7])
if max_age > 0 then
  local cutoff = now - max_age
  local start = string.format('(%d-0', trimmed)
  -- Usually nothing has expired: look at one entry, then at more at a time.
  local count = 1
  local done = false
  while not done do
    local batch = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', count)
    for _, entry in ipairs(batch) do
      if tonumber(entry[2][4]) >= cutoff then
        done = true
        break
      end
      trimmed = tonumber(string.match(entry[1], '^%d+'))
      start = '(' .. entry[1]
    end
    if #batch < count then done = true end
    count = 64
  end
end
if trimmed > 0 then
  redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d-0', trimmed + 1))
  local mark = tonumber(redis.call('HGET', KEYS[1], 'trim') or '0')
  if mark < trimmed then
    redis.call('HSET', KEYS[1], 'trim', string.format('%d', trimmed))
  end
end
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end

if ARGV[8] ~= '' then
  redis.call(ARGV[8], KEYS[3], live_message(seq, wire))
end
return {seq, epoch, renewed}
"""
)

# Reads one page of the group after a cursor, or reports that it cannot be resumed.
# ARGV[5..6]: the cursor's epoch and seq. ARGV[7]: the last stream id to read ('+',
# or '{upto}-0'). ARGV[8]: bytes in a page (0: everything). ARGV[9]: max age in ms
# (0: none). Returns {epoch, head, renewed, expired (0/1), end, id, wire, id, wire,
# ...}, where end is the seq of the last event of a full page ('0' when the range
# was read to its end).
_READ = (
    _PRELUDE
    + """
local after = tonumber(ARGV[6])
if epoch ~= ARGV[5] or after > head then
  return {epoch, string.format('%d', head), renewed, 1, '0'}
end
local trim = tonumber(redis.call('HGET', KEYS[1], 'trim') or '0')
if trim > after then
  return {epoch, string.format('%d', head), renewed, 1, '0'}
end
if head > after then
  -- Its stream was evicted (or its last entries lost) without its hash.
  local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if #newest == 0 or tonumber(string.match(newest[1][1], '^%d+')) ~= head then
    return {epoch, string.format('%d', head), renewed, 1, '0'}
  end
end
local cutoff = nil
local max_age = tonumber(ARGV[9])
if max_age > 0 then cutoff = now - max_age end
local budget = tonumber(ARGV[8])
local out = {epoch, string.format('%d', head), renewed, 0, '0'}
local start = string.format('(%d-0', after)
local size = 0
while true do
  local batch = redis.call('XRANGE', KEYS[2], start, ARGV[7], 'COUNT', 64)
  for _, entry in ipairs(batch) do
    -- Expired by age but not trimmed yet (no append since): trimmed all the same.
    if cutoff and tonumber(entry[2][4]) < cutoff then
      return {epoch, string.format('%d', head), renewed, 1, '0'}
    end
    if budget > 0 and size >= budget then
      out[5] = string.match(out[#out - 1], '^%d+')
      return out
    end
    out[#out + 1] = entry[1]
    out[#out + 1] = entry[2][2]
    size = size + #entry[2][2]
    start = '(' .. entry[1]
  end
  if #batch < 64 then return out end
end
"""
)

# Returns {epoch, head, renewed}.
_HEAD = (
    _PRELUDE
    + """
return {epoch, string.format('%d', head), renewed}
"""
)


class RedisStore(HistoryStore):
    """Keeps each group's recent events in a Redis Stream and assigns ids in Redis.

    Any number of processes sharing one Redis and one `prefix` share the groups'
    epochs, counters and history. Add `?socket_timeout=5` to the URL to bound how
    long a call waits for an unresponsive server.

    Args:
        url_or_client: A `redis://host:port/db` URL, a
            `redis+sentinel://host:port[,host:port...]/service[/db]` URL (the
            store follows the master through failovers), or a ready
            `redis.asyncio.Redis` client (which the store does not close). The
            client must not use `decode_responses=True`.
        prefix: Prefix of every key, so several apps (or tests) share one Redis.
            It must not contain `{` or `}` (the groups' hash tags).
        retention: How many events to keep per group, or None for no count limit.
        max_age: How long to keep events, in seconds (by the Redis server's
            clock), or None for no age limit.
        idle_expiry: Without `max_age`, how long a group's keys live after its
            last event, in seconds (default one day); None keeps them forever.
        publish: Also publish each event on its group's channel from the same
            atomic script, for a `RedisBackend` with the same prefix: events then
            reach every process that serves the group in id order, and `deliver`
            has nothing left to do. Without it, appends are serialised until
            `deliver` returns within this process only.

    Raises:
        ValueError: A bad URL, prefix, retention, max_age or idle_expiry.
        TypeError: `url_or_client` is neither a str nor a Redis client.
    """

    def __init__(
        self,
        url_or_client: str | redis.asyncio.Redis,
        *,
        prefix: str = "sseviews",
        retention: int | None = 1000,
        max_age: float | None = None,
        idle_expiry: float | None = 86400.0,
        publish: bool = False,
    ) -> None:
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(
                f"prefix must be a non-empty str without {{ or }}, got {prefix!r}: each "
                "group's keys carry their own hash tag, so a prefix needs none"
            )
        if retention is not None and (
            isinstance(retention, bool) or not isinstance(retention, int) or retention < 1
        ):
            raise ValueError(f"retention must be a positive int or None, got {retention!r}")
        if max_age is not None and (
            isinstance(max_age, bool)
            or not isinstance(max_age, int | float)
            or not math.isfinite(max_age)
            or max_age <= 0
        ):
            raise ValueError(
                f"max_age must be a positive number of seconds or None, got {max_age!r}"
            )
        check_idle_expiry(idle_expiry)
        self._client: Any
        if isinstance(url_or_client, redis.asyncio.RedisCluster) or (
            isinstance(url_or_client, str)
            and url_or_client.partition("://")[0].lower() in CLUSTER_SCHEMES
        ):
            self._client, self._owned = open_cluster_client(url_or_client)
            self._cluster = True
            kwargs = self._client.get_connection_kwargs()
        else:
            self._client, self._owned = open_client(url_or_client)
            self._cluster = False
            kwargs = self._client.connection_pool.connection_kwargs
        if kwargs.get("decode_responses"):
            raise ValueError(
                "RedisStore needs a client without decode_responses=True: it stores bytes"
            )
        self.prefix = prefix
        self.retention = retention
        self.max_age = max_age
        self.idle_expiry = idle_expiry
        self.publish = publish
        self._publish_command = "" if not publish else "SPUBLISH" if self._cluster else "PUBLISH"
        self._retention_arg = retention or 0
        self._max_age_ms = max(1, round(max_age * 1000)) if max_age is not None else 0
        ttl = max_age if max_age is not None else idle_expiry
        self._ttl_ms = max(1, round(ttl * 1000)) if ttl is not None else 0
        self._where = describe(self._client)
        self._append: Any
        self._read: Any
        self._head: Any
        if self._cluster:
            limiter = asyncio.Semaphore(cluster_pool_size(self._client))
            self._append, self._read, self._head = (
                ClusterScript(self._client, source, limiter) for source in (_APPEND, _READ, _HEAD)
            )
        else:
            self._append = self._client.register_script(_APPEND)
            self._read = self._client.register_script(_READ)
            self._head = self._client.register_script(_HEAD)
        # Per group, the highest seq this instance issued or saw in its epoch: the
        # group's counter going below it means its history went back.
        self._seen = SeenPositions()
        # Without `publish`, `deliver` runs after the script; hold appends until
        # it returns so this process delivers in id order.
        self._lock = anyio.Lock() if not publish else None

    def _keys(self, group: str) -> list[str]:
        return [group_key(self.prefix, "m", group), group_key(self.prefix, "g", group)]

    def _append_keys(self, group: str) -> list[str]:
        # The channel is a key to the cluster: it routes the script to its slot.
        return [*self._keys(group), live_channel(self.prefix, group)]

    def _prelude_args(self, group: str) -> list[Any]:
        seen = self._seen.get(group)
        if seen is None:
            return ["", 0, new_epoch(), self._ttl_ms]
        return [seen.epoch, seen.seq, new_epoch(), self._ttl_ms]

    def _observe(self, group: str, raw_epoch: Any, seq: int, renewed: Any) -> Position:
        if not isinstance(raw_epoch, bytes) or _EPOCH.fullmatch(raw_epoch) is None:
            raise BackendError(
                f"{self._where}: key {self._keys(group)[0]!r} holds epoch {raw_epoch!r}, "
                "not an sseviews epoch"
            )
        position = Position(raw_epoch.decode(), seq)
        renewed = int(renewed)
        if renewed == 1:
            logger.warning(
                "%s (prefix %r): the history of group %r went back or may have (a restored "
                "snapshot, or a failover to a promoted replica); started a new epoch %s for it "
                "so that no event id is issued twice",
                self._where,
                self.prefix,
                group,
                position.epoch,
            )
        elif renewed == 2:
            # Its keys are gone. Seen more recently than they could expire: lost.
            idle = self._seen.idle(group)
            lost = not self._ttl_ms or (idle is not None and idle * 1000 < self._ttl_ms)
            logger.log(
                logging.WARNING if lost else logging.INFO,
                "%s (prefix %r): group %r had no keys any more (%s); started a new epoch %s for it",
                self._where,
                self.prefix,
                group,
                "lost in a restart without persistence, or evicted" if lost else "expired",
                position.epoch,
            )
        self._seen.saw(group, position)
        return position

    async def connect(self) -> None:
        """Check that Redis answers, and its `maxmemory-policy`.

        Logs a WARNING when the policy lets Redis evict this store's keys.

        Raises:
            BackendError: Redis cannot be reached, or is a Redis Cluster node.
        """
        try:
            if self._cluster:
                await check_cluster(self._client, self._where)
                self._where = describe(self._client)  # with every node it found
            else:
                with redis_errors(f"connecting to {self._where}"):
                    await self._client.ping()
                    await check_not_cluster(self._client, self._where)
            await self._check_eviction()
        except BaseException:
            if self._owned:
                with anyio.move_on_after(1, shield=True):
                    await close_client(self._client)
            raise

    async def _check_eviction(self) -> None:
        try:
            reply = await self._client.config_get("maxmemory-policy")
        except Exception as exc:  # managed Redis often refuses CONFIG
            logger.debug("%s: could not read maxmemory-policy: %s", self._where, exc)
            return
        raw: Any = dict(reply)
        policy = raw.get(b"maxmemory-policy", raw.get("maxmemory-policy", b""))
        if isinstance(policy, bytes):
            policy = policy.decode()
        policy = str(policy)
        # volatile-* evicts keys that have a TTL, as the groups' keys do when an
        # expiry is set.
        if policy.startswith("allkeys-") or (policy.startswith("volatile-") and self._ttl_ms > 0):
            logger.warning(
                "%s has maxmemory-policy %s: Redis may evict the event history (prefix %r) "
                "under memory pressure, and clients then get the sseviews.reset event "
                "instead of their replay. Set maxmemory-policy noeviction on this Redis",
                self._where,
                policy,
                self.prefix,
            )

    async def disconnect(self) -> None:
        """Close the client if the store created it from a URL."""
        if self._owned:
            with anyio.move_on_after(1, shield=True):
                await close_client(self._client)

    async def append(self, group: str, wire: bytes, deliver: Deliver) -> Position:
        """Store one event in Redis, trim its group, and return its position.

        Raises:
            BackendError: Redis cannot be reached.
        """
        if self._lock is None:
            return await self._append_and_deliver(group, wire, deliver)
        async with self._lock:
            return await self._append_and_deliver(group, wire, deliver)

    async def _append_and_deliver(self, group: str, wire: bytes, deliver: Deliver) -> Position:
        with redis_errors(f"storing an event in {self._where}"):
            raw_seq, raw_epoch, renewed = await self._append(
                keys=self._append_keys(group),
                args=[
                    *self._prelude_args(group),
                    wire,
                    self._retention_arg,
                    self._max_age_ms,
                    self._publish_command,
                ],
            )
        position = self._observe(group, raw_epoch, int(raw_seq), renewed)
        await deliver(position.seq, b"id: %s-%d\n" % (raw_epoch, position.seq) + wire)
        return position

    async def head(self, group: str) -> Position:
        """Return `group`'s epoch and last seq, making its epoch if it has none.

        Raises:
            BackendError: Redis cannot be reached.
        """
        with redis_errors(f"reading the head of a group from {self._where}"):
            raw_epoch, raw_head, renewed = await self._head(
                keys=self._keys(group), args=self._prelude_args(group)
            )
        return self._observe(group, raw_epoch, int(raw_head), renewed)

    async def heads(self, groups: Sequence[str]) -> list[Position]:
        """Return the heads of `groups`, in order, in one round trip (a pipeline).

        Raises:
            BackendError: Redis cannot be reached.
        """
        if len(groups) == 1:
            return [await self.head(groups[0])]
        if self._cluster:
            # Groups live in different slots, often on different nodes: one script
            # each, concurrently (a cluster pipeline would split them the same way).
            return list(await asyncio.gather(*(self.head(group) for group in groups)))
        with redis_errors(f"reading the heads of groups from {self._where}"):
            async with self._client.pipeline(transaction=False) as pipe:
                for group in groups:
                    await self._head(
                        keys=self._keys(group), args=self._prelude_args(group), client=pipe
                    )
                replies = await pipe.execute()
        return [
            self._observe(group, raw_epoch, int(raw_head), renewed)
            for group, (raw_epoch, raw_head, renewed) in zip(groups, replies, strict=True)
        ]

    async def read(self, group: str, after: Position) -> list[tuple[int, bytes]] | None:
        """Return the retained events of `group` after `after`, or None if it cannot
        be resumed (another epoch, trimmed, evicted, or ahead of the group).

        Raises:
            BackendError: Redis cannot be reached.
        """
        return await self._run_read(group, after, "+", 0)

    async def read_page(
        self, group: str, after: Position, upto: int, limit_bytes: int
    ) -> Page | None:
        """Return one page of the events of `group` in `(after.seq, upto]`, or None if
        the cursor cannot be resumed (see `HistoryStore.read_page`).

        One script reads the group's stream (`XRANGE ... COUNT` a batch at a time)
        until the page holds `limit_bytes`, after the checks `read` makes.

        Raises:
            BackendError: Redis cannot be reached.
        """
        reply = await self._run_read_reply(group, after, f"{upto}-0", max(1, limit_bytes))
        if reply is None:
            return None
        end = int(reply[4])
        return Page(_events_of(reply), end or upto)

    async def _run_read(
        self, group: str, after: Position, last_id: str, budget: int
    ) -> list[tuple[int, bytes]] | None:
        reply = await self._run_read_reply(group, after, last_id, budget)
        return None if reply is None else _events_of(reply)

    async def _run_read_reply(
        self, group: str, after: Position, last_id: str, budget: int
    ) -> list[Any] | None:
        with redis_errors(f"reading history from {self._where}"):
            reply: list[Any] = await self._read(
                keys=self._keys(group),
                args=[
                    *self._prelude_args(group),
                    after.epoch,
                    after.seq,
                    last_id,
                    budget,
                    self._max_age_ms,
                ],
            )
        self._observe(group, reply[0], int(reply[1]), reply[2])
        if int(reply[3]):
            return None
        return reply


def _events_of(reply: list[Any]) -> list[tuple[int, bytes]]:
    # Stream ids are b"<seq>-0".
    return [(int(reply[i][:-2]), reply[i + 1]) for i in range(5, len(reply), 2)]
