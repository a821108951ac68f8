"""The interface of a live delivery backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

__all__ = ["Dispatch", "LiveBackend", "OnFailure"]

#: Called, in the event loop thread, for every event delivered to this process:
#: `dispatch(group, seq, wire)`, where `wire` is the full message including its `id:` line.
Dispatch = Callable[[str, int, bytes], None]
#: Called when the backend loses its connection; live subscribers must then end.
OnFailure = Callable[[BaseException], None]


class LiveBackend(ABC):
    """Carries events that were already given an id to the subscribers of every process.

    Events for one broadcast must reach `dispatch` in the order of their `seq`.
    """

    @abstractmethod
    async def connect(self, dispatch: Dispatch, on_failure: OnFailure) -> None:
        """Connect, and from now on call `dispatch` for every event of any process.

        When this returns, an event delivered by any process reaches `dispatch`.
        """

    @abstractmethod
    async def disconnect(self) -> None:
        """Stop delivering and release the connection."""

    @abstractmethod
    async def deliver(self, group: str, seq: int, wire: bytes) -> None:
        """Send one event (already stored, with its id in `wire`) to every process.

        Raises:
            BackendError: The backend cannot be reached.
        """

    @property
    def healthy(self) -> bool:
        """False while the backend is disconnected and recovering."""
        return True
