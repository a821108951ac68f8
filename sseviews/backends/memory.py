"""In-process live delivery: the embedded default, `memory://`."""

from __future__ import annotations

from collections.abc import Sequence

from .._presence import JOIN_EVENT, LEAVE_EVENT, presence_wire
from .base import EPHEMERAL_SEQ, Dispatch, LiveBackend, OnFailure

__all__ = ["MemoryBackend"]


class MemoryBackend(LiveBackend):
    """Delivers events to the subscribers of this process only.

    Under a server with several worker processes each worker has its own groups:
    use `redis://` there.
    """

    def __init__(self) -> None:
        self._dispatch: Dispatch | None = None
        # group -> member id -> entry JSON (shared with the stream, not copied).
        self._presence: dict[str, dict[str, bytes]] = {}

    async def connect(self, dispatch: Dispatch, on_failure: OnFailure) -> None:
        self._dispatch = dispatch

    async def disconnect(self) -> None:
        self._dispatch = None
        self._presence.clear()

    async def deliver(self, group: str, seq: int, wire: bytes) -> None:
        dispatch = self._dispatch
        if dispatch is not None:
            dispatch(group, seq, wire)

    # -- presence: this process's members ---------------------------------------------

    async def presence_join(
        self, member: str, groups: Sequence[str], entry: bytes, announce: bool
    ) -> None:
        presence = self._presence
        for group in groups:
            members = presence.get(group)
            if members is None:
                members = presence[group] = {}
            members[member] = entry
        if announce:
            await self._announce(groups, presence_wire(JOIN_EVENT, entry))

    async def presence_leave(
        self, member: str, groups: Sequence[str], entry: bytes, announce: bool
    ) -> None:
        presence = self._presence
        left = []
        for group in groups:
            members = presence.get(group)
            if members is not None and members.pop(member, None) is not None:
                left.append(group)
                if not members:
                    del presence[group]
        if announce and left:
            await self._announce(left, presence_wire(LEAVE_EVENT, entry))

    async def presence_list(self, group: str, limit: int) -> list[bytes]:
        members = self._presence.get(group)
        if not members:
            return []
        entries = list(members.values())
        return entries[:limit]

    async def presence_count(self, group: str) -> int:
        return len(self._presence.get(group, ()))

    async def _announce(self, groups: Sequence[str], wire: bytes) -> None:
        for group in groups:
            await self.deliver(group, EPHEMERAL_SEQ, wire)
