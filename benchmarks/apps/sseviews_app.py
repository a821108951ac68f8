"""The same two SSE endpoints written as sseviews ``EventStreamView`` classes.

* ``GET /burst?n=N`` -- ``events()`` yields ``Event(data=str(i))`` for i in
  0..N-1 (default N = 100000); each becomes ``data: <i>\\n\\n`` on the wire.
* ``GET /idle`` -- a view that streams the group ``idle`` of a memory
  ``Broadcast``: the stream a publisher can reach, as the raw stream holds a
  queue and sse-starlette's waits on one. Nothing is published, so it sends the
  response head only.

Pings and send timeouts are switched off, as in the other apps.

Run with ``python -m uvicorn benchmarks.apps.sseviews_app:app`` from the repo
root.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.routing import Route

from sseviews import Broadcast, Event, EventStreamView

DEFAULT_BURST_EVENTS = 100_000


class Burst(EventStreamView):
    ping_interval = None
    send_timeout = None

    async def events(self) -> AsyncIterator[Event]:
        n = int(self.request.query_params.get("n", str(DEFAULT_BURST_EVENTS)))
        for i in range(n):
            yield Event(data=str(i))


broadcast = Broadcast("memory://")


class Idle(EventStreamView):
    ping_interval = None
    send_timeout = None
    broadcast = broadcast
    groups = ("idle",)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with broadcast:
        yield


app = Starlette(
    routes=[
        Route("/burst", Burst),
        Route("/idle", Idle),
    ],
    lifespan=lifespan,
)
