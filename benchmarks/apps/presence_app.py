"""The app of ``benchmarks/bench_presence.py``: idle group streams, with or without presence.

* ``GET /room?user=NAME`` -- a view streaming the group ``room``; with ``user`` the
  stream is present as ``{"user": NAME}`` (``presence_info()``), without it the
  hook returns None and nothing is tracked. Nothing is published.
* ``GET /presence-time?limit=N`` -- answers the seconds one
  ``broadcast.presence("room", limit=N)`` and one ``presence_count("room")`` took
  (median of 5 calls each), and how many entries the list held.

The broadcast comes from ``BENCH_BROADCAST`` (default ``memory://``) with the key
prefix ``BENCH_PREFIX``. Pings and send timeouts are off, as in the other apps.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sseviews import Broadcast, EventStreamView

broadcast = Broadcast(
    os.environ.get("BENCH_BROADCAST", "memory://"),
    prefix=os.environ.get("BENCH_PREFIX", "sseviews-bench"),
)


class Room(EventStreamView):
    broadcast = broadcast
    groups = ("room",)
    ping_interval = None
    send_timeout = None

    def presence_info(self) -> dict[str, Any] | None:
        user = self.request.query_params.get("user")
        return {"user": user} if user else None


async def presence_time(request: Request) -> JSONResponse:
    limit = int(request.query_params.get("limit", "1000"))
    list_times, count_times = [], []
    entries = 0
    for _ in range(5):
        started = time.perf_counter()
        entries = len(await broadcast.presence("room", limit=limit))
        list_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        await broadcast.presence_count("room")
        count_times.append(time.perf_counter() - started)
    return JSONResponse(
        {
            "list_seconds": statistics.median(list_times),
            "count_seconds": statistics.median(count_times),
            "entries": entries,
        }
    )


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with broadcast:
        yield


app = Starlette(
    routes=[Route("/room", Room), Route("/presence-time", presence_time)],
    lifespan=lifespan,
)
