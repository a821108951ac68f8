"""Presence on Redis Cluster: every script call touches the keys of one group only.

A group's presence lives in its own slot (the hash tag of `group_key`), next to
its live channel, so joining, leaving, listing and announcing are one script on
the group's shard:

- `{prefix}:presence:{<group>}`: a hash, member id -> announce flag (`0` or `1`)
  followed by the entry JSON;
- `{prefix}:presence-owners:{<group>}`: a sorted set of `process \\0 member`, all
  with score 0, so the members one process has in the group are one lex range
  (sweeping a dead process costs its own members, not the group's).

Liveness is per process, not per group, so a heartbeat costs the same at 4,000
groups as at one:

- `{prefix}:presence-processes`: a sorted set, process -> the time (the server's
  clock) its members expire; each live process refreshes its own score;
- `{prefix}:presence-groups:{<process>}`: a set, the groups where the process has
  (or recently had) members, written before the members are.

A process whose deadline passed is swept by the next live process that beats:
it reads the dead process's groups, removes its members group by group
(announcing their leave on each group's channel with `SPUBLISH`), then deletes
its set and its registration. These are plain commands and one-group scripts;
no script spans two slots.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio

from .._exceptions import BackendError
from .._redis import LUA_LIVE, ClusterScript, group_key, live_channel

__all__ = ["ClusterPresence"]

# Dead processes swept per heartbeat; more wait for the next one.
_SWEEP_PROCESSES = 10
# Members of a dead process removed from a group per script call, so one call
# never holds a shard for long; the sweep repeats the call until none is left.
_SWEEP_BATCH = 500
# Commands per pipeline when a call touches many groups (drop, sweep).
_PIPELINE_SIZE = 1000

# One call of the group script: its keys and its arguments. (A module-level
# alias: inside the class, `list` names the method.)
_Call = tuple[list[str], list[Any]]
_Calls = list[_Call]
_Replies = list[Any]
_Entries = list[bytes]


class ClusterPresence:
    """The presence of one process's members, on a Redis Cluster.

    The live backend owns it: it calls `join` and `leave` for its streams, `list`
    and `count` for `Broadcast.presence()`, `beat` every `presence_timeout / 6`,
    and `drop` when it disconnects. The members of a process that stops beating
    are removed, their leave announced, within `presence_timeout`.

    Args:
        client: The cluster client (bytes replies).
        prefix: The prefix of every key and channel.
        process: This process's name, unique among the processes on `prefix`.
        presence_timeout: Bound, in seconds, on how long the members of a dead
            process stay listed.
    """

    def __init__(
        self,
        client: redis.asyncio.RedisCluster,
        prefix: str,
        process: str,
        presence_timeout: float,
    ) -> None:
        if "\0" in process or not process:
            raise ValueError(f"a process name must be non-empty without NUL, got {process!r}")
        self._client = client
        self._prefix = prefix
        self._process = process
        # The registration is refreshed every timeout/6 and lies timeout*2/3 ahead:
        # once it passes, the next heartbeat of any process (at most timeout/6
        # later) sweeps the members, within the timeout.
        self._lifetime = presence_timeout * 2 / 3
        # Each call runs on its keys' master only: a master down fails the groups
        # it serves, never the others'.
        self._group_script = ClusterScript(client, _GROUP_SCRIPT)
        self._process_script = ClusterScript(client, _PROCESS_SCRIPT)
        self._processes_key = f"{prefix}:presence-processes"
        self._groups_key = self._groups_key_of(process)
        self._registered = False
        # Members of this process per group, counting joins whose outcome is
        # unknown (a failed call may have written them). `beat` prunes the groups
        # whose count is 0 from the groups set.
        self._members: dict[str, int] = {}
        # Groups in this process's groups set, and those being added to it (the
        # future is done when the SADD ends, whatever its outcome).
        self._listed: set[str] = set()
        self._listing: dict[str, asyncio.Future[None]] = {}
        # Cleared while a pruning is in flight: a join waits, so a group never
        # leaves the set while a member of it is being written.
        self._pruned = asyncio.Event()
        self._pruned.set()

    # -- members ------------------------------------------------------------------

    async def join(self, member: str, groups: Sequence[str], entry: bytes, announce: bool) -> None:
        """List `member` (its `entry` JSON) in `groups`; with `announce`, publish
        `sseviews.join` on each group's channel."""
        while not self._pruned.is_set():
            await self._pruned.wait()
        for group in groups:
            self._members[group] = self._members.get(group, 0) + 1
        if not self._registered:
            await self._process_script(
                keys=[self._processes_key], args=["register", self._process, self._lifetime]
            )
            self._registered = True
        await self._list_groups(groups)
        flag = b"1" if announce else b"0"
        await self._each_group(
            [self._group_call(group, b"join", member.encode(), flag, entry) for group in groups]
        )

    async def leave(self, member: str, groups: Sequence[str], announce: bool) -> None:
        """Remove `member` from `groups`; with `announce`, publish `sseviews.leave` on
        the channel of each group it was still listed in."""
        flag = b"1" if announce else b"0"
        await self._each_group(
            [self._group_call(group, b"leave", member.encode(), flag) for group in groups]
        )
        for group in groups:
            count = self._members.get(group, 0)
            if count > 0:
                self._members[group] = count - 1

    async def list(self, group: str, limit: int) -> _Entries:
        """Return the entries (JSON) of at most `limit` members of `group`."""
        keys, args = self._group_call(group, b"list", b"%d" % limit)
        entries: _Entries = await self._group_script(keys=keys, args=args)
        return entries

    async def count(self, group: str) -> int:
        """Return how many members `group` has, in every process."""
        count: int = await self._client.hlen(group_key(self._prefix, "presence", group))
        return count

    # -- liveness -----------------------------------------------------------------

    async def beat(self, present: bool) -> bool:
        """Refresh this process's registration, sweep dead processes, and forget the
        groups this process left.

        Args:
            present: Whether this process lists members (or is joining some).

        Returns:
            False if other processes had found this one dead and removed its members
            (it missed its heartbeats for longer than its registration lasts).
        """
        register = present or self._registered
        reply = await self._process_script(
            keys=[self._processes_key],
            args=[
                "beat" if register else "sweep",
                self._process,
                self._lifetime,
                _SWEEP_PROCESSES,
            ],
        )
        known, dead = reply[0], [_text(name) for name in reply[1:]]
        kept = True
        if register:
            if self._registered and not known:
                kept = False
                # The sweeper deleted this process's groups set: list the groups
                # again, or the members joined from now on could not be swept.
                self._listed.clear()
                await self._list_groups(list(self._members))
            self._registered = True
        for process in dead:
            await self._sweep(process)
        await self._prune()
        return kept

    async def drop(self) -> None:
        """Remove every member of this process now, announcing their leave where asked,
        and its registration (a server shutting down)."""
        listed = {_text(group) for group in await self._client.smembers(self._groups_key)}
        await self._remove_process(self._process, listed | set(self._members))
        self._members.clear()
        self._listed.clear()
        self._registered = False

    # -- inside -------------------------------------------------------------------

    def _groups_key_of(self, process: str) -> str:
        return group_key(self._prefix, "presence-groups", process)

    def _group_call(self, group: str, op: bytes, *args: bytes) -> _Call:
        # The channel is a key to the cluster too: SPUBLISH from a script must name
        # a channel of the script's slot, as its keys are.
        keys = [
            group_key(self._prefix, "presence", group),
            group_key(self._prefix, "presence-owners", group),
            live_channel(self._prefix, group),
        ]
        return keys, [op, self._process, *args]

    async def _each_group(self, calls: _Calls) -> _Replies:
        """Run the group script once per call: one call directly, several pipelined
        (the cluster client sends each node's share in one round trip)."""
        if len(calls) == 1:
            keys, args = calls[0]
            return [await self._group_script(keys=keys, args=args)]
        replies: _Replies = []
        for start in range(0, len(calls), _PIPELINE_SIZE):
            replies.extend(await self._pipelined(calls[start : start + _PIPELINE_SIZE]))
        return replies

    async def _pipelined(self, calls: _Calls) -> _Replies:
        replies = await self._group_script.pipelined(calls)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _sweep(self, process: str) -> None:
        groups_key = self._groups_key_of(process)
        groups = {_text(group) for group in await self._client.smembers(groups_key)}
        await self._remove_process(process, groups)

    async def _remove_process(self, process: str, groups: set[str]) -> None:
        """Remove `process`'s members from `groups`, then its groups set and its
        registration."""
        pending = sorted(groups)
        while pending:
            calls = [
                self._group_call(group, b"drop", process.encode(), b"%d" % _SWEEP_BATCH)
                for group in pending
            ]
            # A call that found a full batch may have more members to remove.
            replies = await self._each_group(calls)
            pending = [group for group, more in zip(pending, replies, strict=True) if more]
        await self._client.delete(self._groups_key_of(process))
        await self._client.zrem(self._processes_key, process)

    async def _list_groups(self, groups: Sequence[str]) -> None:
        """Add `groups` to this process's groups set before any member is written
        there: a process that dies in between leaves a group with nothing to sweep,
        never members that nobody can find."""
        for _ in (1, 2):
            waiting = {self._listing[group] for group in groups if group in self._listing}
            mine = [g for g in groups if g not in self._listed and g not in self._listing]
            if mine:
                done = asyncio.get_running_loop().create_future()
                self._listing.update(dict.fromkeys(mine, done))
                try:
                    await self._client.sadd(self._groups_key, *mine)
                    self._listed.update(mine)
                finally:
                    for group in mine:
                        del self._listing[group]
                    done.set_result(None)
            if waiting:
                await asyncio.gather(*waiting)
            # A SADD this call waited for failed: try it once more here.
            if all(group in self._listed for group in groups):
                return
        raise BackendError("adding groups to this process's presence set failed")

    async def _prune(self) -> None:
        """Forget the groups where this process has no member left."""
        empty = [group for group, count in self._members.items() if count == 0]
        if not empty:
            return
        # Forgotten before the SREM, whatever its outcome: a later join of one of
        # them adds it again rather than trust a set the SREM may have changed.
        for group in empty:
            del self._members[group]
            self._listed.discard(group)
        self._pruned.clear()
        try:
            await self._client.srem(self._groups_key, *empty)
        finally:
            self._pruned.set()


def _text(reply: bytes | str) -> str:
    return reply.decode() if isinstance(reply, bytes) else reply


# One group's presence. KEYS: the members hash, the owners sorted set, the group's
# live channel. ARGV: op, this process, then the op's own arguments.
# A member's value is its announce flag (`0` or `1`) then its entry JSON; an
# owner is `process \0 member`. Entries and process names never hold NUL.
_GROUP_SCRIPT = (
    LUA_LIVE
    + r"""
local members, owners, channel = KEYS[1], KEYS[2], KEYS[3]
local op, proc = ARGV[1], ARGV[2]

local function announce(event, entry)
  redis.call('SPUBLISH', channel, live_event(event, entry))
end

if op == 'join' then
  local member, flag, entry = ARGV[3], ARGV[4], ARGV[5]
  redis.call('HSET', members, member, flag .. entry)
  redis.call('ZADD', owners, 0, proc .. '\0' .. member)
  if flag == '1' then announce(JOIN_EVENT, entry) end
  return 1
elseif op == 'leave' then
  local member, flag = ARGV[3], ARGV[4]
  local value = redis.call('HGET', members, member)
  -- Gone already when another process swept this one (a missed heartbeat): then
  -- its leave was announced by that process.
  if not value then return 0 end
  redis.call('HDEL', members, member)
  redis.call('ZREM', owners, proc .. '\0' .. member)
  if flag == '1' then announce(LEAVE_EVENT, string.sub(value, 2)) end
  return 1
elseif op == 'drop' then
  -- Remove up to `batch` members of a process; 1 if there may be more.
  local dead, batch = ARGV[3], tonumber(ARGV[4])
  local owned = redis.call('ZRANGEBYLEX', owners, '[' .. dead .. '\0', '(' .. dead .. '\1',
    'LIMIT', 0, batch)
  for _, owner in ipairs(owned) do
    local member = string.sub(owner, #dead + 2)
    local value = redis.call('HGET', members, member)
    if value then
      redis.call('HDEL', members, member)
      if string.sub(value, 1, 1) == '1' then
        announce(LEAVE_EVENT, string.sub(value, 2))
      end
    end
    redis.call('ZREM', owners, owner)
  end
  if #owned == batch then return 1 end
  return 0
elseif op == 'list' then
  local limit = tonumber(ARGV[3])
  local entries = {}
  if redis.call('HLEN', members) <= limit then
    for _, value in ipairs(redis.call('HVALS', members)) do
      entries[#entries + 1] = string.sub(value, 2)
    end
    return entries
  end
  local cursor = '0'
  repeat
    local page = redis.call('HSCAN', members, cursor, 'COUNT', 500)
    cursor = page[1]
    for i = 2, #page[2], 2 do
      if #entries < limit then entries[#entries + 1] = string.sub(page[2][i], 2) end
    end
  until cursor == '0' or #entries >= limit
  return entries
end
return redis.error_reply('unknown presence operation ' .. op)
"""
)

# The processes' registrations. KEYS: the processes sorted set. ARGV: op, this
# process, registration lifetime (s), then for beat and sweep the most dead
# processes to return. beat and sweep return {known, dead...}: whether this
# process was registered, then processes whose registration passed (never itself).
_PROCESS_SCRIPT = r"""
local procs, op, proc, lifetime = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

if op == 'register' then
  redis.call('ZADD', procs, now + lifetime, proc)
  return 1
end
local known = 0
if op == 'beat' then
  if redis.call('ZADD', procs, now + lifetime, proc) == 0 then known = 1 end
elseif op ~= 'sweep' then
  return redis.error_reply('unknown presence operation ' .. op)
end
local reply = {known}
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', procs, '-inf', now, 'LIMIT', 0,
    tonumber(ARGV[4]) + 1)) do
  if dead ~= proc and #reply <= tonumber(ARGV[4]) then reply[#reply + 1] = dead end
end
return reply
"""
