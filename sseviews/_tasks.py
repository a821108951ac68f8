"""`StreamTasks`: the child tasks of one stream, always awaited before it returns.

A stream runs its listener (and, for a view with `events()`, its writer) in
child tasks that the request task starts and awaits, so every ASGI call of the
stream runs in a task that belongs to the stream, in the request's contextvars
context (a child task starts with a copy of it).

On trio (and any backend but asyncio) this is an anyio task group. On asyncio
the children are plain tasks, cancelled and awaited on exit: an anyio task group
costs about 6 KB more per stream (measured with tracemalloc), which matters at
10,000 open streams, and it would give nothing here that the exit below does
not (the children catch their own errors; see `Connection`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

__all__ = ["CancelRegion", "StreamTasks"]


class StreamTasks:
    """An async context manager: children started in it are cancelled and awaited on exit."""

    __slots__ = ("_group", "_tasks")

    def __init__(self, asyncio_loop: bool) -> None:
        self._tasks: list[asyncio.Task[None]] | None = [] if asyncio_loop else None
        self._group: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> StreamTasks:
        if self._tasks is None:
            group = self._group = anyio.create_task_group()
            await group.__aenter__()
        return self

    def start(self, function: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `function()` in a child task of the stream; it must catch its own errors."""
        tasks = self._tasks
        if tasks is not None:
            tasks.append(asyncio.get_running_loop().create_task(function()))
        else:
            assert self._group is not None
            self._group.start_soon(function)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tasks = self._tasks
        if tasks is None:
            assert self._group is not None
            self._group.cancel_scope.cancel()
            return await self._group.__aexit__(exc_type, exc, tb)
        running = [task for task in tasks if not task.done()]
        if running:
            for task in running:
                task.cancel()
            # Shielded: the children must be gone before the stream's teardown,
            # even when the request task itself is being cancelled.
            with anyio.CancelScope(shield=True):
                await asyncio.wait(running)
        return None


class CancelRegion:
    """A stretch of one task of a stream that another part of the stream can end early.

    The writer's loop is one (cancelled when a send times out or the client is
    gone), and so is the request task's wait on `receive()` (cancelled when the
    writer has ended the stream). Leaving the region swallows that cancellation,
    and only that one: a cancellation from outside (the server, a middleware's
    timeout) goes on up.

    On asyncio the region cancels its task natively and takes the request back
    with `Task.uncancel()`, as `asyncio.timeout()` does: an anyio `CancelScope`
    kept open for a stream's whole life costs about 0.9 KB and 6 objects for the
    garbage collector to track (measured), and a stream has two such regions. On
    other backends (trio) it is an anyio `CancelScope`, which is cheap there.
    """

    __slots__ = ("_asyncio", "_cancelling", "_requested", "_scope", "_task", "cancelled_caught")

    def __init__(self, asyncio_loop: bool) -> None:
        self._asyncio = asyncio_loop
        self._task: asyncio.Task[Any] | None = None
        self._scope: anyio.CancelScope | None = None
        self._cancelling = 0
        self._requested = False
        #: Whether the region was left because `cancel()` (or its deadline) ended it.
        self.cancelled_caught = False

    def __enter__(self) -> CancelRegion:
        if self._asyncio:
            task = asyncio.current_task()
            assert task is not None
            self._task = task
            self._cancelling = task.cancelling()
        else:
            scope = self._scope = anyio.CancelScope()
            scope.__enter__()
        return self

    def cancel(self) -> None:
        """End the region at its next await (from any other task, or a callback)."""
        scope = self._scope
        if scope is not None:
            scope.cancel()
            return
        task = self._task
        if task is not None and not self._requested:
            self._requested = True
            task.cancel()

    def set_deadline(self, deadline: float) -> None:
        """(not asyncio) End the region at `deadline` on anyio's clock."""
        scope = self._scope
        if scope is not None:
            scope.deadline = deadline

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        scope = self._scope
        if scope is not None:
            swallowed = bool(scope.__exit__(exc_type, exc, tb))
            self.cancelled_caught = scope.cancelled_caught
            return swallowed
        task, self._task = self._task, None
        if not self._requested or task is None:
            return False
        # Our cancellation is taken back; any other one still pending goes on up.
        if task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            self.cancelled_caught = True
            return True
        return False
