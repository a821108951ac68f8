"""The interface of a history store, and the event id format it issues."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import NamedTuple

import anyio
import sniffio

from .._exceptions import InvalidLastEventId

logger = logging.getLogger("sseviews")

__all__ = [
    "Deliver",
    "HistoryStore",
    "Page",
    "Sweeper",
    "check_idle_expiry",
    "check_retention",
    "cut_page",
    "format_id",
    "id_line",
    "new_epoch",
    "parse_id",
    "sweep_interval",
]

#: Awaited by `append` with `(seq, wire)` once the event is stored, before the next
#: append may take a seq, so live delivery happens in id order.
Deliver = Callable[[int, bytes], Awaitable[None]]

_ID = re.compile(r"([0-9a-f]{8})-(0|[1-9][0-9]{0,18})")


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


def parse_id(value: str) -> tuple[str, int]:
    """Split an id issued by `format_id` into `(epoch, seq)`.

    Raises:
        InvalidLastEventId: `value` is not of the form `<8 hex digits>-<seq>`.
    """
    match = _ID.fullmatch(value)
    if match is None:
        raise InvalidLastEventId(
            f"Last-Event-ID {value[:80]!r} was not issued by this server: "
            "expected '<epoch>-<sequence>', for example 'a1b2c3d4-42'"
        )
    return match.group(1), int(match.group(2))


def id_line(epoch: str, seq: int) -> bytes:
    """Return the `id:` line that prefixes a stored event's wire bytes."""
    return b"id: %s-%d\n" % (epoch.encode(), seq)


class HistoryStore(ABC):
    """Keeps the last events of each group, and assigns the broadcast's event ids.

    Ids come from one monotonic sequence per store (`seq`, starting at 1), shared
    by all groups, plus the store's `epoch`, which changes when the history is
    reset. Retention is per group: the last `retention` events, and/or those
    younger than `max_age` seconds. A group with no event for `max_age` (else
    `idle_expiry`) seconds is removed with its trim mark; `read` then treats a
    cursor older than that as expired for a group it holds nothing of.
    """

    #: Set by `connect()`.
    epoch: str

    @abstractmethod
    async def connect(self) -> None:
        """Open the store (create tables, read or create the epoch)."""

    @abstractmethod
    async def disconnect(self) -> None:
        """Close the store."""

    @abstractmethod
    async def append(self, group: str, wire: bytes, deliver: Deliver) -> int:
        """Store one event and return its seq.

        `wire` is the encoded event without an `id:` line; the store keeps
        `id_line(epoch, seq) + wire`, applies retention to `group` (remembering the
        highest seq it trimmed from it), then awaits `deliver(seq, stored_wire)`.
        Appends are serialised from assigning the seq until `deliver` returns,
        across every process sharing the store, so live order is id order.

        Raises:
            BackendError: The store cannot be reached.
        """

    @abstractmethod
    async def read(self, groups: Sequence[str], after: int) -> list[tuple[int, bytes]] | None:
        """Return `(seq, wire)` of every retained event of `groups` after `after`, by seq.

        Returns None when the cursor expired: some event of `groups` with a seq
        greater than `after` has been trimmed (recovery is all or nothing).

        Raises:
            BackendError: The store cannot be reached.
        """

    async def read_page(
        self, groups: Sequence[str], after: int, upto: int, limit_bytes: int
    ) -> Page | None:
        """Return one page of the events of `groups` with `after < seq <= upto`, by seq.

        The page holds events until their size reaches `limit_bytes` (so at least
        one, when the range has any), and its `end` says where the next page
        starts. Returns None when the cursor expired, as `read` does.

        The stores of sseviews read only the page. This default reads everything
        after `after` with `read` and cuts the page from it: a store of your own
        should override it, so a replay's memory stays bounded.

        Raises:
            BackendError: The store cannot be reached.
        """
        events = await self.read(groups, after)
        if events is None:
            return None
        return cut_page(events, upto, limit_bytes)

    @abstractmethod
    async def head(self) -> int:
        """Return the highest seq issued so far (0 before the first event)."""


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


class Sweeper:
    """A store's periodic sweep: a background task started by its `connect()`.

    It belongs to the store instance (never to the process), calls `sweep` every
    `interval` seconds, and is stopped, within a second, by `stop()`. Exceptions
    from `sweep` are logged by it, never raised.
    """

    def __init__(self, sweep: Callable[[], Awaitable[object]], interval: float) -> None:
        self._sweep = sweep
        self._interval = interval
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        self._task: asyncio.Task[None] | None = None  # asyncio: held, see start()

    def start(self, name: str) -> None:
        if sniffio.current_async_library() == "trio":
            import trio

            trio.lowlevel.spawn_system_task(self._run, name=name)
        else:
            # Held here: the loop keeps only a weak reference to a task.
            self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    async def _run(self) -> None:
        try:
            with self._scope:
                while True:
                    await anyio.sleep(self._interval)
                    try:
                        await self._sweep()
                    except Exception:
                        logger.exception("sweeping idle groups failed; trying again later")
        finally:
            self._done.set()

    async def stop(self) -> None:
        self._scope.cancel()
        with anyio.move_on_after(1, shield=True):
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
