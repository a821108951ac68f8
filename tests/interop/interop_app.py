"""The app every interoperability test serves to third-party SSE clients, under uvicorn.

Configured from the environment: `SSEVIEWS_INTEROP_HISTORY`, the SQLite file of the
broadcast's history (so a restarted server resumes the same ids).

Routes:

- `GET /health`: 200 once the broadcast is connected;
- `GET /parse`: a fixed set of events (multi-line data, unicode, `id`, `event`,
  `retry`), then an `end` event, then silence;
- `GET /pings`: an event with an id, then a keep-alive ping every 0.05 s for
  0.6 s, then an `end` event, then silence;
- `GET /stats`: the app's `Metrics` snapshot (pings sent, per view);
- `GET /refuse/{status}`: refused by `on_connect()` with 401, 403 or 204;
- `GET /room`: the group `room`, replayed after `Last-Event-ID`, then live; its
  streams tell clients to reconnect after 250 ms;
- `POST /publish?start=S&count=N`: publish `m<S>` ... `m<S+N-1>` to `room`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sseviews import Broadcast, Event, EventStreamView, Metrics

# What /parse sends, as (data, event, id, retry); the tests import it to compare.
PARSE_EVENTS: list[tuple[str, str | None, str, int | None]] = [
    ("line one\nline two\n\nline four", None, "p1", None),
    ("héllo wörld ✓ 日本語 🎉 \u2028 tab\tend", "greeting", "p2", None),
    ('{"n":3,"text":"ünïcode"}', "json", "p3", 2500),
    ("  two leading spaces, one kept: data: and : inside", None, "p4", None),
    ("cr\rand crlf\r\nend", "greeting", "p5", None),
    ("bye", "end", "p6", None),
]
PING_INTERVAL = 0.05
PING_SECONDS = 0.6
ROOM_RETRY_MS = 250

metrics = Metrics()
broadcast = Broadcast(
    "memory://",
    history=f"sqlite+aiosqlite:///{os.environ.get('SSEVIEWS_INTEROP_HISTORY', 'interop.db')}",
    prefix="interop",
)


class ParseView(EventStreamView):
    async def events(self) -> AsyncIterator[Any]:
        for data, name, id, retry in PARSE_EVENTS:
            yield Event(data, event=name, id=id, retry=retry)
        await anyio.sleep_forever()


class PingView(EventStreamView):
    ping_interval = PING_INTERVAL
    metrics = metrics

    async def events(self) -> AsyncIterator[Any]:
        yield Event("first", id="a1")
        await anyio.sleep(PING_SECONDS)
        yield Event("last", event="end", id="a2")
        await anyio.sleep_forever()


class RefuseView(EventStreamView):
    async def on_connect(self) -> Response | None:
        status = int(self.request.path_params["status"])
        if status == 204:
            return Response(status_code=204)
        raise HTTPException(status, "refused by the interop app")

    async def events(self) -> AsyncIterator[Any]:
        yield "never sent"  # pragma: no cover


class RoomView(EventStreamView):
    broadcast = broadcast
    groups = ("room",)
    retry = ROOM_RETRY_MS


async def publish(request: Request) -> JSONResponse:
    start = int(request.query_params["start"])
    count = int(request.query_params["count"])
    ids = [await broadcast.publish("room", f"m{n}") for n in range(start, start + count)]
    return JSONResponse(ids)


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), "last_id": await broadcast.last_id("room")})


async def stats(request: Request) -> JSONResponse:
    return JSONResponse(metrics.snapshot())


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with broadcast:
        yield


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/stats", stats),
        Route("/parse", ParseView),
        Route("/pings", PingView),
        Route("/refuse/{status:int}", RefuseView),
        Route("/room", RoomView),
        Route("/publish", publish, methods=["POST"]),
    ],
    lifespan=lifespan,
)
