"""A bounded in-process history: the embedded default of `memory://`."""

from __future__ import annotations

import itertools
import time
from bisect import bisect_right
from collections import deque

import anyio

from .base import (
    Deliver,
    HistoryStore,
    Page,
    Position,
    Sweeper,
    check_idle_expiry,
    check_retention,
    cut_page,
    id_line,
    new_epoch,
    sweep_interval,
)

__all__ = ["MemoryStore"]


class _Group:
    """One group's history: its epoch, last seq, retained events and trim mark."""

    __slots__ = ("epoch", "log", "seq", "trimmed", "used")

    def __init__(self) -> None:
        self.epoch = new_epoch()
        self.seq = 0
        # (seq, monotonic time, stored wire), by seq.
        self.log: deque[tuple[int, float, bytes]] = deque()
        self.trimmed = 0  # the highest seq removed by retention
        self.used = time.monotonic()  # when it was made or last got an event


class MemoryStore(HistoryStore):
    """Keeps the last `retention` events of each group (and/or those younger than
    `max_age` seconds) in this process's memory. Lost when the process exits.

    A group with no event for `max_age` (else `idle_expiry`) seconds is removed,
    epoch included, by a sweep that runs between `connect()` and `disconnect()`.
    """

    def __init__(
        self,
        *,
        retention: int | None = 1000,
        max_age: float | None = None,
        idle_expiry: float | None = 86400.0,
    ) -> None:
        check_retention(retention, max_age)
        check_idle_expiry(idle_expiry)
        self.retention = retention
        self.max_age = max_age
        self.idle_expiry = idle_expiry
        self._groups: dict[str, _Group] = {}
        # Orders the appends with their live delivery, which may await (on Redis). An
        # uncontended acquire does not yield: `Broadcast.publish()` has just yielded.
        self._lock = anyio.Lock(fast_acquire=True)
        self._sweeper: Sweeper | None = None

    @property
    def _ttl(self) -> float | None:
        return self.max_age if self.max_age is not None else self.idle_expiry

    async def connect(self) -> None:
        ttl = self._ttl
        if ttl is not None and self._sweeper is None:
            self._sweeper = Sweeper(self._sweep_async, sweep_interval(ttl))
            self._sweeper.start(f"sseviews memory history sweep {id(self):x}")

    async def disconnect(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            await sweeper.stop()

    async def _sweep_async(self) -> None:
        self.sweep()

    def sweep(self) -> int:
        """Remove the groups with no event younger than the idle expiry; return how many."""
        ttl = self._ttl
        if ttl is None:
            return 0
        oldest = time.monotonic() - ttl
        idle = [name for name, group in self._groups.items() if group.used < oldest]
        for name in idle:
            del self._groups[name]
        if len(idle) > len(self._groups):
            # A dict never shrinks its table as keys go: copy what is left, so a
            # burst of groups that all expired gives its memory back.
            self._groups = dict(self._groups)
        return len(idle)

    def _group(self, name: str) -> _Group:
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = _Group()
        return group

    def _trim(self, group: _Group) -> None:
        log = group.log
        removed = 0
        if self.retention is not None:
            while len(log) > self.retention:
                removed = log.popleft()[0]
        if self.max_age is not None:
            oldest = time.monotonic() - self.max_age
            while log and log[0][1] < oldest:
                removed = log.popleft()[0]
        if removed:
            group.trimmed = removed

    async def append(self, group: str, wire: bytes, deliver: Deliver) -> Position:
        async with self._lock:
            state = self._group(group)
            seq = state.seq = state.seq + 1
            stored = id_line(state.epoch, seq) + wire
            now = state.used = time.monotonic()
            state.log.append((seq, now, stored))
            self._trim(state)
            await deliver(seq, stored)
        return Position(state.epoch, seq)

    async def head(self, group: str) -> Position:
        state = self._group(group)
        return Position(state.epoch, state.seq)

    def _resumable(self, group: str, after: Position) -> _Group | None:
        """The group if a read after `after` loses nothing, after applying retention."""
        state = self._groups.get(group)
        if state is None or state.epoch != after.epoch or after.seq > state.seq:
            return None
        self._trim(state)
        if state.trimmed > after.seq:
            return None
        return state

    async def read_page(
        self, group: str, after: Position, upto: int, limit_bytes: int
    ) -> Page | None:
        state = self._resumable(group, after)
        if state is None:
            return None
        log = state.log
        start = bisect_right(log, after.seq, key=_seq_of)
        events = ((seq, wire) for seq, _, wire in itertools.islice(log, start, None))
        return cut_page(events, upto, limit_bytes)

    async def read(self, group: str, after: Position) -> list[tuple[int, bytes]] | None:
        state = self._resumable(group, after)
        if state is None:
            return None
        run: list[tuple[int, bytes]] = []
        for seq, _, wire in reversed(state.log):
            if seq <= after.seq:
                break
            run.append((seq, wire))
        run.reverse()
        return run


def _seq_of(entry: tuple[int, float, bytes]) -> int:
    return entry[0]
