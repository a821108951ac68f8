"""The runtime seam: each implementation keeps the same promises (tests run on both)."""

from __future__ import annotations

import math

import anyio
import pytest

from sseviews._runtime import current_runtime


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_runtime_waiter_wakes_the_waiting_task() -> None:
    runtime = current_runtime()
    waiter = runtime.waiter()
    results: list[bool] = []

    async def wait() -> None:
        results.append(await waiter.wait())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            waiter.wake()
    assert results == [True]
    waiter.wake()  # nobody waits: a no-op
    waiter.close()


@pytest.mark.anyio
async def test_runtime_waiter_deadline_returns_false_once_passed() -> None:
    runtime = current_runtime()
    waiter = runtime.waiter()
    with anyio.fail_after(5):
        start = waiter.clock()
        assert await waiter.wait(start + 0.05) is False
        assert waiter.clock() >= start + 0.05
        # A wait left early keeps nothing that ends a later wait before its deadline.
        with anyio.move_on_after(0.01):
            await waiter.wait(waiter.clock() + 0.05)
        start = waiter.clock()
        assert await waiter.wait(start + 0.2) is False
        assert waiter.clock() >= start + 0.2
    waiter.close()


@pytest.mark.anyio
async def test_runtime_waiter_earlier_deadline_after_a_later_one_is_kept() -> None:
    runtime = current_runtime()
    waiter = runtime.waiter()
    results: list[bool] = []

    async def wait_long_then_short() -> None:
        with anyio.move_on_after(0.01):
            await waiter.wait(waiter.clock() + 60)  # leaves a timer far ahead
        results.append(await waiter.wait(waiter.clock() + 0.05))

    with anyio.fail_after(5):
        await wait_long_then_short()
    assert results == [False]
    waiter.close()


@pytest.mark.anyio
async def test_runtime_region_deadline_ends_only_the_region() -> None:
    runtime = current_runtime()
    with anyio.fail_after(5):
        with runtime.region() as region:
            region.set_deadline(anyio.current_time() + 0.05)
            await anyio.sleep(10)
        assert region.cancelled_caught
        # A lifted deadline lets the region run to its end.
        with runtime.region() as region:
            region.set_deadline(anyio.current_time() + 0.02)
            region.set_deadline(math.inf)
            await anyio.sleep(0.05)
        assert not region.cancelled_caught


@pytest.mark.anyio
async def test_runtime_region_cancel_from_another_task_is_swallowed() -> None:
    runtime = current_runtime()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            with runtime.region() as region:
                tasks.start_soon(lambda: _cancel_soon(region))
                await anyio.sleep(10)
        assert region.cancelled_caught


async def _cancel_soon(region: object) -> None:
    await anyio.sleep(0.01)
    region.cancel()  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_runtime_region_lets_an_outer_cancellation_through() -> None:
    runtime = current_runtime()
    with anyio.fail_after(5):
        with anyio.move_on_after(0.05) as outer:
            with runtime.region() as region:
                await anyio.sleep(10)
        assert outer.cancelled_caught
        assert not region.cancelled_caught


@pytest.mark.anyio
async def test_runtime_stream_tasks_cancels_and_awaits_children() -> None:
    runtime = current_runtime()
    ended: list[str] = []

    async def child() -> None:
        try:
            await anyio.sleep(10)
        finally:
            ended.append(anyio.get_current_task().name)

    with anyio.fail_after(5):
        async with runtime.tasks() as tasks:
            tasks.start(child, "a child")
            tasks.start(child, "another child")
            await anyio.sleep(0.01)
    assert sorted(ended) == ["a child", "another child"]


@pytest.mark.anyio
async def test_runtime_background_task_outlives_the_scope_that_started_it() -> None:
    runtime = current_runtime()
    started = anyio.Event()
    stop = anyio.Event()
    stopped = anyio.Event()

    async def run() -> None:
        started.set()
        try:
            await stop.wait()
        finally:
            stopped.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group():  # a request's scope, say
            handle = runtime.background(run, "a background task")
        await started.wait()
        await anyio.sleep(0.02)
        assert not stopped.is_set()  # the scope that started it is over; it is not
        stop.set()
        await stopped.wait()
    assert handle is not None
