"""A history store in Redis: one Redis Stream per group, ids from one shared counter.

Keys, all under a configurable prefix (default `"sseviews"`):

- `{prefix}:epoch`: the epoch, created once with `SET NX`.
- `{prefix}:seq`: the cursor, a counter `INCR`ed for every event of every group.
- `{prefix}:g:{group}`: a stream per group; entry id `{seq}-0`, fields `w` (the
  wire bytes, `id:` line included) and `t` (Redis time in ms, for age retention).
- `{prefix}:trim`: a hash, group -> highest seq trimmed from that group, so a
  cursor older than the retained history is detected.

`append` runs one Lua script that takes the seq, stores the event, trims the group
and (with `publish=True`) publishes it on `{prefix}:live`, so events reach every
process's `RedisBackend` in id order.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import anyio
import redis.asyncio

from .._exceptions import BackendError
from .._redis import describe, open_client, redis_errors
from .base import Deliver, HistoryStore, id_line, new_epoch

__all__ = ["RedisStore"]

logger = logging.getLogger("sseviews.redis")

_EPOCH = re.compile(rb"[0-9a-f]{8}")


def _get_or_create_epoch(key: int, arg: int) -> str:
    """Lua that sets `epoch` to the history's epoch, creating it from ARGV[arg] if absent.

    Every script starts with it, so a history that Redis lost (a restart without
    persistence) gets its new epoch from whichever script runs first.
    """
    return f"""local epoch = redis.call('GET', KEYS[{key}])
if not epoch then
  epoch = ARGV[{arg}]
  redis.call('SET', KEYS[{key}], epoch)
end
"""


# Takes the next seq, stores the event and trims its group, atomically.
# KEYS: seq, epoch, group stream, trim hash.
# ARGV: wire (without id line), retention (0: none), max age in ms (0: none),
#       live channel ('' : don't publish), group, epoch to create if none exists.
_APPEND = (
    _get_or_create_epoch(2, 6)
    + """
local seq = string.format('%d', redis.call('INCR', KEYS[1]))
local wire = 'id: ' .. epoch .. '-' .. seq .. '\\n' .. ARGV[1]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('XADD', KEYS[3], seq .. '-0', 'w', wire, 't', now)

-- The highest seq removed from this group; Redis does not report what XTRIM
-- removed, so find it before removing with XTRIM MINID.
local trimmed = nil
local retention = tonumber(ARGV[2])
if retention > 0 then
  local excess = redis.call('XLEN', KEYS[3]) - retention
  if excess > 0 then
    local oldest = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', excess)
    trimmed = oldest[#oldest][1]
  end
end
local max_age = tonumber(ARGV[3])
if max_age > 0 then
  local cutoff = now - max_age
  local start = '-'
  if trimmed then start = '(' .. trimmed end
  -- Usually nothing has expired: look at one entry, then at more at a time.
  local count = 1
  local done = false
  while not done do
    local batch = redis.call('XRANGE', KEYS[3], start, '+', 'COUNT', count)
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
  redis.call('XTRIM', KEYS[3], 'MINID', string.format('%d-0', trimmed_seq + 1))
  local mark = redis.call('HGET', KEYS[4], ARGV[5])
  if not mark or tonumber(mark) < trimmed_seq then
    redis.call('HSET', KEYS[4], ARGV[5], string.format('%d', trimmed_seq))
  end
end

if ARGV[4] ~= '' then
  redis.call('PUBLISH', ARGV[4], ARGV[5] .. '\\0' .. seq .. '\\0' .. wire)
end
return {seq, epoch}
"""
)

# Reads what follows a cursor in some groups, atomically, or reports it expired.
# KEYS: epoch, trim hash, then one stream per group.
# ARGV: first stream id to read ('{after+1}-0'), after, max age in ms (0: none),
#       epoch to create if none exists, then the group names.
# Returns {epoch, expired (0/1), id, wire, id, wire, ...}.
_READ = (
    _get_or_create_epoch(1, 4)
    + """
local after = tonumber(ARGV[2])
local marks = redis.call('HMGET', KEYS[2], unpack(ARGV, 5))
for i = 1, #marks do
  if marks[i] and tonumber(marks[i]) > after then return {epoch, 1} end
end
local cutoff = nil
local max_age = tonumber(ARGV[3])
if max_age > 0 then
  local time = redis.call('TIME')
  cutoff = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) - max_age
end
local out = {epoch, 0}
for i = 3, #KEYS do
  local entries = redis.call('XRANGE', KEYS[i], ARGV[1], '+')
  for _, entry in ipairs(entries) do
    -- Expired by age but not trimmed yet (no append since): trimmed all the same.
    if cutoff and tonumber(entry[2][4]) < cutoff then return {epoch, 1} end
    out[#out + 1] = entry[1]
    out[#out + 1] = entry[2][2]
  end
end
return out
"""
)

# KEYS: seq, epoch. ARGV: epoch to create if none exists. Returns {head, epoch}.
_HEAD = (
    _get_or_create_epoch(2, 1)
    + """
return {redis.call('GET', KEYS[1]) or '0', epoch}
"""
)


class RedisStore(HistoryStore):
    """Keeps each group's recent events in a Redis Stream and assigns ids in Redis.

    Any number of processes sharing one Redis and one `prefix` share the cursor,
    the epoch and the history. Add `?socket_timeout=5` to the URL to bound how
    long a call waits for an unresponsive server.

    Args:
        url_or_client: A `redis://host:port/db` URL, or a ready
            `redis.asyncio.Redis` client (which the store does not close). The
            client must not use `decode_responses=True`.
        prefix: Prefix of every key, so several apps (or tests) share one Redis.
        retention: How many events to keep per group, or None for no count limit.
        max_age: How long to keep events, in seconds (by the Redis server's
            clock), or None for no age limit.
        publish: Also publish each event on `{prefix}:live` from the same atomic
            script, for a `RedisBackend` with the same prefix: events then reach
            every process in id order, and `deliver` has nothing left to do.
            Without it, appends are serialised until `deliver` returns within
            this process only.

    Raises:
        ValueError: A bad URL, prefix, retention or max_age.
        TypeError: `url_or_client` is neither a str nor a Redis client.
    """

    def __init__(
        self,
        url_or_client: str | redis.asyncio.Redis,
        *,
        prefix: str = "sseviews",
        retention: int | None = 1000,
        max_age: float | None = None,
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
        self._client, self._owned = open_client(url_or_client)
        if self._client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError(
                "RedisStore needs a client without decode_responses=True: it stores bytes"
            )
        self.prefix = prefix
        self.retention = retention
        self.max_age = max_age
        self.publish = publish
        self._retention_arg = retention or 0
        self._max_age_ms = max(1, round(max_age * 1000)) if max_age is not None else 0
        self._seq_key = f"{prefix}:seq"
        self._epoch_key = f"{prefix}:epoch"
        self._trim_key = f"{prefix}:trim"
        self._group_prefix = f"{prefix}:g:"
        self._channel = f"{prefix}:live" if publish else ""
        self._where = describe(self._client)
        self._append = self._client.register_script(_APPEND)
        self._read = self._client.register_script(_READ)
        self._head = self._client.register_script(_HEAD)
        # Without `publish`, `deliver` runs after the script; hold appends until
        # it returns so this process delivers in id order.
        self._lock = anyio.Lock() if not publish else None

    def _group_key(self, group: str) -> str:
        return self._group_prefix + group

    def _set_epoch(self, raw: Any) -> None:
        if not isinstance(raw, bytes) or _EPOCH.fullmatch(raw) is None:
            raise BackendError(
                f"{self._where}: key {self._epoch_key!r} holds {raw!r}, not an sseviews epoch"
            )
        self.epoch = raw.decode()

    async def connect(self) -> None:
        """Read the epoch, creating it if this prefix has none yet.

        Raises:
            BackendError: Redis cannot be reached.
        """
        try:
            with redis_errors(f"connecting to {self._where}"):
                await self._client.set(self._epoch_key, new_epoch(), nx=True)
                raw = await self._client.get(self._epoch_key)
            self._set_epoch(raw)
        except BaseException:
            if self._owned:
                with anyio.move_on_after(1, shield=True):
                    await self._client.aclose()
            raise

    async def disconnect(self) -> None:
        """Close the client if the store created it from a URL."""
        if self._owned:
            with anyio.move_on_after(1, shield=True):
                await self._client.aclose()

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
        with redis_errors(f"storing an event in {self._where}"):
            raw_seq, raw_epoch = await self._append(
                keys=[self._seq_key, self._epoch_key, self._group_key(group), self._trim_key],
                args=[
                    wire,
                    self._retention_arg,
                    self._max_age_ms,
                    self._channel,
                    group,
                    new_epoch(),
                ],
            )
        seq = int(raw_seq)
        if raw_epoch != self.epoch.encode():
            # The epoch key was lost (a Redis restart without persistence): new history.
            self._set_epoch(raw_epoch)
        await deliver(seq, id_line(self.epoch, seq) + wire)
        return seq

    async def read(self, groups: Sequence[str], after: int) -> list[tuple[int, bytes]] | None:
        """Return the retained events of `groups` after `after`, or None if it expired.

        The cursor also expires when the epoch in Redis is not this store's
        epoch any more (the history was lost); `epoch` is then updated.

        Raises:
            BackendError: Redis cannot be reached.
        """
        groups = list(dict.fromkeys(groups))
        if not groups:
            return []
        with redis_errors(f"reading history from {self._where}"):
            reply = await self._read(
                keys=[self._epoch_key, self._trim_key, *map(self._group_key, groups)],
                args=[f"{after + 1}-0", after, self._max_age_ms, new_epoch(), *groups],
            )
        raw_epoch, expired = reply[0], reply[1]
        if raw_epoch != self.epoch.encode():
            self._set_epoch(raw_epoch)
            return None
        if expired:
            return None
        events = [
            (int(reply[i][:-2]), reply[i + 1])  # stream ids are b"<seq>-0"
            for i in range(2, len(reply), 2)
        ]
        if len(groups) > 1:
            events.sort(key=_seq_of)
        return events

    async def head(self) -> int:
        """Return the highest seq issued so far (0 before the first event).

        Also refreshes `epoch`, which changes if Redis lost the history.

        Raises:
            BackendError: Redis cannot be reached.
        """
        with redis_errors(f"reading the cursor from {self._where}"):
            raw_head, raw_epoch = await self._head(
                keys=[self._seq_key, self._epoch_key], args=[new_epoch()]
            )
        if raw_epoch != self.epoch.encode():
            self._set_epoch(raw_epoch)
        return int(raw_head)


def _seq_of(event: tuple[int, bytes]) -> int:
    return event[0]
