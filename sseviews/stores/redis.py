"""A history store in Redis: one Redis Stream per group, ids from one shared counter.

Keys, all under a configurable prefix (default `"sseviews"`):

- `{prefix}:epoch`: the epoch. A new one starts when the history is lost or went
  back (a restart without persistence, a restored snapshot, a failover to a
  lagging replica), so an id is never issued twice.
- `{prefix}:seq`: the cursor, a counter `INCR`ed for every event of every group.
- `{prefix}:start`: the seq the current epoch started after.
- `{prefix}:server`: the replication id of the Redis master that ran the last
  script; a replica promoted by a failover has a new one (and this one as its
  previous id), which starts a new epoch.
- `{prefix}:g:{<group>}`: a stream per group; entry id `{seq}-0`, fields `w` (the
  wire bytes, `id:` line included) and `t` (Redis time in ms, for age retention).
- `{prefix}:m:{<group>}`: a hash per group: `last` (the group's last seq) and
  `trim` (the highest seq trimmed from it), so a cursor older than the retained
  history, or a stream that was evicted, is detected.
- `{prefix}:clock`: a sorted set sampling the cursor over time, so a cursor into a
  group that expired as a whole is detected.

In a group's keys the group name is escaped (`%`, `:`, `{` and `}` as `%XX`) and
wrapped in braces, so no prefix plus group can spell another prefix's key. A
group's keys expire `max_age` (else `idle_expiry`) seconds after its last event.

`append` runs one Lua script that takes the seq, stores the event, trims the group
and (with `publish=True`) publishes it on the group's channel,
`{prefix}:live:{<escaped group>}`, so events reach the `RedisBackend` of every
process that serves the group, in id order.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import anyio
import redis.asyncio
from redis.exceptions import ResponseError

from .._exceptions import BackendError
from .._redis import check_not_cluster, close_client, describe, group_key, open_client, redis_errors
from .base import Deliver, HistoryStore, Page, check_idle_expiry, id_line, new_epoch

__all__ = ["RedisStore", "group_key"]

logger = logging.getLogger("sseviews.redis")

_EPOCH = re.compile(rb"[0-9a-f]{8}")


# Every script starts with this. KEYS[1..5]: epoch, seq, start, clock, server.
# ARGV[1..5]: the epoch this process knows, the highest seq it has seen in it, an
# epoch to start if needed, the groups' time to live in ms (0: none), the clock's
# sampling interval in ms. It starts a new epoch when Redis has none (the history
# was lost), when the cursor is below a seq this process has seen (a restored
# snapshot), or when this server is a replica promoted since the last script ran
# on its master (a failover): its replication id is new, and its previous one
# (replid2) is the master's. Asynchronous replication may have lost the master's
# newest events, which other processes or browsers saw, and no process can tell
# which, so their ids must never be issued again with other data.
_PRELUDE = """
local epoch = redis.call('GET', KEYS[1])
local head = tonumber(redis.call('GET', KEYS[2]) or '0')
local info = redis.pcall('INFO', 'replication')
local server, previous = nil, nil
if type(info) == 'string' then
  server = string.match(info, 'master_replid:(%x+)')
  previous = string.match(info, 'master_replid2:(%x+)')
end
local owner = redis.call('GET', KEYS[5])
local renewed = 0
if not epoch or (epoch == ARGV[1] and head < tonumber(ARGV[2]))
    or (server and owner and owner ~= server and owner == previous) then
  -- The new epoch starts above every seq this process saw, so no stream entry
  -- that survived can be ahead of the counter.
  head = math.max(head, tonumber(ARGV[2]))
  epoch = ARGV[3]
  redis.call('SET', KEYS[1], epoch)
  redis.call('SET', KEYS[2], string.format('%d', head))
  redis.call('SET', KEYS[3], string.format('%d', head))
  renewed = 1
end
if server and owner ~= server then redis.call('SET', KEYS[5], server) end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl = tonumber(ARGV[4])
"""

# Takes the next seq, stores the event and trims its group, atomically.
# KEYS[6..7]: group stream, group meta. ARGV[6..9]: wire (without id line),
# retention (0: none), max age in ms (0: none), the group's live channel ('': don't publish).
_APPEND = (
    _PRELUDE
    + """
if ttl > 0 then
  -- A sample (time, head before this append) at most every interval: events
  -- appended before `time` have a seq <= head.
  local interval = tonumber(ARGV[5])
  local newest = redis.call('ZREVRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  if #newest == 0 or tonumber(newest[2]) + interval <= now then
    redis.call('ZADD', KEYS[4], now, string.format('%d', head))
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. string.format('%d', now - ttl))
  end
  redis.call('PEXPIRE', KEYS[4], ttl + interval)
end
local seq = string.format('%d', redis.call('INCR', KEYS[2]))
local wire = 'id: ' .. epoch .. '-' .. seq .. '\\n' .. ARGV[6]
redis.call('XADD', KEYS[6], seq .. '-0', 'w', wire, 't', now)
redis.call('HSET', KEYS[7], 'last', seq)

-- The highest seq removed from this group; Redis does not report what XTRIM
-- removed, so find it before removing with XTRIM MINID.
local trimmed = nil
local retention = tonumber(ARGV[7])
if retention > 0 then
  local excess = redis.call('XLEN', KEYS[6]) - retention
  if excess > 0 then
    local oldest = redis.call('XRANGE', KEYS[6], '-', '+', 'COUNT', excess)
    trimmed = oldest[#oldest][1]
  end
end
local max_age = tonumber(ARGV[8])
if max_age > 0 then
  local cutoff = now - max_age
  local start = '-'
  if trimmed then start = '(' .. trimmed end
  -- Usually nothing has expired: look at one entry, then at more at a time.
  local count = 1
  local done = false
  while not done do
    local batch = redis.call('XRANGE', KEYS[6], start, '+', 'COUNT', count)
    for _, entry in ipairs(batch) do
      if tonumber(entry[2][4]) >= cutoff then
        done = true
        break
      end
      trimmed = entry[1]
      start = '(' .. trimmed
    end
    if #batch < count then done = true end
    count = 64
  end
end
if trimmed then
  local trimmed_seq = tonumber(string.match(trimmed, '^%d+'))
  redis.call('XTRIM', KEYS[6], 'MINID', string.format('%d-0', trimmed_seq + 1))
  local mark = redis.call('HGET', KEYS[7], 'trim')
  if not mark or tonumber(mark) < trimmed_seq then
    redis.call('HSET', KEYS[7], 'trim', string.format('%d', trimmed_seq))
  end
end
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[6], ttl)
  redis.call('PEXPIRE', KEYS[7], ttl)
end

if ARGV[9] ~= '' then
  redis.call('PUBLISH', ARGV[9], seq .. '\\0' .. wire)
end
return {seq, epoch, renewed}
"""
)

# Reads what follows a cursor in some groups, atomically, or reports it expired.
# KEYS[6..]: per group, its stream then its meta. ARGV[6..7]: first stream id to
# read ('{after+1}-0'), after. ARGV[8]: max age in ms (0: none). ARGV[9]: '1' when
# Redis may evict these keys. ARGV[10]: last stream id to read ('+', or
# '{upto}-0'). ARGV[11]: bytes in a page (0: read everything, unordered).
# Returns {epoch, expired (0/1), renewed, end, id, wire, id, wire, ...}, where end
# is the seq of the last event of a full page ('0' when the range was read to its end).
_READ = (
    _PRELUDE
    + """
local after = tonumber(ARGV[7])
if renewed == 1 or after < tonumber(redis.call('GET', KEYS[3]) or '0') then
  return {epoch, 1, renewed}
end
-- What a group that has no keys may have lost: events appended before the
-- first clock sample younger than its time to live.
local floor = nil
local function group_floor()
  if floor then return floor end
  floor = 0
  if ARGV[9] == '1' then
    -- Both of its keys may have been evicted: nothing tells how much is lost.
    floor = head
  elseif ttl > 0 then
    local sample = redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. string.format('%d', now - ttl),
      '+inf', 'LIMIT', 0, 1)
    if #sample > 0 then floor = tonumber(sample[1]) else floor = head end
  end
  return floor
end
for i = 6, #KEYS, 2 do
  local meta = redis.call('HMGET', KEYS[i + 1], 'last', 'trim')
  local last, trim = tonumber(meta[1]), tonumber(meta[2])
  local newest = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
  local newest_seq = nil
  if #newest > 0 then newest_seq = tonumber(string.match(newest[1][1], '^%d+')) end
  if last then
    -- A group without a trim mark may have expired as a whole before it got
    -- this life's first event: its mark is then the floor.
    if (trim or group_floor()) > after or (last > after and newest_seq ~= last) then
      return {epoch, 1, 0}
    end
  elseif newest_seq then
    -- Its stream without its marks: they were evicted.
    if newest_seq > after then return {epoch, 1, 0} end
  elseif after < group_floor() then
    return {epoch, 1, 0}
  end
end
local cutoff = nil
local max_age = tonumber(ARGV[8])
if max_age > 0 then cutoff = now - max_age end
local last_id = ARGV[10]
local budget = tonumber(ARGV[11])
local out = {epoch, 0, 0, '0'}
if budget == 0 then
  for i = 6, #KEYS, 2 do
    local entries = redis.call('XRANGE', KEYS[i], ARGV[6], last_id)
    for _, entry in ipairs(entries) do
      -- Expired by age but not trimmed yet (no append since): trimmed all the same.
      if cutoff and tonumber(entry[2][4]) < cutoff then return {epoch, 1, 0} end
      out[#out + 1] = entry[1]
      out[#out + 1] = entry[2][2]
    end
  end
  return out
end
-- One page: merge the groups' streams by seq, reading each a batch at a time,
-- until the page holds `budget` bytes.
local batch = 32
local runs = {}
local function advance(run)
  if run.at > #run.entries then
    if #run.entries < batch then
      run.seq = nil
      return
    end
    run.entries = redis.call('XRANGE', run.key, '(' .. run.entries[#run.entries][1], last_id,
      'COUNT', batch)
    run.at = 1
    if #run.entries == 0 then
      run.seq = nil
      return
    end
  end
  run.seq = tonumber(string.match(run.entries[run.at][1], '^%d+'))
end
for i = 6, #KEYS, 2 do
  local run = {key = KEYS[i], at = 1}
  run.entries = redis.call('XRANGE', KEYS[i], ARGV[6], last_id, 'COUNT', batch)
  advance(run)
  if run.seq then runs[#runs + 1] = run end
end
local size = 0
while true do
  local best = nil
  for _, run in ipairs(runs) do
    if run.seq and (best == nil or run.seq < best.seq) then best = run end
  end
  if best == nil then return out end
  local entry = best.entries[best.at]
  if cutoff and tonumber(entry[2][4]) < cutoff then return {epoch, 1, 0} end
  out[#out + 1] = entry[1]
  out[#out + 1] = entry[2][2]
  size = size + #entry[2][2]
  local seq = best.seq
  best.at = best.at + 1
  advance(best)
  if size >= budget then
    for _, run in ipairs(runs) do
      if run.seq then
        out[4] = string.format('%d', seq)
        return out
      end
    end
    return out
  end
end
"""
)

# Returns {head, epoch, renewed}.
_HEAD = (
    _PRELUDE
    + """
return {string.format('%d', head), epoch, renewed}
"""
)


class RedisStore(HistoryStore):
    """Keeps each group's recent events in a Redis Stream and assigns ids in Redis.

    Any number of processes sharing one Redis and one `prefix` share the cursor,
    the epoch and the history. Add `?socket_timeout=5` to the URL to bound how
    long a call waits for an unresponsive server.

    Args:
        url_or_client: A `redis://host:port/db` URL, a
            `redis+sentinel://host:port[,host:port...]/service[/db]` URL (the
            store follows the master through failovers), or a ready
            `redis.asyncio.Redis` client (which the store does not close). The
            client must not use `decode_responses=True`.
        prefix: Prefix of every key, so several apps (or tests) share one Redis.
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
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty str, got {prefix!r}")
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
        self._client, self._owned = open_client(url_or_client)
        if self._client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError(
                "RedisStore needs a client without decode_responses=True: it stores bytes"
            )
        self.prefix = prefix
        self.retention = retention
        self.max_age = max_age
        self.idle_expiry = idle_expiry
        self.publish = publish
        self._retention_arg = retention or 0
        self._max_age_ms = max(1, round(max_age * 1000)) if max_age is not None else 0
        ttl = max_age if max_age is not None else idle_expiry
        self._ttl_ms = max(1, round(ttl * 1000)) if ttl is not None else 0
        # About 64 clock samples per time to live: a cursor at most 1/64 of it older
        # than the group's expiry may get a reset it did not need.
        self._interval_ms = max(10, self._ttl_ms // 64)
        self._meta_keys = [
            f"{prefix}:epoch",
            f"{prefix}:seq",
            f"{prefix}:start",
            f"{prefix}:clock",
            f"{prefix}:server",
        ]
        self._where = describe(self._client)
        self._append = self._client.register_script(_APPEND)
        self._read = self._client.register_script(_READ)
        self._head = self._client.register_script(_HEAD)
        # The highest seq this instance has seen in `epoch`: Redis's cursor going
        # below it means the history went back.
        self._high = 0
        # Set by connect() from maxmemory-policy: once Redis has evicted keys, a
        # group with no keys may have been evicted, and a cursor into it is reset
        # unless it is the head.
        self._evictable = False
        # Without `publish`, `deliver` runs after the script; hold appends until
        # it returns so this process delivers in id order.
        self._lock = anyio.Lock() if not publish else None

    def _prelude_args(self) -> list[Any]:
        epoch = getattr(self, "epoch", "")
        return [epoch, self._high, new_epoch(), self._ttl_ms, self._interval_ms]

    def _observe(self, raw_epoch: Any, seq: int, renewed: Any) -> None:
        if raw_epoch != self.epoch.encode():
            self._set_epoch(raw_epoch)
            self._high = seq
            if int(renewed):
                logger.warning(
                    "%s (prefix %r): the history was lost or went back (a restart, a "
                    "restored snapshot or a failover); started a new epoch %s so that no "
                    "event id is issued twice",
                    self._where,
                    self.prefix,
                    self.epoch,
                )
        elif seq > self._high:
            self._high = seq

    def _set_epoch(self, raw: Any) -> None:
        if not isinstance(raw, bytes) or _EPOCH.fullmatch(raw) is None:
            raise BackendError(
                f"{self._where}: key {self._meta_keys[0]!r} holds {raw!r}, not an sseviews epoch"
            )
        self.epoch = raw.decode()

    async def connect(self) -> None:
        """Read the epoch, creating it if this prefix has none yet.

        Also checks Redis's `maxmemory-policy`, and logs a WARNING when it lets
        Redis evict this store's keys.

        Raises:
            BackendError: Redis cannot be reached.
        """
        try:
            with redis_errors(f"connecting to {self._where}"):
                await check_not_cluster(self._client, self._where)
                raw_head, raw_epoch, _ = await self._head(
                    keys=self._meta_keys, args=self._prelude_args()
                )
            self._set_epoch(raw_epoch)
            self._high = int(raw_head)
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
        self._evictable = policy.startswith("allkeys-") or (
            policy.startswith("volatile-") and self._ttl_ms > 0
        )
        if self._evictable:
            logger.warning(
                "%s has maxmemory-policy %s: Redis may evict the event history (prefix %r) "
                "under memory pressure, and clients then get the sseviews.reset event "
                "instead of their replay. Set maxmemory-policy noeviction on this Redis",
                self._where,
                policy,
                self.prefix,
            )

    async def _evicted(self) -> bool:
        """Whether Redis has evicted any key since it started."""
        try:
            stats = await self._client.info("stats")
        except ResponseError:  # INFO refused: assume the worst
            return True
        return int(stats.get("evicted_keys", 1)) > 0

    async def disconnect(self) -> None:
        """Close the client if the store created it from a URL."""
        if self._owned:
            with anyio.move_on_after(1, shield=True):
                await close_client(self._client)

    async def append(self, group: str, wire: bytes, deliver: Deliver) -> int:
        """Store one event in Redis, trim its group, and return its seq.

        Raises:
            BackendError: Redis cannot be reached.
        """
        if self._lock is None:
            return await self._append_and_deliver(group, wire, deliver)
        async with self._lock:
            return await self._append_and_deliver(group, wire, deliver)

    async def _append_and_deliver(self, group: str, wire: bytes, deliver: Deliver) -> int:
        prefix = self.prefix
        with redis_errors(f"storing an event in {self._where}"):
            raw_seq, raw_epoch, renewed = await self._append(
                keys=[
                    *self._meta_keys,
                    group_key(prefix, "g", group),
                    group_key(prefix, "m", group),
                ],
                args=[
                    *self._prelude_args(),
                    wire,
                    self._retention_arg,
                    self._max_age_ms,
                    group_key(prefix, "live", group) if self.publish else "",
                ],
            )
        seq = int(raw_seq)
        self._observe(raw_epoch, seq, renewed)
        await deliver(seq, id_line(self.epoch, seq) + wire)
        return seq

    async def read(self, groups: Sequence[str], after: int) -> list[tuple[int, bytes]] | None:
        """Return the retained events of `groups` after `after`, or None if it expired.

        The cursor also expires when the epoch in Redis is not this store's
        epoch any more (the history was lost); `epoch` is then updated. A group
        whose stream was evicted, or that expired as a whole, expires it too.

        Raises:
            BackendError: Redis cannot be reached.
        """
        groups = list(dict.fromkeys(groups))
        if not groups:
            return []
        reply = await self._run_read(groups, after, "+", 0)
        if reply is None:
            return None
        events = _events_of(reply)
        if len(groups) > 1:
            events.sort(key=_seq_of)
        return events

    async def read_page(
        self, groups: Sequence[str], after: int, upto: int, limit_bytes: int
    ) -> Page | None:
        """Return one page of the events of `groups` in `(after, upto]`, or None if
        the cursor expired (see `HistoryStore.read_page`).

        One script merges the groups' streams by seq (`XRANGE ... COUNT` a batch
        at a time) until the page holds `limit_bytes`, after the checks `read`
        makes.

        Raises:
            BackendError: Redis cannot be reached.
        """
        groups = list(dict.fromkeys(groups))
        if not groups:
            return Page([], upto)
        reply = await self._run_read(groups, after, f"{upto}-0", max(1, limit_bytes))
        if reply is None:
            return None
        end = int(reply[3])
        return Page(_events_of(reply), end or upto)

    async def _run_read(
        self, groups: list[str], after: int, last_id: str, budget: int
    ) -> list[Any] | None:
        prefix = self.prefix
        keys = list(self._meta_keys)
        for group in groups:
            keys += (group_key(prefix, "g", group), group_key(prefix, "m", group))
        known = self.epoch
        with redis_errors(f"reading history from {self._where}"):
            evicted = self._evictable and await self._evicted()
            reply: list[Any] = await self._read(
                keys=keys,
                args=[
                    *self._prelude_args(),
                    f"{after + 1}-0",
                    after,
                    self._max_age_ms,
                    "1" if evicted else "0",
                    last_id,
                    budget,
                ],
            )
        raw_epoch, expired, renewed = reply[0], reply[1], reply[2]
        self._observe(raw_epoch, 0, renewed)
        if self.epoch != known or expired:
            return None
        return reply

    async def head(self) -> int:
        """Return the highest seq issued so far (0 before the first event).

        Also refreshes `epoch`, which changes if Redis lost the history or it went
        back.

        Raises:
            BackendError: Redis cannot be reached.
        """
        with redis_errors(f"reading the cursor from {self._where}"):
            raw_head, raw_epoch, renewed = await self._head(
                keys=self._meta_keys, args=self._prelude_args()
            )
        head = int(raw_head)
        self._observe(raw_epoch, head, renewed)
        return head


def _seq_of(event: tuple[int, bytes]) -> int:
    return event[0]


def _events_of(reply: list[Any]) -> list[tuple[int, bytes]]:
    # Stream ids are b"<seq>-0".
    return [(int(reply[i][:-2]), reply[i + 1]) for i in range(4, len(reply), 2)]
