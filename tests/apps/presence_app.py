"""The app `tests/test_presence_redis.py` runs in several uvicorn processes sharing Redis
(and `tests/test_presence_postgres.py`, with a PostgreSQL URL in the same variable).

Like `multiprocess_app.py`, every process builds its `Broadcast` from the
environment (`SSEVIEWS_TEST_REDIS_URL`, `SSEVIEWS_TEST_REDIS_PREFIX`), and
`SSEVIEWS_TEST_PRESENCE_TIMEOUT` sets the presence timeout (default 30 s).

Routes:

- `GET /rooms/{room}?user=NAME` streams the group `room:{room}`; with `user` the
  stream is present as `{"user": NAME}`, and join/leave are announced;
- `POST /rooms/{room}` publishes the JSON body and answers `{"id": ...}`;
- `GET /presence/{room}` answers `{"count": n, "members": [entry, ...]}`;
- `GET /health` answers `{"pid": ...}` once the broadcast is connected.
"""

from __future__ import annotations

import os
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sseviews import Broadcast, EventStreamView
from sseviews.backends.postgres import PostgresBackend
from sseviews.backends.redis import RedisBackend
from tests.support.apps import app_for

broadcast = Broadcast(
    os.environ.get("SSEVIEWS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
    prefix=os.environ["SSEVIEWS_TEST_REDIS_PREFIX"],
)
assert isinstance(broadcast.live, RedisBackend | PostgresBackend)
broadcast.live.presence_timeout = float(os.environ.get("SSEVIEWS_TEST_PRESENCE_TIMEOUT", "30"))


class RoomView(EventStreamView):
    """Streams one room; present in it as `?user=`."""

    broadcast = broadcast
    announce_presence = True
    retry = 100
    ping_interval = 5.0

    def groups(self) -> list[str]:
        return [f"room:{self.request.path_params['room']}"]

    def presence_info(self) -> dict[str, Any] | None:
        user = self.request.query_params.get("user")
        return {"user": user, "pid": os.getpid()} if user else None


async def publish(request: Request) -> JSONResponse:
    event_id = await broadcast.publish(f"room:{request.path_params['room']}", await request.json())
    return JSONResponse({"id": event_id})


async def presence(request: Request) -> JSONResponse:
    group = f"room:{request.path_params['room']}"
    members = [entry.as_dict() for entry in await broadcast.presence(group)]
    return JSONResponse({"count": await broadcast.presence_count(group), "members": members})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid()})


app = app_for(
    broadcast,
    Route("/rooms/{room}", RoomView, methods=["GET", "HEAD"]),
    Route("/rooms/{room}", publish, methods=["POST"]),
    Route("/presence/{room}", presence, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
)
