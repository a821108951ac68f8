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
import sniffio

__all__ = ["StreamTasks"]


class StreamTasks:
    """An async context manager: children started in it are cancelled and awaited on exit."""

    __slots__ = ("_group", "_tasks")

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] | None = None
        self._group: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> StreamTasks:
        if sniffio.current_async_library() == "asyncio":
            self._tasks = []
        else:
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
