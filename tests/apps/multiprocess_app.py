"""The app `tests/test_multiprocess.py` runs in several uvicorn processes sharing Redis.

Every process builds its `Broadcast` from the environment, so processes started
with the same `SSEVIEWS_TEST_REDIS_PREFIX` share groups, ids and history:

- `SSEVIEWS_TEST_REDIS_URL`: the Redis (default `redis://127.0.0.1:6379/0`);
- `SSEVIEWS_TEST_REDIS_PREFIX`: the key and channel prefix (required).

Routes:

- `GET /rooms/{room}` streams the group `room:{room}` (no `events()` override, so
  the view streams its group, with `Last-Event-ID` replay); `GET /rooms/x+y`
  streams the groups `room:x` and `room:y`;
- `POST /rooms/{room}` publishes the JSON body to that group and answers
  `{"id": ...}` with the id the broadcast assigned, or 503 `{"error": ...}` when
  Redis cannot take it (a failover in progress);
- `GET /health` answers `{"pid": ...}` once the lifespan has
  connected the broadcast.
"""

from __future__ import annotations

import os

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sseviews import BackendError, Broadcast, EventStreamView
from tests.support.apps import app_for

URL_ENV = "SSEVIEWS_TEST_REDIS_URL"
PREFIX_ENV = "SSEVIEWS_TEST_REDIS_PREFIX"

broadcast = Broadcast(
    os.environ.get(URL_ENV, "redis://127.0.0.1:6379/0"),
    prefix=os.environ[PREFIX_ENV],
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


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid()})


app = app_for(
    broadcast,
    Route("/rooms/{room}", RoomView, methods=["GET", "HEAD"]),
    Route("/rooms/{room}", publish, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
)
