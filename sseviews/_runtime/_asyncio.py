"""The runtime seam on asyncio: loop futures, native task cancellation, and lazy timers.

A stream lives for minutes and is woken once per burst of events, so these keep
what they hold per stream small and make a wake-up one call:

- a wait is one loop future, awaited as it is (no coroutine object per wait);
- a deadline is one timer handle, moved only when it would fire late: a later
  deadline keeps the earlier timer, which re-arms itself when it fires early, so
  a writer that waits for its next ping after every event does not replace its
  timer each time;
- a region cancels its task natively and takes the cancellation back with
  `Task.uncancel()`, as `asyncio.timeout()` does, instead of keeping an anyio
  `CancelScope` open for the stream's whole life;
- the children of a stream are plain tasks, cancelled and awaited on exit; they
  catch their own errors, so a task group would add nothing but its weight.

The numbers behind these choices are measured by `benchmarks/`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any

import anyio

__all__ = ["RUNTIME", "AsyncioRuntime", "CancelRegion", "StreamTasks", "Waiter"]


class Waiter:
    """Wait (with an optional deadline) until `wake()` is called from the loop's thread."""

    __slots__ = ("_deadline", "_future", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[bool] | None = None
        self._deadline = math.inf
        self._timer: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        future = self._future
        if future is not None:
            self._future = None
            if not future.done():
                future.set_result(True)

    def wait(self, deadline: float = math.inf) -> Awaitable[bool]:
        # A cancelled wait leaves a cancelled future here, which wake() and the
        # timer skip and the next wait replaces.
        future: asyncio.Future[bool] = self._loop.create_future()
        self._future = future
        self._deadline = deadline
        if deadline != math.inf:
            timer = self._timer
            if timer is None or timer.when() > deadline:
                self._arm(deadline)
        return future

    def clock(self) -> float:
        # The loop's own clock: asyncio.get_running_loop() would make a getpid()
        # system call on every read (CPython checks for a fork).
        return self._loop.time()

    def close(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer = None
        future = self._future
        deadline = self._deadline
        if future is None or future.done() or deadline == math.inf:
            return  # nobody waits with a deadline: the next such wait arms again
        if self._loop.time() >= deadline:
            self._future = None
            future.set_result(False)
        else:
            self._arm(deadline)  # armed for an earlier wait's deadline


class CancelRegion:
    """A stretch of the current task that `cancel()` or a deadline ends early."""

    __slots__ = ("_cancelling", "_deadline", "_requested", "_task", "_timer", "cancelled_caught")

    def __init__(self) -> None:
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._requested = False
        self._deadline = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self.cancelled_caught = False

    def __enter__(self) -> CancelRegion:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        return self

    def cancel(self) -> None:
        task = self._task
        if task is not None and not self._requested:
            self._requested = True
            task.cancel()

    def set_deadline(self, deadline: float) -> None:
        self._deadline = deadline
        if deadline != math.inf and self._task is not None:
            timer = self._timer
            if timer is None or timer.when() > deadline:
                self._arm(deadline)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        assert self._task is not None
        self._timer = self._task.get_loop().call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer = None
        deadline = self._deadline
        task = self._task
        if deadline == math.inf or task is None:
            return  # the deadline was lifted: the next one arms again
        if task.get_loop().time() >= deadline:
            self.cancel()
        else:
            self._arm(deadline)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        task, self._task = self._task, None
        if not self._requested or task is None:
            return False
        # Our cancellation is taken back; any other one still pending goes on up.
        if task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            self.cancelled_caught = True
            return True
        return False


class StreamTasks:
    """Children started in it are cancelled and awaited on exit."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        # A tuple: a stream starts one or two children, and a list would hold spare room.
        self._tasks: tuple[asyncio.Task[None], ...] = ()

    async def __aenter__(self) -> StreamTasks:
        return self

    def start(self, function: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        # Named by the caller: on Python 3.11 an unnamed task formats a name of its own.
        task = asyncio.get_running_loop().create_task(function(), name=name)
        self._tasks += (task,)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        running = [task for task in self._tasks if not task.done()]
        if running:
            for task in running:
                task.cancel()
            # Shielded: the children must be gone before the stream's teardown,
            # even when the request task itself is being cancelled.
            with anyio.CancelScope(shield=True):
                await asyncio.wait(running)
        return None


class AsyncioRuntime:
    """The seam on asyncio."""

    __slots__ = ()

    def task_key(self) -> int:
        return id(asyncio.current_task())

    def waiter(self) -> Waiter:
        return Waiter(asyncio.get_running_loop())

    def region(self) -> CancelRegion:
        return CancelRegion()

    def tasks(self) -> StreamTasks:
        return StreamTasks()

    def background(self, function: Callable[[], Coroutine[Any, Any, None]], name: str) -> object:
        # The caller holds the task: the loop keeps only a weak reference to it.
        return asyncio.get_running_loop().create_task(function(), name=name)


RUNTIME = AsyncioRuntime()
