"""The interface of a history store, and the event id format it issues."""

from __future__ import annotations

import logging
import math
import re
import secrets
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import NamedTuple

import anyio

from .._exceptions import InvalidLastEventId
from .._runtime import current_runtime

logger = logging.getLogger("sseviews")

__all__ = [
    "MAX_CURSOR_GROUPS",
    "Deliver",
    "HistoryStore",
    "Page",
    "Position",
    "SeenPositions",
    "Sweeper",
    "check_idle_expiry",
    "check_retention",
    "cut_page",
    "format_cursor",
    "format_id",
    "id_line",
    "new_epoch",
    "parse_cursor",
    "parse_id",
    "sweep_interval",
]

#: Awaited by `append` with `(seq, wire)` once the event is stored, before the next
#: append to the same group may take a seq, so live delivery happens in id order.
Deliver = Callable[[int, bytes], Awaitable[None]]

#: Most positions a composite id carries: the most groups one stream may join.
MAX_CURSOR_GROUPS = 256

_ID = re.compile(r"([0-9a-f]{8})-(0|[1-9][0-9]{0,18})")
# One position of a composite id: 8 hex digits, a dash and at most 19 digits, then
# a dot between positions.
_MAX_CURSOR_LENGTH = 29 * MAX_CURSOR_GROUPS - 1


class Position(NamedTuple):
    """Where a group's history is: its epoch and the seq of its latest event (0: none)."""

    #: The group's epoch: 8 lowercase hex digits, new whenever its history restarts.
    epoch: str
    #: The group's seq: its events are numbered 1, 2, 3... within the epoch.
    seq: int


class Page(NamedTuple):
    """One page of a replay, as `HistoryStore.read_page` returns it."""

    #: `(seq, wire)` of the page's events, by seq.
    events: list[tuple[int, bytes]]
    #: The seq the page reads up to: the next page starts after it. It equals the
    #: `upto` asked for when no event of the range is left.
    end: int


def cut_page(events: Iterable[tuple[int, bytes]], upto: int, limit_bytes: int) -> Page:
    """Return the page of `events` (by seq, all after the cursor) that ends at `upto`
    or once `limit_bytes` are reached, whichever comes first."""
    page: list[tuple[int, bytes]] = []
    size = 0
    for event in events:
        if event[0] > upto:
            break
        if size >= limit_bytes:
            return Page(page, page[-1][0])
        page.append(event)
        size += len(event[1])
    return Page(page, upto)


def new_epoch() -> str:
    """Return a new random epoch: 8 lowercase hex digits."""
    return secrets.token_hex(4)


def format_id(epoch: str, seq: int) -> str:
    """Return the event id for `seq` in `epoch`: `"<epoch>-<seq>"`."""
    return f"{epoch}-{seq}"


def format_cursor(positions: Iterable[Position]) -> str:
    """Return the composite id of several groups' positions: `"<e1>-<s1>.<e2>-<s2>..."`."""
    return ".".join([f"{epoch}-{seq}" for epoch, seq in positions])


def _malformed(value: str) -> InvalidLastEventId:
    return InvalidLastEventId(
        f"Last-Event-ID {value[:80]!r} was not issued by this server: expected "
        "'<epoch>-<sequence>', for example 'a1b2c3d4-42', or several of them joined by "
        "'.' for a stream of several groups"
    )


def parse_id(value: str) -> tuple[str, int]:
    """Split an id issued by `format_id` into `(epoch, seq)`.

    Raises:
        InvalidLastEventId: `value` is not of the form `<8 hex digits>-<seq>`.
    """
    match = _ID.fullmatch(value)
    if match is None:
        raise _malformed(value)
    return match.group(1), int(match.group(2))


def parse_cursor(value: str) -> list[Position]:
    """Split an id (one position) or a composite id (several, joined by `.`) into
    its positions, in order.

    Raises:
        InvalidLastEventId: `value` is neither, or holds more than
            `MAX_CURSOR_GROUPS` positions.
    """
    if len(value) > _MAX_CURSOR_LENGTH:
        raise _malformed(value)
    positions = []
    for part in value.split("."):
        match = _ID.fullmatch(part)
        if match is None:
            raise _malformed(value)
        positions.append(Position(match.group(1), int(match.group(2))))
    return positions


def id_line(epoch: str, seq: int) -> bytes:
    """Return the `id:` line that prefixes a stored event's wire bytes."""
    return b"id: %s-%d\n" % (epoch.encode(), seq)


class HistoryStore(ABC):
    """Keeps the last events of each group, and assigns the broadcast's event ids.

    Each group has its own history: an `epoch` (8 random hex digits, made when the
    group is first used, and again whenever its history restarts) and a sequence
    1, 2, 3... with no gap within the epoch. An event's id is `<epoch>-<seq>`.
    Nothing is shared between groups, so appends to different groups never contend.

    Retention is per group: the last `retention` events, and/or those younger than
    `max_age` seconds. A group with no event for `max_age` (else `idle_expiry`)
    seconds is removed as a whole, epoch included: its next use starts a new epoch,
    so a cursor into it gets the reset event.
    """

    @abstractmethod
    async def connect(self) -> None:
        """Open the store (create tables, check the server)."""

    @abstractmethod
    async def disconnect(self) -> None:
        """Close the store."""

    @abstractmethod
    async def append(self, group: str, wire: bytes, deliver: Deliver) -> Position:
        """Store one event in `group` and return its position (its id's epoch and seq).

        `wire` is the encoded event without an `id:` line; the store keeps
        `id_line(epoch, seq) + wire`, applies retention to `group` (remembering the
        highest seq it trimmed from it), then awaits `deliver(seq, stored_wire)`.
        Appends to one group should be serialised from assigning the seq until
        `deliver` returns, across every process sharing the store, so a group's live
        order is its id order. A store that cannot (or a live layer that reorders)
        costs the streams a read of the history for each event delivered early.

        Raises:
            BackendError: The store cannot be reached.
        """

    def _claim_alone(self) -> bool:
        """Claim the history for this store instance, until `disconnect()`: False when
        another instance, here or in another process, holds the claim.

        An in-process broadcast (`memory://` live) asks it: streams of two instances
        sharing a history never receive each other's events live. A store that
        cannot tell says True.
        """
        return True

    @abstractmethod
    async def head(self, group: str) -> Position:
        """Return `group`'s epoch and latest seq (0 before its first event).

        A group the store holds nothing of gets its epoch here, and is then kept
        for the idle expiry like a group that had an event.

        Raises:
            BackendError: The store cannot be reached.
        """

    async def heads(self, groups: Sequence[str]) -> list[Position]:
        """Return the heads of `groups`, in order (see `head`).

        The Redis and SQL stores read them in one round trip; this default reads
        them one at a time.

        Raises:
            BackendError: The store cannot be reached.
        """
        return [await self.head(group) for group in groups]

    @abstractmethod
    async def read(self, group: str, after: Position) -> list[tuple[int, bytes]] | None:
        """Return `(seq, wire)` of every retained event of `group` after `after`, by seq.

        Returns None when the cursor cannot be resumed: `after.epoch` is not the
        group's epoch, or some event of `group` after `after.seq` has been trimmed
        (recovery is all or nothing).

        Raises:
            BackendError: The store cannot be reached.
        """

    async def read_page(
        self, group: str, after: Position, upto: int, limit_bytes: int
    ) -> Page | None:
        """Return one page of the events of `group` with `after.seq < seq <= upto`, by seq.

        The page holds events until their size reaches `limit_bytes` (so at least
        one, when the range has any), and its `end` says where the next page
        starts. Returns None when the cursor cannot be resumed, as `read` does.

        The stores of sseviews read only the page. This default reads everything
        after `after` with `read` and cuts the page from it: a store of your own
        should override it, so a replay's memory stays bounded.

        Raises:
            BackendError: The store cannot be reached.
        """
        events = await self.read(group, after)
        if events is None:
            return None
        return cut_page(events, upto, limit_bytes)


class SeenPositions:
    """What one store instance issued or saw per group, for the most recent groups.

    A group's counter found below a seq of the same epoch recorded here means its
    history went back (a restored snapshot or backup, a failover to a lagging
    replica): the store then starts a new epoch for it, so no id is issued twice.
    Bounded: the least recently used groups are forgotten past `size`.
    """

    def __init__(self, size: int = 16384) -> None:
        self._size = size
        # group -> (the highest position, when the group was last seen: monotonic s)
        self._seen: OrderedDict[str, tuple[Position, float]] = OrderedDict()

    def get(self, group: str) -> Position | None:
        """Return the highest position recorded for `group`, if it is remembered."""
        entry = self._seen.get(group)
        return None if entry is None else entry[0]

    def idle(self, group: str) -> float | None:
        """Seconds since `group` was last seen, if it is remembered."""
        entry = self._seen.get(group)
        return None if entry is None else time.monotonic() - entry[1]

    def saw(self, group: str, position: Position) -> None:
        """Record that `position` of `group` was issued or seen (a new epoch replaces
        the old one)."""
        seen = self._seen
        entry = seen.get(group)
        if entry is not None and entry[0].epoch == position.epoch and entry[0].seq >= position.seq:
            position = entry[0]
        seen[group] = (position, time.monotonic())
        seen.move_to_end(group)
        if len(seen) > self._size:
            seen.popitem(last=False)


def check_idle_expiry(idle_expiry: float | None) -> None:
    """Validate an idle-group expiry (seconds, or None for none) where it enters.

    Raises:
        ValueError: It is not a positive, finite number of seconds.
        TypeError: It is not a number.
    """
    if idle_expiry is None:
        return
    if isinstance(idle_expiry, bool) or not isinstance(idle_expiry, int | float):
        raise TypeError(f"idle_expiry must be a number of seconds or None, got {idle_expiry!r}")
    if not math.isfinite(idle_expiry) or idle_expiry <= 0:
        raise ValueError(f"idle_expiry must be > 0 seconds, got {idle_expiry}")


def sweep_interval(ttl: float) -> float:
    """How often a store sweeps groups idle for `ttl` seconds: a quarter of it, at most 60 s."""
    return min(60.0, max(0.05, ttl / 4))


#: Bound, in seconds, on one sweep: a sweep is never cancelled in the middle of its
#: queries by `Sweeper.stop()`, which waits for it, so this also bounds `stop()`.
SWEEP_TIMEOUT = 5.0


class Sweeper:
    """A store's periodic sweep: a background task started by its `connect()`.

    It belongs to the store instance (never to the process), calls `sweep` every
    `interval` seconds, and is stopped by `stop()`: at once when it is waiting
    for the next sweep, after the sweep under way otherwise (at most
    `SWEEP_TIMEOUT`). A sweep is not cancelled in the middle of its queries by
    `stop()`: the store closes its connections after `stop()` returns, and a
    query cut off then would wait forever on a closed connection. Exceptions
    from `sweep` are logged by it, never raised.
    """

    def __init__(self, sweep: Callable[[], Awaitable[object]], interval: float) -> None:
        self._sweep = sweep
        self._interval = interval
        self._stopping = False
        # The wait for the next sweep, cancelled by stop().
        self._nap: anyio.CancelScope | None = None
        self._done = anyio.Event()
        self._task: object = None

    def start(self, name: str) -> None:
        self._task = current_runtime().background(self._run, name)

    async def _run(self) -> None:
        try:
            while not self._stopping:
                with anyio.CancelScope() as nap:
                    self._nap = nap
                    await anyio.sleep(self._interval)
                self._nap = None
                if self._stopping:
                    return
                try:
                    with anyio.move_on_after(SWEEP_TIMEOUT):
                        await self._sweep()
                except Exception:
                    logger.exception("sweeping idle groups failed; trying again later")
        finally:
            self._done.set()

    async def stop(self) -> None:
        self._stopping = True
        if self._nap is not None:
            self._nap.cancel()
        with anyio.move_on_after(SWEEP_TIMEOUT + 1, shield=True):
            await self._done.wait()


def check_retention(retention: int | None, max_age: float | None) -> None:
    """Validate retention settings where they enter.

    Raises:
        ValueError: Neither bound is set, or a bound is not positive.
        TypeError: A bound has the wrong type.
    """
    if retention is not None and (not isinstance(retention, int) or isinstance(retention, bool)):
        raise TypeError(f"retention must be an int (events per group) or None, got {retention!r}")
    if max_age is not None and (isinstance(max_age, bool) or not isinstance(max_age, int | float)):
        raise TypeError(f"max_age must be a number of seconds or None, got {max_age!r}")
    if retention is None and max_age is None:
        raise ValueError(
            "history needs a bound: set retention (events per group), max_age, or both"
        )
    if retention is not None and retention < 1:
        raise ValueError(f"retention must be >= 1 event per group, got {retention}")
    if max_age is not None and max_age <= 0:
        raise ValueError(f"max_age must be > 0 seconds, got {max_age}")
