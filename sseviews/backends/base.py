"""The interface of a live delivery backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence

from .._exceptions import BackendError

__all__ = ["EPHEMERAL_SEQ", "Dispatch", "GroupsLost", "LiveBackend", "OnFailure"]

#: Called, in the event loop thread, for every event delivered to this process:
#: `dispatch(group, seq, wire)`, where `wire` is the full message including its `id:` line.
Dispatch = Callable[[str, int, bytes], None]
#: Called when the backend loses its connection; live subscribers must then end
#: (only those of `error.groups` when the error is a `GroupsLost`).
OnFailure = Callable[[BaseException], None]
#: The seq of an ephemeral event (join/leave): delivered live only, never stored,
#: carrying no id, so it never moves a client's Last-Event-ID.
EPHEMERAL_SEQ = 0


class GroupsLost(BackendError):
    """Given to `on_failure` when the backend may have lost the events of some groups
    only (one Redis Cluster shard failed over, or a slot moved): the subscriptions
    to these groups end, the others go on."""

    def __init__(self, message: str, groups: Iterable[str]) -> None:
        super().__init__(message)
        #: The groups whose live subscribers must end.
        self.groups = frozenset(groups)


class LiveBackend(ABC):
    """Carries events that were already given an id to the subscribers of every process.

    Events of one group should reach `dispatch` in the order of their `seq`. One
    that arrives early costs its subscribers a read of the history (they read the
    events before it there, and drop the late copies), never an event.

    A backend may deliver only the groups this process serves: the broadcast calls
    `subscribe()` before a subscription reads its groups' history, and
    `unsubscribe()` when the last subscription of a group leaves this process.
    """

    @abstractmethod
    async def connect(self, dispatch: Dispatch, on_failure: OnFailure) -> None:
        """Connect, and from now on call `dispatch` for the events of the groups
        this process subscribed to (`subscribe()`), delivered by any process.
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

    async def subscribe(self, groups: Sequence[str]) -> None:  # noqa: B027 (optional)
        """Receive the events of `groups` in this process, from now on.

        Returns once the backend has confirmed it: an event delivered to one of
        `groups` after this returns, by any process, reaches `dispatch`. The
        groups stay subscribed until `unsubscribe()`, across reconnections.

        The broadcast calls it for each subscription it attaches, with all of its
        groups, before it reads their history (so the replay and the live events
        meet without a gap). It returns at once for groups already confirmed, and
        concurrent calls for a group being subscribed all wait for its one
        confirmation. The default does nothing: it suits a backend that delivers
        every event to every process.

        Raises:
            BackendError: The backend is not connected, or lost its connection
                before it confirmed (the groups stay wanted, and are subscribed
                again once the connection is back).
        """

    def unsubscribe(self, groups: Sequence[str]) -> None:  # noqa: B027 (optional)
        """Stop wanting the events of `groups`; no subscription of this process uses them.

        It returns at once. The backend may go on delivering their events for a
        while (a backend that unsubscribes lazily, to absorb reconnections): the
        broadcast drops events of groups it has no subscription for.
        """

    @property
    def healthy(self) -> bool:
        """False while the backend is disconnected and recovering."""
        return True

    # -- presence (see sseviews._presence) ------------------------------------------
    # Not abstract: a backend without presence still delivers events; a view or a
    # caller that asks it for presence gets NotImplementedError.

    async def presence_join(
        self, member: str, groups: Sequence[str], entry: bytes, announce: bool
    ) -> None:
        """List `member` (its `entry` JSON) in `groups`, in one write; with `announce`,
        deliver an ephemeral `sseviews.join` event to each group.

        Raises:
            BackendError: The backend cannot be reached.
        """
        raise NotImplementedError(f"{type(self).__name__} does not track presence")

    async def presence_leave(
        self, member: str, groups: Sequence[str], entry: bytes, announce: bool
    ) -> None:
        """Remove `member` from `groups`, in one write; with `announce`, deliver an
        ephemeral `sseviews.leave` event to each group it was still listed in.

        Raises:
            BackendError: The backend cannot be reached.
        """
        raise NotImplementedError(f"{type(self).__name__} does not track presence")

    async def presence_list(self, group: str, limit: int) -> list[bytes]:
        """Return the entries (JSON) of at most `limit` members of `group`, every process.

        Raises:
            BackendError: The backend cannot be reached.
        """
        raise NotImplementedError(f"{type(self).__name__} does not track presence")

    async def presence_count(self, group: str) -> int:
        """Return how many members `group` has, in every process.

        Raises:
            BackendError: The backend cannot be reached.
        """
        raise NotImplementedError(f"{type(self).__name__} does not track presence")
