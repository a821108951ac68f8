"""An sseviews view that streams a broadcast group (no events() of its own).

``GET /idle``: an idle group stream, the shape of most real SSE connections.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import Route

from sseviews import Broadcast, EventStreamView

broadcast = Broadcast("memory://")


class Idle(EventStreamView):
    ping_interval = None
    send_timeout = None
    broadcast = broadcast
    groups = ("idle",)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with broadcast:
        yield


app = Starlette(routes=[Route("/idle", Idle)], lifespan=lifespan)
