"""The app that `tests/test_replay_paging.py` runs under uvicorn to measure a replay's memory.

Configured from the environment:

- `SSEVIEWS_REPLAY_BROADCAST`: the live layer (default `memory://`);
- `SSEVIEWS_REPLAY_HISTORY`: the history, when it is not the live layer's own;
- `SSEVIEWS_REPLAY_PREFIX`: the key, channel and table prefix;
- `SSEVIEWS_REPLAY_PAGE_BYTES`: the broadcast's `replay_page_bytes` (a huge one
  reads a replay whole, as sseviews did before paged reads).

Routes:

- `GET /health`: 200 with the pid and the epoch of the group `big`, once the
  broadcast is connected;
- `POST /fill?count=N&size=S`: publish N events of S bytes of data to the group
  `big`; returns the first and last ids;
- `GET /debug`: the number of subscriptions open in this process;
- `GET /big`: the group `big`, replayed after `Last-Event-ID`, then live.
"""

from __future__ import annotations

import os

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sseviews import Broadcast, EventStreamView
from tests.support.apps import app_for

broadcast = Broadcast(
    os.environ.get("SSEVIEWS_REPLAY_BROADCAST", "memory://"),
    history=os.environ.get("SSEVIEWS_REPLAY_HISTORY") or None,
    prefix=os.environ.get("SSEVIEWS_REPLAY_PREFIX", "sseviews_replay"),
    replay_page_bytes=int(os.environ.get("SSEVIEWS_REPLAY_PAGE_BYTES", 256 * 1024)),
)


class BigView(EventStreamView):
    broadcast = broadcast
    groups = ("big",)
    send_timeout = 60.0  # a client that never reads keeps its stream while it is measured


async def fill(request: Request) -> JSONResponse:
    count = int(request.query_params["count"])
    size = int(request.query_params["size"])
    ids = []
    for number in range(count):
        ids.append(await broadcast.publish("big", f"{number:08d}".ljust(size, "x")))
    return JSONResponse({"first": ids[0], "last": ids[-1]})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), "epoch": (await broadcast.last_id("big"))[:8]})


async def debug(request: Request) -> JSONResponse:
    return JSONResponse({"subscribers": broadcast.subscriber_count})


app = app_for(
    broadcast,
    Route("/health", health),
    Route("/debug", debug),
    Route("/fill", fill, methods=["POST"]),
    Route("/big", BigView),
)
