"""In-process live delivery: the embedded default, `memory://`."""

from __future__ import annotations

from .base import Dispatch, LiveBackend, OnFailure

__all__ = ["MemoryBackend"]


class MemoryBackend(LiveBackend):
    """Delivers events to the subscribers of this process only.

    Under a server with several worker processes each worker has its own groups:
    use `redis://` there.
    """

    def __init__(self) -> None:
        self._dispatch: Dispatch | None = None

    async def connect(self, dispatch: Dispatch, on_failure: OnFailure) -> None:
        self._dispatch = dispatch

    async def disconnect(self) -> None:
        self._dispatch = None

    async def deliver(self, group: str, seq: int, wire: bytes) -> None:
        dispatch = self._dispatch
        if dispatch is not None:
            dispatch(group, seq, wire)
