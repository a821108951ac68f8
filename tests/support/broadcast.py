"""Helpers for the Broadcast tests."""

from __future__ import annotations

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
