"""The runtime seam on trio (and any anyio backend but asyncio): anyio's own primitives.

A wait is an `anyio.Event`, a region an anyio `CancelScope` (whose deadline is
cheap on trio), and the children of a stream run in an anyio task group.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

__all__ = ["RUNTIME", "AnyioRuntime", "CancelRegion", "StreamTasks", "Waiter"]


class Waiter:
    """Wait (with an optional deadline) until `wake()` is called from the loop's thread."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def wake(self) -> None:
        event = self._event
        if event is not None:
            self._event = None
            event.set()

    def wait(self, deadline: float = math.inf) -> Awaitable[bool]:
        return self._wait(deadline)

    def clock(self) -> float:
        return anyio.current_time()

    async def _wait(self, deadline: float) -> bool:
        event = self._event = anyio.Event()
        try:
            with anyio.CancelScope(deadline=deadline):
                await event.wait()
                return True
            return False
        finally:
            self._event = None

    def close(self) -> None:
        pass  # a deadline lives in the wait's own scope


class CancelRegion:
    """A stretch of the current task that `cancel()` or a deadline ends early."""

    __slots__ = ("_scope", "cancelled_caught")

    def __init__(self) -> None:
        self._scope = anyio.CancelScope()
        self.cancelled_caught = False

    def __enter__(self) -> CancelRegion:
        self._scope.__enter__()
        return self

    def cancel(self) -> None:
        self._scope.cancel()

    def set_deadline(self, deadline: float) -> None:
        self._scope.deadline = deadline

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        swallowed = bool(self._scope.__exit__(exc_type, exc, tb))
        self.cancelled_caught = self._scope.cancelled_caught
        return swallowed


class StreamTasks:
    """Children started in it are cancelled and awaited on exit (an anyio task group)."""

    __slots__ = ("_group",)

    def __init__(self) -> None:
        self._group: anyio.abc.TaskGroup = anyio.create_task_group()

    async def __aenter__(self) -> StreamTasks:
        await self._group.__aenter__()
        return self

    def start(self, function: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        self._group.start_soon(function, name=name)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._group.cancel_scope.cancel()
        return await self._group.__aexit__(exc_type, exc, tb)


class AnyioRuntime:
    """The seam on trio, through anyio."""

    __slots__ = ()

    def task_key(self) -> int:
        return anyio.get_current_task().id

    def waiter(self) -> Waiter:
        return Waiter()

    def region(self) -> CancelRegion:
        return CancelRegion()

    def tasks(self) -> StreamTasks:
        return StreamTasks()

    def background(self, function: Callable[[], Coroutine[Any, Any, None]], name: str) -> object:
        # A system task: it belongs to no request's nursery, so the request that
        # happened to start it can end first.
        import trio

        return trio.lowlevel.spawn_system_task(function, name=name)


RUNTIME = AnyioRuntime()
