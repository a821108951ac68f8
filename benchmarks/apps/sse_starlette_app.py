"""The same two SSE endpoints written with sse-starlette's ``EventSourceResponse``.

* ``GET /burst?n=N`` -- an async generator yields the string ``"x"`` N times
  (default 100000); each becomes ``data: x\\n\\n`` on the wire.
* ``GET /idle`` -- an async generator that waits forever: response head only.

Keep-alive pings are disabled so that no ping bytes (or, with ``ping=0``, no
ping task) distort the comparison: sse-starlette 3.x documents ``ping=0`` as
"disabled, no ping task is started". The interval can be overridden with the
``SSE_STARLETTE_PING`` environment variable (seconds, e.g. ``1e9`` for "a ping
task that never fires"). The separator is set to ``"\\n"`` (sse-starlette's
default is ``"\\r\\n"``) so that all three servers put identical bytes on the
wire.

Run with ``python -m uvicorn benchmarks.apps.sse_starlette_app:app`` from the
repo root.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import anyio
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

DEFAULT_BURST_EVENTS = 100_000
PING_SECONDS = float(os.environ.get("SSE_STARLETTE_PING", "0"))


async def burst(request: Request) -> EventSourceResponse:
    n = int(request.query_params.get("n", str(DEFAULT_BURST_EVENTS)))

    async def events() -> AsyncIterator[str]:
        for _ in range(n):
            yield "x"

    return EventSourceResponse(events(), ping=PING_SECONDS, sep="\n")


async def idle(request: Request) -> EventSourceResponse:
    async def events() -> AsyncIterator[str]:
        await anyio.sleep_forever()
        yield "unreachable"

    return EventSourceResponse(events(), ping=PING_SECONDS, sep="\n")


app = Starlette(routes=[Route("/burst", burst), Route("/idle", idle)])
