"""The app the real-server lifecycle tests run under uvicorn.

Every view writes what happens to it (connect, events() started, events()'s
`finally`, `on_disconnect(reason)`) as JSON lines to the file named by
`SSEVIEWS_TEST_RECORD`, so the test process sees it even when uvicorn runs the
app in worker or reloader child processes, and even after the server has exited.
Each stream is tagged with its `?id=` query parameter.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sseviews import DisconnectReason, Event, EventStreamView
from tests.apps.recording import append_record

RECORD_ENV = "SSEVIEWS_TEST_RECORD"


def record(kind: str, **fields: Any) -> None:
    append_record(RECORD_ENV, kind, **fields)


class RecordingView(EventStreamView):
    """Records connect, the start and `finally` of events(), and on_disconnect."""

    ping_interval = None

    @property
    def tag(self) -> str:
        return self.request.query_params.get("id", "")

    async def on_connect(self) -> None:
        record("connect", id=self.tag, method=self.request.method)

    async def on_disconnect(self, reason: DisconnectReason) -> None:
        record("disconnect", id=self.tag, reason=reason.value)


class IdleView(RecordingView):
    """Sends nothing: events() waits forever, so only the lifecycle can end it."""

    async def events(self) -> AsyncIterator[Any]:
        record("events", id=self.tag)
        try:
            await anyio.sleep_forever()
            yield  # pragma: no cover - makes this an async generator
        finally:
            record("finally", id=self.tag)


class TickView(RecordingView):
    """One numbered event every 50 ms."""

    async def events(self) -> AsyncIterator[Any]:
        record("events", id=self.tag)
        try:
            n = 0
            while True:
                yield Event({"n": n}, event="tick", id=str(n))
                n += 1
                await anyio.sleep(0.05)
        finally:
            record("finally", id=self.tag)


class FarewellView(RecordingView):
    """Waits until shutdown starts, then sends a farewell within the grace period."""

    shutdown_grace_period = 1.0

    async def events(self) -> AsyncIterator[Any]:
        record("events", id=self.tag)
        try:
            # sseviews offers a flag, not an event, for the start of the grace period.
            while not self.is_shutting_down:  # noqa: ASYNC110
                await anyio.sleep(0.02)
            # Work that takes a while (saving state, say) is allowed within the grace period.
            await anyio.sleep(0.2)
            record("farewell", id=self.tag)
            yield Event("goodbye", event="farewell")
        finally:
            record("finally", id=self.tag)


BIG = "x" * (256 * 1024)


class FloodView(RecordingView):
    """Yields 256 KiB events as fast as the writer takes them; drops a stalled client."""

    send_timeout = 1.0

    async def events(self) -> AsyncIterator[Any]:
        record("events", id=self.tag)
        try:
            while True:
                yield BIG
        finally:
            record("finally", id=self.tag)


class PingView(IdleView):
    """Idle, with a keep-alive ping after 0.3 s of silence."""

    ping_interval = 0.3


async def stats(request: Request) -> JSONResponse:
    """This process's pid and how many asyncio tasks are alive in it right now."""
    return JSONResponse({"pid": os.getpid(), "tasks": len(asyncio.all_tasks())})


app = Starlette(
    routes=[
        Route("/idle", IdleView),
        Route("/ticks", TickView),
        Route("/farewell", FarewellView),
        Route("/flood", FloodView),
        Route("/ping", PingView),
        Route("/stats", stats),
    ]
)
