"""What a stream leaves behind (no task), and how it writes (one send at a time)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from support.views import KIB, SendRecorder, end_as

from sseviews import EventStreamView
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio


# -- resources ---------------------------------------------------------------------------


async def wait_for_task_count(count: int) -> None:
    with anyio.fail_after(2):
        while len(asyncio.all_tasks()) != count:  # noqa: ASYNC110 - nothing to wait on
            await anyio.sleep(0.01)


@pytest.mark.asyncio_only
@pytest.mark.parametrize("ending", ["client_closed", "shutdown", "completed", "error"])
async def test_view_no_task_leak(ending: str) -> None:
    proceed = anyio.Event()

    class Ticker(EventStreamView):
        ping_interval = 0.05

        async def events(self) -> AsyncIterator[Any]:
            yield "x"
            await proceed.wait()
            await end_as(ending)

    async with EventStreamClient(Ticker) as client:
        before = len(asyncio.all_tasks())
        async with client.stream("/") as stream:
            await stream.next_event(timeout=2)
            during = len(asyncio.all_tasks())
            proceed.set()
            if ending == "shutdown":
                await client.shutdown()
            if ending in ("completed", "error"):
                await stream.wait_ended()
        await wait_for_task_count(before)
        # The request task, its writer and its listener: nothing else per connection.
        assert during - before <= 3
        assert len(asyncio.all_tasks()) == before


async def test_view_single_writer_never_overlaps_sends() -> None:
    class Busy(EventStreamView):
        ping_interval = 0.01

        async def events(self) -> AsyncIterator[Any]:
            for i in range(300):
                yield KIB if i % 3 == 0 else i
                if i % 10 == 0:
                    await anyio.sleep(0.012)

    app = SendRecorder(Busy)
    async with EventStreamClient(app) as client, client.stream("/") as stream:
        for _ in range(4):
            stream.pause()
            await anyio.sleep(0.03)
            stream.resume()
            await anyio.sleep(0.01)
        await stream.wait_ended()
        count = len([e async for e in stream])
    assert count == 300
    assert app.max_in_flight == 1
    assert app.final_chunk_sent


async def test_view_is_an_asgi_app_in_a_route() -> None:
    class Room(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield {"room": self.request.path_params["room"]}

    app = Starlette(routes=[Route("/rooms/{room}", Room)])
    async with EventStreamClient(app) as client, client.stream("/rooms/lobby") as stream:
        assert (await stream.next_event(timeout=2)).json() == {"room": "lobby"}
