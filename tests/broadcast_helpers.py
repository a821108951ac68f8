"""Helpers for the Broadcast tests."""

from __future__ import annotations

from collections.abc import Sequence

import anyio.lowlevel

from sseviews.stores.base import Page
from sseviews.stores.memory import MemoryStore


class YieldingStore(MemoryStore):
    """A memory store whose reads let other tasks (publishers) run in between, as a
    networked store would: live events then arrive while a subscriber or a stream attaches."""

    async def head(self) -> int:
        await anyio.lowlevel.checkpoint()
        return await super().head()

    async def read(self, groups: Sequence[str], after: int) -> list[tuple[int, bytes]] | None:
        await anyio.lowlevel.checkpoint()
        rows = await super().read(groups, after)
        await anyio.lowlevel.checkpoint()
        return rows

    async def read_page(
        self, groups: Sequence[str], after: int, upto: int, limit_bytes: int
    ) -> Page | None:
        await anyio.lowlevel.checkpoint()
        page = await super().read_page(groups, after, upto, limit_bytes)
        await anyio.lowlevel.checkpoint()
        return page
