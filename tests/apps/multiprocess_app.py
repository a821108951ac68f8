"""The app `tests/test_multiprocess.py` runs in several uvicorn processes sharing Redis.

Every process builds its `Broadcast` from the environment, so processes started
with the same `SSEVIEWS_TEST_REDIS_PREFIX` share groups, ids and history:

- `SSEVIEWS_TEST_REDIS_URL`: the Redis (default `redis://127.0.0.1:6379/0`);
- `SSEVIEWS_TEST_REDIS_PREFIX`: the key and channel prefix (required);
- `SSEVIEWS_TEST_HISTORY`: a history the processes share instead of Redis's fused
  one: a SQLite file or PostgreSQL (`SSEVIEWS_TEST_TABLE_PREFIX` its table prefix),
  or a Redis URL (a Redis history given apart, whose appends deliver separately).

Routes:

- `GET /rooms/{room}` streams the group `room:{room}` (no `events()` override, so
  the view streams its group, with `Last-Event-ID` replay); `GET /rooms/x+y`
  streams the groups `room:x` and `room:y`;
- `POST /rooms/{room}` publishes the JSON body to that group and answers
  `{"id": ...}` with the id the broadcast assigned, or 503 `{"error": ...}` when
  Redis cannot take it (a failover in progress);
- `POST /burst/{room}` publishes `count` events (`{"tag": ..., "n": ...}`) from
  `tasks` concurrent tasks of this process and answers `{"ids": [...]}`;
- `GET /health` answers `{"pid": ...}` once the lifespan has
  connected the broadcast.
"""

from __future__ import annotations

import os

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sseviews import BackendError, Broadcast, EventStreamView
from sseviews.stores.base import HistoryStore
from tests.support.apps import app_for

URL_ENV = "SSEVIEWS_TEST_REDIS_URL"
PREFIX_ENV = "SSEVIEWS_TEST_REDIS_PREFIX"
HISTORY_ENV = "SSEVIEWS_TEST_HISTORY"
TABLE_PREFIX_ENV = "SSEVIEWS_TEST_TABLE_PREFIX"


def _history() -> HistoryStore | str | None:
    url = os.environ.get(HISTORY_ENV)
    if not url:
        return None
    if url.startswith("redis"):
        # A Redis history named apart from the live layer: not fused with it, so
        # delivery is a second step after the id is taken.
        return url
    from sseviews.stores.sqlalchemy import SQLAlchemyStore

    # Enough for a client resuming from the first event of a test.
    table_prefix = os.environ.get(TABLE_PREFIX_ENV, "sseviews")
    return SQLAlchemyStore(url, table_prefix=table_prefix, retention=100_000)


broadcast = Broadcast(
    os.environ.get(URL_ENV, "redis://127.0.0.1:6379/0"),
    prefix=os.environ[PREFIX_ENV],
    history=_history(),
)


def room_group(room: str) -> str:
    return f"room:{room}"


class RoomView(EventStreamView):
    """Streams the rooms' groups: replay after `Last-Event-ID`, then live."""

    broadcast = broadcast
    retry = 100
    ping_interval = 5.0

    def groups(self) -> list[str]:
        return [room_group(room) for room in self.request.path_params["room"].split("+")]


async def publish(request: Request) -> JSONResponse:
    data = await request.json()
    try:
        event_id = await broadcast.publish(room_group(request.path_params["room"]), data)
    except BackendError as exc:
        return JSONResponse({"error": str(exc)}, status_code=503)
    return JSONResponse({"id": event_id})


async def burst(request: Request) -> JSONResponse:
    body = await request.json()
    group = room_group(request.path_params["room"])
    numbers = iter(range(body["count"]))
    ids: list[str] = []

    async def publisher() -> None:
        for n in numbers:
            ids.append(await broadcast.publish(group, {"tag": body["tag"], "n": n}))

    async with anyio.create_task_group() as tasks:
        for _ in range(body["tasks"]):
            tasks.start_soon(publisher)
    return JSONResponse({"ids": ids})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid()})


app = app_for(
    broadcast,
    Route("/rooms/{room}", RoomView, methods=["GET", "HEAD"]),
    Route("/rooms/{room}", publish, methods=["POST"]),
    Route("/burst/{room}", burst, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
)
