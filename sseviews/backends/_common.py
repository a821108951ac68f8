"""What the live backends that hold a connection of their own share.

`ReconnectingBackend` carries the reconnection settings and the presence state
that `RedisBackend`, `RedisClusterBackend` and `PostgresBackend` all have, and
`first_error` runs a connection's reader and writer until one of them ends.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .base import LiveBackend


class ReconnectingBackend(LiveBackend):
    """A live backend that reconnects, with its settings and presence state."""

    #: First pause before reconnecting after a connection was lost, in seconds.
    first_retry_delay = 0.1
    #: Longest pause between two reconnection attempts, in seconds.
    max_retry_delay = 2.0
    #: Bound on one (re)connection attempt, and on the server confirming one
    #: batch of subscribes, in seconds.
    attempt_timeout = 5.0
    #: Seconds this process stays subscribed to a group's channel after its last
    #: stream in the group ended. A stream that joins the group again meanwhile (a
    #: browser reconnecting) costs no round trip.
    unsubscribe_linger = 1.5

    def _init_presence(self, presence_timeout: float) -> None:
        """Check `presence_timeout` and set up this process's presence state.

        Raises:
            ValueError: `presence_timeout` is not a number of seconds > 0.
        """
        if (
            isinstance(presence_timeout, bool)
            or not isinstance(presence_timeout, int | float)
            or not presence_timeout > 0
        ):
            raise ValueError(
                f"presence_timeout must be a number of seconds > 0, got {presence_timeout!r}"
            )
        #: Bound, in seconds, on how long the members of a process that died
        #: without cleaning up stay listed (their leave is announced by then).
        self.presence_timeout = float(presence_timeout)
        self._process = secrets.token_hex(8)  # this backend's name in presence
        self._present = 0  # members of this process listed (or being listed)
        self._heartbeat: asyncio.Task[None] | None = None

    @contextmanager
    def _joining(self) -> Iterator[None]:
        """Count one more member of this process listed, unless the join fails."""
        self._present += 1
        try:
            yield
        except BaseException:
            self._present -= 1
            raise


async def first_error(
    tasks: Collection[asyncio.Task[Any]],
    checked: Sequence[asyncio.Task[Any]],
    expected: tuple[type[Exception], ...],
    logger: logging.Logger,
    where: str,
) -> Exception | None:
    """Wait until one of `tasks` ends, then cancel them all and wait for them.

    Returns:
        The error of the first of `checked` that failed (an error not of the
        `expected` kinds is logged as "unexpected error {where}"), or None.
    """
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    for task in checked:
        error = None if task.cancelled() else task.exception()
        if isinstance(error, expected):
            return error
        if isinstance(error, Exception):
            logger.error("unexpected error %s", where, exc_info=error)
            return error
    return None
