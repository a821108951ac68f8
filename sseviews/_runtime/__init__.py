"""The runtime seam: what a stream needs of its async library, written once per library.

The connection core and the subscription are written once against the protocols
below; `_asyncio.py` and `_trio.py` implement them, as anyio keeps its backends
apart from its core. A stream asks `current_runtime()` once, when it opens.

- `Waiter`: one task waits (with an optional deadline) until another part of the
  stream, or a publisher, wakes it. Waits are level-triggered by the caller: it
  checks its condition, then waits without an `await` in between, so a wake-up
  that came while nobody waited is never needed and is a no-op. Its `clock()`
  is anyio's clock, read from the waiter's own loop: every deadline here is on it.
- `CancelRegion`: a stretch of one task that another part of the stream can end
  early, or a deadline can (a send that takes too long). Leaving the region
  swallows that cancellation and only that one: a cancellation from outside (the
  server, a middleware's timeout) goes on up.
- `StreamTasks`: the child tasks of one stream, started by the request task in a
  copy of its contextvars context, cancelled and awaited before it goes on.
- `task_key()`: an id of the running task.
- `background()`: a task that belongs to an instance (a store's sweep), not to
  the request that happened to start it; the caller holds it and stops it.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Protocol

import sniffio

from . import _asyncio, _trio

__all__ = ["CancelRegion", "Runtime", "StreamTasks", "Waiter", "current_runtime"]


class Waiter(Protocol):
    """Wait until `wake()` is called from the event loop's thread."""

    def wake(self) -> None:
        """Wake the waiting task, if one is waiting."""

    def wait(self, deadline: float = math.inf) -> Awaitable[bool]:
        """Wait for `wake()`; False if `deadline` (on anyio's clock) came first."""

    def close(self) -> None:
        """Drop what the waiter holds for a deadline: nobody will wait on it again."""

    def clock(self) -> float:
        """Anyio's clock, on which `wait()`'s deadline is (read from the waiter's own loop)."""


class CancelRegion(Protocol):
    """A `with` block of one task that `cancel()` or a deadline ends early."""

    #: Whether the region was left because `cancel()` (or its deadline) ended it.
    cancelled_caught: bool

    def __enter__(self) -> CancelRegion: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

    def cancel(self) -> None:
        """End the region at its next await (from any other task, or a callback)."""

    def set_deadline(self, deadline: float) -> None:
        """End the region at `deadline` on anyio's clock (`math.inf`: never)."""


class StreamTasks(Protocol):
    """An async context manager: children started in it are cancelled and awaited on exit."""

    async def __aenter__(self) -> StreamTasks: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None: ...

    def start(self, function: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """Run `function()` in a child task of the stream, named `name`; it must catch
        its own errors."""


class Runtime(Protocol):
    """One async library's implementation of the seam."""

    def task_key(self) -> int:
        """Identify the running task."""

    def waiter(self) -> Waiter:
        """A new `Waiter`, for use in the running event loop."""

    def region(self) -> CancelRegion:
        """A new `CancelRegion`, to enter in the task it ends."""

    def tasks(self) -> StreamTasks:
        """A new `StreamTasks`."""

    def background(self, function: Callable[[], Coroutine[Any, Any, None]], name: str) -> object:
        """Run `function()` in a task that outlives the caller's; hold the returned handle.

        The function must catch its own errors and end when its owner stops it.
        """


def current_runtime() -> Runtime:
    """The runtime of the running async library: asyncio's, else anyio's generic one (trio)."""
    if sniffio.current_async_library() == "asyncio":
        return _asyncio.RUNTIME
    return _trio.RUNTIME
