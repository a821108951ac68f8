"""A bounded in-process history: the embedded default of `memory://`."""

from __future__ import annotations

import heapq
import itertools
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Iterator, Sequence

import anyio

from .base import (
    Deliver,
    HistoryStore,
    Page,
    Sweeper,
    check_idle_expiry,
    check_retention,
    cut_page,
    id_line,
    new_epoch,
    sweep_interval,
)

__all__ = ["MemoryStore"]


class MemoryStore(HistoryStore):
    """Keeps the last `retention` events of each group (and/or those younger than
    `max_age` seconds) in this process's memory. Lost when the process exits.

    A group with no event for `max_age` (else `idle_expiry`) seconds is removed,
    with its trim mark, by a sweep that runs between `connect()` and `disconnect()`.
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
        self.epoch = new_epoch()
        self._seq = 0
        self._logs: dict[str, deque[tuple[int, float, bytes]]] = {}
        self._trimmed: dict[str, int] = {}
        # The highest seq removed with a whole group: the trim mark of every group
        # this store holds no mark for.
        self._swept = 0
        self._lock = anyio.Lock()
        self._sweeper: Sweeper | None = None

    @property
    def _ttl(self) -> float | None:
        return self.max_age if self.max_age is not None else self.idle_expiry

    async def connect(self) -> None:
        ttl = self._ttl
        if ttl is not None and self._sweeper is None:
            self._sweeper = Sweeper(self._sweep_async, sweep_interval(ttl))
            self._sweeper.start(f"sseviews memory history sweep {self.epoch}")

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
        idle = [group for group, log in self._logs.items() if log[-1][1] < oldest]
        for group in idle:
            self._swept = max(self._swept, self._logs.pop(group)[-1][0])
            self._trimmed.pop(group, None)
        # A mark whose group holds no event any more: everything in it was removed.
        for group in [group for group in self._trimmed if group not in self._logs]:
            self._swept = max(self._swept, self._trimmed.pop(group))
        if len(idle) > len(self._logs):
            # A dict never shrinks its table as keys go: copy what is left, so a
            # burst of groups that all expired gives its memory back.
            self._logs = dict(self._logs)
            self._trimmed = dict(self._trimmed)
        return len(idle)

    def _trim(self, group: str, log: deque[tuple[int, float, bytes]]) -> None:
        removed = 0
        if self.retention is not None:
            while len(log) > self.retention:
                removed = log.popleft()[0]
        if self.max_age is not None:
            oldest = time.monotonic() - self.max_age
            while log and log[0][1] < oldest:
                removed = log.popleft()[0]
        if removed:
            self._trimmed[group] = removed
            if not log:
                del self._logs[group]

    async def append(self, group: str, wire: bytes, deliver: Deliver) -> int:
        async with self._lock:
            self._seq += 1
            seq = self._seq
            stored = id_line(self.epoch, seq) + wire
            log = self._logs.get(group)
            if log is None:
                log = self._logs[group] = deque()
            log.append((seq, time.monotonic(), stored))
            self._trim(group, log)
            await deliver(seq, stored)
        return seq

    def _expired(self, groups: Sequence[str], after: int) -> bool:
        """Apply retention to `groups`; True if any event of theirs after `after` is gone."""
        for group in groups:
            log = self._logs.get(group)
            if log is not None:
                self._trim(group, log)
            if self._trimmed.get(group, self._swept) > after:
                return True
        return False

    async def read_page(
        self, groups: Sequence[str], after: int, upto: int, limit_bytes: int
    ) -> Page | None:
        if self._expired(groups, after):
            return None
        runs: list[Iterator[tuple[int, bytes]]] = []
        for group in groups:
            log = self._logs.get(group)
            if log:
                start = bisect_right(log, after, key=_seq_of)
                runs.append(((seq, wire) for seq, _, wire in itertools.islice(log, start, None)))
        if not runs:
            return Page([], upto)
        merged = runs[0] if len(runs) == 1 else heapq.merge(*runs)
        return cut_page(merged, upto, limit_bytes)

    async def read(self, groups: Sequence[str], after: int) -> list[tuple[int, bytes]] | None:
        if self._expired(groups, after):
            return None
        runs: list[list[tuple[int, bytes]]] = []
        for group in groups:
            log = self._logs.get(group)
            if not log:
                continue
            run: list[tuple[int, bytes]] = []
            for seq, _, wire in reversed(log):
                if seq <= after:
                    break
                run.append((seq, wire))
            run.reverse()
            runs.append(run)
        if len(runs) == 1:
            return runs[0]
        return list(heapq.merge(*runs))

    async def head(self) -> int:
        return self._seq


def _seq_of(entry: tuple[int, float, bytes]) -> int:
    return entry[0]
