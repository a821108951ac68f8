"""The app that `tests/test_faults.py` and `tests/test_hostile.py` run under uvicorn.

It is configured from the environment, so one module serves every fault:

- `SSEVIEWS_FAULT_BROADCAST`: the live layer of the broadcast (default `memory://`);
  a `redis://` URL for the Redis-loss test;
- `SSEVIEWS_FAULT_HISTORY`: the history, when it is not the live layer's own (a
  `postgresql+asyncpg://` URL for the PostgreSQL-loss test);
- `SSEVIEWS_FAULT_PREFIX`: the broadcast's key, channel and table prefix.

Every stream is tagged with its `?id=` query parameter. What happens to it
(connect, events() started, the last event yielded, events()'s `finally`,
on_disconnect(reason)) is kept in this process's memory and served by
`GET /debug?id=<tag>`, with the open-stream counts, so a test sees inside the
(single-process) server. The `sseviews` logger writes to stderr at INFO, so the
test can read what the library logged about each client.

Routes:

- `GET /health`: 200 once the lifespan has connected the broadcast;
- `GET /debug`: counts (open streams per view, asyncio tasks, subscribers), and
  the records of `?id=` if given;
- `GET /ticks`: one numbered event every 20 ms (the health-check stream);
- `GET /idle`: nothing but a small ping every second;
- `GET /echo`: one event carrying the request's `last_event_id`, then idle;
- `GET /flood`: an 8 KiB event every 5 ms, `send_timeout = 1`;
- `GET /vanish?ping_bytes=N`: idle, an N-byte ping after 0.5 s of silence,
  `send_timeout = 1`;
- `GET /inject?inject_id=...&inject_event=...`: one good event, then an `Event`
  built inside events() with that id and event name (ValueError if they inject);
- `GET /rooms/{room}`: the group `room:{room}` (group name from the path);
- `GET /multi?group=a&group=b`: the groups named in the query string;
- `POST /rooms/{room}`: publish the JSON body to `room:{room}`; 503 when the
  broadcast backend is down (`BackendError`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from sseviews import BackendError, Broadcast, DisconnectReason, Event, EventStreamView, Metrics
from tests.support.apps import app_for

BROADCAST_ENV = "SSEVIEWS_FAULT_BROADCAST"
HISTORY_ENV = "SSEVIEWS_FAULT_HISTORY"
PREFIX_ENV = "SSEVIEWS_FAULT_PREFIX"

# uvicorn configures only its own loggers: give the library's a handler, so what it
# says about each client reaches the log the test reads.
_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("sseviews %(levelname)s %(name)s: %(message)s"))
_library_logger = logging.getLogger("sseviews")
_library_logger.addHandler(_handler)
_library_logger.setLevel(logging.INFO)

broadcast = Broadcast(
    os.environ.get(BROADCAST_ENV, "memory://"),
    history=os.environ.get(HISTORY_ENV) or None,
    prefix=os.environ.get(PREFIX_ENV, "sseviews_hostile"),
)
metrics = Metrics()
# tag -> what happened to the streams with that tag, in order.
records: dict[str, list[dict[str, Any]]] = defaultdict(list)
connects = 0
disconnects: dict[str, int] = defaultdict(int)


def record(tag: str, kind: str, **fields: Any) -> None:
    records[tag].append({"kind": kind, "t": time.time(), **fields})


class RecordingView(EventStreamView):
    """Records connect, the start and `finally` of events(), and on_disconnect."""

    metrics = metrics
    ping_interval: ClassVar[float | None] = None

    @property
    def tag(self) -> str:
        return self.request.query_params.get("id", "")

    async def on_connect(self) -> None:
        global connects
        connects += 1
        record(self.tag, "connect")

    async def on_disconnect(self, reason: DisconnectReason) -> None:
        disconnects[reason.value] += 1
        record(self.tag, "disconnect", reason=reason.value)


class TickView(RecordingView):
    """One numbered event every 20 ms."""

    async def events(self) -> AsyncIterator[Any]:
        n = 0
        while True:
            yield Event({"n": n}, event="tick", id=str(n))
            n += 1
            await anyio.sleep(0.02)


class IdleView(RecordingView):
    """Sends nothing but a keep-alive ping every second."""

    ping_interval = 1.0

    async def events(self) -> AsyncIterator[Any]:
        record(self.tag, "events")
        try:
            await anyio.sleep_forever()
            yield  # pragma: no cover - makes this an async generator
        finally:
            record(self.tag, "finally")


class EchoView(IdleView):
    """Sends the Last-Event-ID it was given (header or query), then idles."""

    async def events(self) -> AsyncIterator[Any]:
        yield Event({"last_event_id": self.last_event_id}, event="echo")
        await anyio.sleep_forever()


CHUNK = "x" * (8 * 1024)


class FloodView(RecordingView):
    """An 8 KiB event every 5 ms; a client that stops reading is dropped after 1 s."""

    send_timeout = 1.0

    async def events(self) -> AsyncIterator[Any]:
        record(self.tag, "events")
        last_yield = time.time()
        sent = 0
        try:
            while True:
                yield CHUNK
                # Once the socket is full the writer blocks, the buffer reaches its
                # high-water mark and this yield waits: the last one marks the stall.
                last_yield = time.time()
                sent += 1
                await anyio.sleep(0.005)
        finally:
            record(self.tag, "finally", last_yield=last_yield, sent=sent)


class VanishView(IdleView):
    """Idle, with a ping after 0.5 s of silence and `send_timeout = 1`.

    The ping is `?ping_bytes=` long (default 64 KiB): a ping write blocks only once
    the socket's buffers are full, so the test sizes it to fill them.
    """

    ping_interval = 0.5
    send_timeout = 1.0

    def ping_message(self) -> Event:
        record(self.tag, "ping")
        ping: Event | None = getattr(self, "_ping", None)
        if ping is None:
            size = int(self.request.query_params.get("ping_bytes", 64 * 1024))
            ping = self._ping = Event(comment="p" * size)
        return ping


class InjectView(RecordingView):
    """One good event, then an Event whose id and/or event name are taken from the
    `inject_id` and `inject_event` query parameters: a ValueError inside events()
    when they hold CR, LF or (ids) NUL."""

    async def events(self) -> AsyncIterator[Any]:
        yield Event("before", event="good", id="0")
        query = self.request.query_params
        yield Event("after", id=query.get("inject_id"), event=query.get("inject_event"))


class RoomView(RecordingView):
    """The group `room:{room}` from the path: replay after Last-Event-ID, then live."""

    broadcast = broadcast
    retry = 100

    def groups(self) -> list[str]:
        return [f"room:{self.request.path_params['room']}"]


class MultiView(RecordingView):
    """The groups named by the `group` query parameters (max_groups: the default 64)."""

    broadcast = broadcast
    retry = 100

    def groups(self) -> list[str]:
        return self.request.query_params.getlist("group")


VIEWS: list[type[RecordingView]] = [
    TickView,
    IdleView,
    EchoView,
    FloodView,
    VanishView,
    InjectView,
    RoomView,
    MultiView,
]


async def publish(request: Request) -> Response:
    data = await request.json()
    try:
        event_id = await broadcast.publish(f"room:{request.path_params['room']}", data)
    except BackendError as exc:
        return PlainTextResponse(f"broadcast unavailable: {exc}", status_code=503)
    return JSONResponse({"id": event_id})


async def health(request: Request) -> JSONResponse:
    # The epoch of the group of /rooms/lobby.
    return JSONResponse({"pid": os.getpid(), "epoch": (await broadcast.last_id("room:lobby"))[:8]})


async def debug(request: Request) -> JSONResponse:
    tag = request.query_params.get("id")
    snapshot = metrics.snapshot()
    return JSONResponse(
        {
            "pid": os.getpid(),
            "tasks": len(asyncio.all_tasks()),
            "connects": connects,
            "disconnects": dict(disconnects),
            "open_streams": sum(view._open_streams for view in VIEWS),
            "open_by_view": {view.__name__: view._open_streams for view in VIEWS},
            "metrics_open": sum(counters["open"] for counters in snapshot.values()),
            "subscribers": broadcast.subscriber_count,
            "records": records.get(tag, []) if tag is not None else None,
        }
    )


app = app_for(
    broadcast,
    Route("/health", health),
    Route("/debug", debug),
    Route("/ticks", TickView),
    Route("/idle", IdleView),
    Route("/echo", EchoView),
    Route("/flood", FloodView),
    Route("/vanish", VanishView),
    Route("/inject", InjectView),
    Route("/rooms/{room}", RoomView, methods=["GET", "HEAD"]),
    Route("/rooms/{room}", publish, methods=["POST"]),
    Route("/multi", MultiView),
)
