"""Helpers for the tests of Broadcast, its live backends and its stores: a store that
yields to other tasks, a recorder of what a backend dispatches, and id checks."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import anyio.lowlevel

from sseviews.stores.base import Page, Position, parse_cursor
from sseviews.stores.memory import MemoryStore


class YieldingStore(MemoryStore):
    """A memory store whose reads let other tasks (publishers) run in between, as a
    networked store would: live events then arrive while a subscriber or a stream attaches."""

    async def head(self, group: str) -> Position:
        await anyio.lowlevel.checkpoint()
        return await super().head(group)

    async def read(self, group: str, after: Position) -> list[tuple[int, bytes]] | None:
        await anyio.lowlevel.checkpoint()
        rows = await super().read(group, after)
        await anyio.lowlevel.checkpoint()
        return rows

    async def read_page(
        self, group: str, after: Position, upto: int, limit_bytes: int
    ) -> Page | None:
        await anyio.lowlevel.checkpoint()
        page = await super().read_page(group, after, upto, limit_bytes)
        await anyio.lowlevel.checkpoint()
        return page


def steps(start: str, ids: list[str]) -> list[tuple[int, Position]]:
    """Check that each composite id in `ids` moves exactly one group of `start` (a
    composite id of the same groups) to the next seq of its epoch: no gap, no
    duplicate. Return, per event, the index of the group it moved and its position."""
    positions = parse_cursor(start)
    moved: list[tuple[int, Position]] = []
    for event_id in ids:
        now = parse_cursor(event_id)
        assert len(now) == len(positions), (event_id, positions)
        changed = [i for i, (old, new) in enumerate(zip(positions, now, strict=True)) if old != new]
        assert len(changed) == 1, (positions, event_id)
        (index,) = changed
        old, new = positions[index], now[index]
        assert (new.epoch, new.seq) == (old.epoch, old.seq + 1), (positions, event_id)
        moved.append((index, new))
        positions = now
    return moved


class Recorder:
    """Records what a live backend dispatches, and the failures it reports."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, bytes]] = []
        self.failures: list[BaseException] = []
        self._changed = anyio.Event()

    def dispatch(self, group: str, seq: int, wire: bytes) -> None:
        self.events.append((group, seq, wire))
        self._wake()

    def on_failure(self, error: BaseException) -> None:
        self.failures.append(error)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_until(self, check: Callable[[], bool]) -> None:
        """Return once `check()` holds; callers bound the wait."""
        while not check():
            await self._changed.wait()

    async def wait_events(self, count: int) -> None:
        await self.wait_until(lambda: len(self.events) >= count)

    async def wait_failures(self, count: int) -> None:
        await self.wait_until(lambda: len(self.failures) >= count)

    @property
    def seqs(self) -> list[int]:
        return [seq for _, seq, _ in self.events]


async def no_deliver(seq: int, wire: bytes) -> None:
    """A store's `deliver` callback for appends no subscriber waits for."""


def data(text: str) -> bytes:
    """`text` as one SSE message's wire bytes."""
    return b"data: %s\n\n" % text.encode()
