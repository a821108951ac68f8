"""The app the ASGI server matrix (`tests/test_server_matrix.py`) runs under every server.

Every view appends what happens to it (connect, events() started, a farewell sent,
on_disconnect with its reason, bytes yielded) as JSON lines to the file named by
`SSEVIEWS_MATRIX_RECORD`, so the test sees it whichever process of the server serves
the stream, and after the server has exited. Each stream is tagged with its `?id=` query parameter.

Two apps, the same routes:

- `app`: the plain Starlette app. Under uvicorn (also as gunicorn's worker) sseviews
  finds the server's shutdown by itself.
- `served`: the recipe for the other servers, `ShutdownMiddleware(app,
  handle_signals=True)`, which triggers the streams' shutdown on SIGTERM and SIGINT
  before the server's own handler runs.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sseviews import DisconnectReason, Event, EventStreamView, ShutdownMiddleware
from tests.apps.recording import append_record

RECORD_ENV = "SSEVIEWS_MATRIX_RECORD"
#: FloodView's pace: one CHUNK every PACE seconds (6.5 MB/s), at most LIMIT bytes in all,
#: so that on a server with no backpressure memory grows at a known, bounded rate.
CHUNK = 64 * 1024
PACE = 0.01
LIMIT = 64 * 1024 * 1024


def record(kind: str, **fields: Any) -> None:
    append_record(RECORD_ENV, kind, **fields)


class RecordingView(EventStreamView):
    """Records connect, the start of events(), and on_disconnect(reason)."""

    @property
    def tag(self) -> str:
        return self.request.query_params.get("id", "")

    async def on_connect(self) -> None:
        record("connect", id=self.tag)

    async def on_disconnect(self, reason: DisconnectReason) -> None:
        record("disconnect", id=self.tag, reason=reason.value)


class IdleView(RecordingView):
    """Sends nothing (default ping_interval, 15 s): only the lifecycle can end it."""

    async def events(self) -> AsyncIterator[Any]:
        record("events", id=self.tag)
        await anyio.sleep_forever()
        yield  # pragma: no cover - makes this an async generator


class PingView(IdleView):
    """Idle, with a keep-alive ping after 0.2 s of silence."""

    ping_interval = 0.2


class FarewellView(RecordingView):
    """Waits for shutdown, then says goodbye within its grace period; its
    on_disconnect takes 0.1 s."""

    shutdown_grace_period = 1.0

    async def events(self) -> AsyncIterator[Any]:
        record("events", id=self.tag)
        # sseviews offers a flag, not an event, for the start of the grace period.
        while not self.is_shutting_down:  # noqa: ASYNC110
            await anyio.sleep(0.02)
        await anyio.sleep(0.2)  # work that takes a while, within the grace period
        record("farewell", id=self.tag)
        yield Event("goodbye", event="farewell")

    async def on_disconnect(self, reason: DisconnectReason) -> None:
        # Teardown that awaits (saving state, say): the server must not exit, nor
        # cancel the request, before it is done.
        await anyio.sleep(0.1)
        await super().on_disconnect(reason)


class FloodView(RecordingView):
    """Yields CHUNK bytes every PACE seconds, up to LIMIT; drops a stalled client."""

    send_timeout = 1.0

    async def events(self) -> AsyncIterator[Any]:
        record("events", id=self.tag)
        data = "x" * (CHUNK - 8)  # the data: and blank lines make up the rest
        sent = 0
        try:
            while sent < LIMIT:
                yield data
                sent += CHUNK
                await anyio.sleep(PACE)
        finally:
            record("yielded", id=self.tag, bytes=sent)


class CompressedView(RecordingView):
    """A compressed stream (any encoding the client accepts): one event, then a
    second one only once the test has read the first (it creates the file
    `<record file>.<id>.go`), then a last one, and a clean end."""

    compress = True
    retry = 700

    async def events(self) -> AsyncIterator[Any]:
        record("events", id=self.tag)
        yield Event({"n": 1, "text": "first " * 20}, id="1")
        gate = anyio.Path(f"{os.environ[RECORD_ENV]}.{self.tag}.go")
        while not await gate.exists():  # noqa: ASYNC110 - a file that another process makes
            await anyio.sleep(0.02)
        yield Event({"n": 2, "text": "second " * 20}, id="2")
        yield Event({"n": 3, "text": "third " * 20}, id="3", event="last")


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid()})


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/idle", IdleView),
        Route("/ping", PingView),
        Route("/farewell", FarewellView),
        Route("/flood", FloodView),
        Route("/compressed", CompressedView),
    ]
)
served = ShutdownMiddleware(app, handle_signals=True)
