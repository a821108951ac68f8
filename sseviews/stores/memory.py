"""A bounded in-process history: the embedded default of `memory://`."""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Sequence

import anyio

from .base import Deliver, HistoryStore, check_retention, id_line, new_epoch

__all__ = ["MemoryStore"]


class MemoryStore(HistoryStore):
    """Keeps the last `retention` events of each group (and/or those younger than
    `max_age` seconds) in this process's memory. Lost when the process exits.
    """

    def __init__(self, *, retention: int | None = 1000, max_age: float | None = None) -> None:
        check_retention(retention, max_age)
        self.retention = retention
        self.max_age = max_age
        self.epoch = new_epoch()
        self._seq = 0
        self._logs: dict[str, deque[tuple[int, float, bytes]]] = {}
        self._trimmed: dict[str, int] = {}
        self._lock = anyio.Lock()

    async def connect(self) -> None:
        return None

    async def disconnect(self) -> None:
        return None

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

    async def read(self, groups: Sequence[str], after: int) -> list[tuple[int, bytes]] | None:
        runs: list[list[tuple[int, bytes]]] = []
        for group in groups:
            log = self._logs.get(group)
            if log is not None:
                self._trim(group, log)
            if self._trimmed.get(group, 0) > after:
                return None
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
