"""The same two SSE endpoints written with sse-starlette's ``EventSourceResponse``.

* ``GET /burst?n=N`` -- an async generator yields
  ``ServerSentEvent(data=str(i), sep="\\n")`` for i in 0..N-1 (default
  N = 100000); each becomes ``data: <i>\\n\\n`` on the wire. A
  ``ServerSentEvent`` is sse-starlette's counterpart of sseviews' ``Event``;
  its other idiom, a ``{"data": ...}`` dict, is turned into a
  ``ServerSentEvent`` per event by the response, which costs a little more.
* ``GET /idle`` -- an async generator that waits on an ``asyncio.Queue`` (what a
  publisher would feed, as the raw stream holds one): response head only.

Keep-alive pings are disabled so that no ping bytes (or, with ``ping=0``, no
ping task) distort the comparison: sse-starlette 3.x documents ``ping=0`` as
"disabled, no ping task is started". The interval can be overridden with the
``SSE_STARLETTE_PING`` environment variable (seconds, e.g. ``1e9`` for "a ping
task that never fires"). The separator is set to ``"\\n"`` (sse-starlette's
default is ``"\\r\\n"``; a ``ServerSentEvent`` encodes with its own ``sep``,
so each one is given it too) so that every server puts identical bytes on the
wire.

Run with ``python -m uvicorn benchmarks.apps.sse_starlette_app:app`` from the
repo root.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

DEFAULT_BURST_EVENTS = 100_000
PING_SECONDS = float(os.environ.get("SSE_STARLETTE_PING", "0"))


async def burst(request: Request) -> EventSourceResponse:
    n = int(request.query_params.get("n", str(DEFAULT_BURST_EVENTS)))

    async def events() -> AsyncIterator[ServerSentEvent]:
        for i in range(n):
            yield ServerSentEvent(data=str(i), sep="\n")

    return EventSourceResponse(events(), ping=PING_SECONDS, sep="\n")


async def idle(request: Request) -> EventSourceResponse:
    queue: asyncio.Queue[str] = asyncio.Queue()

    async def events() -> AsyncIterator[str]:
        while True:
            yield await queue.get()

    return EventSourceResponse(events(), ping=PING_SECONDS, sep="\n")


app = Starlette(routes=[Route("/burst", burst), Route("/idle", idle)])
