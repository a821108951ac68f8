"""The app the load tests run under uvicorn: one group stream plus debug routes.

Run it from the repo root with
`python -m uvicorn tests.load.app:create_app --factory --loop uvloop --http httptools`.

Routes:

- `GET /events`: an `EventStreamView` of the group `load`. It does not override
  `events()`, so it is the library's own fan-out path (no task but the request's).
- `GET /debug/stats`: JSON with `connects` (calls of `on_connect`), `disconnects`
  (calls of `on_disconnect`: `total` and `by_reason`), `tasks`
  (`len(asyncio.all_tasks())`, this request's task included), `rss` (bytes),
  `blocks` (`sys.getallocatedblocks()`: the memory blocks Python holds), `open` (the
  view's open streams, from `Metrics`), `published` (events published so far),
  `publishing`, `epoch` (of the group) and the view's full `metrics`.
- `POST /debug/publish?n=K&rate=R`: publishes K events, each with data `{"i": seq}`,
  R per second on a fixed schedule, in a background task; 409 while one runs.
- `GET /debug/published`: the ids published so far, in order, and `done`.
- `POST /debug/gc`: `gc.collect()`, then the same JSON as `/debug/stats` plus
  `objects` (how many objects the garbage collector tracks).

Everything lives on the app (`app.state.load`), nothing in module globals, so
two apps can run side by side. With `SSEVIEWS_LOAD_RECORD` set, the lifespan
writes the final counters to that file as JSON when the app shuts down.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import anyio
import psutil
from anyio.abc import TaskGroup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sseviews import Broadcast, DisconnectReason, EventStreamView, Metrics

GROUP = "load"
VIEW_NAME = "LoadStream"
RECORD_ENV = "SSEVIEWS_LOAD_RECORD"
MAX_PUBLISH = 10_000_000
MAX_RATE = 100_000.0


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


class LoadState:
    """What the load app counts and publishes; one per app, on `app.state.load`."""

    def __init__(self, broadcast: Broadcast, metrics: Metrics) -> None:
        self.broadcast = broadcast
        self.metrics = metrics
        self.connects = 0
        self.disconnects: Counter[str] = Counter()
        self.published: list[str] = []
        self.next_i = 0
        self.publishing = False
        self.publish_error: str | None = None
        self.task_group: TaskGroup | None = None
        self.epoch = ""  # the group's epoch, read once the broadcast is connected
        self.process = psutil.Process()

    def stats(self) -> dict[str, Any]:
        view = self.metrics.snapshot().get(VIEW_NAME, {})
        return {
            "connects": self.connects,
            "disconnects": {
                "total": sum(self.disconnects.values()),
                "by_reason": {
                    reason.value: self.disconnects[reason.value] for reason in DisconnectReason
                },
            },
            "tasks": len(asyncio.all_tasks()),
            "rss": self.process.memory_info().rss,
            "blocks": sys.getallocatedblocks(),
            "open": view.get("open", 0),
            "published": len(self.published),
            "publishing": self.publishing,
            "publish_error": self.publish_error,
            "epoch": self.epoch,
            "metrics": view,
        }

    async def publish(self, count: int, rate: float) -> None:
        """Publish `count` events to the group, `rate` per second on a fixed schedule."""
        try:
            start = anyio.current_time()
            for index in range(count):
                # A fixed schedule: a slow publish does not slow the ones after it.
                await anyio.sleep_until(start + index / rate)
                seq = self.next_i
                self.next_i += 1
                self.published.append(await self.broadcast.publish(GROUP, {"i": seq}))
        except Exception as exc:  # reported through /debug/stats; the lifespan must live on
            self.publish_error = f"{type(exc).__name__}: {exc}"
        finally:
            self.publishing = False


def _state(request: Request) -> LoadState:
    state: LoadState = request.app.state.load
    return state


async def stats(request: Request) -> JSONResponse:
    return JSONResponse(_state(request).stats())


async def collect(request: Request) -> JSONResponse:
    gc.collect()
    answer = _state(request).stats()
    answer["objects"] = len(gc.get_objects())
    return JSONResponse(answer)


async def published(request: Request) -> JSONResponse:
    state = _state(request)
    return JSONResponse(
        {"ids": state.published, "done": not state.publishing, "error": state.publish_error}
    )


async def publish(request: Request) -> JSONResponse:
    state = _state(request)
    try:
        count = int(request.query_params.get("n", "1"))
        rate = float(request.query_params.get("rate", "50"))
    except ValueError:
        return JSONResponse({"error": "n must be an int and rate a number"}, status_code=400)
    if not 1 <= count <= MAX_PUBLISH or not 0 < rate <= MAX_RATE:
        return JSONResponse(
            {"error": f"n must be 1..{MAX_PUBLISH} and rate in (0, {MAX_RATE:g}]"},
            status_code=400,
        )
    if state.publishing:
        return JSONResponse({"error": "already publishing"}, status_code=409)
    assert state.task_group is not None, "the lifespan has not started"
    state.publishing = True
    state.task_group.start_soon(state.publish, count, rate)
    return JSONResponse({"first": state.next_i, "n": count, "rate": rate}, status_code=202)


def _write_record(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as file:
        json.dump(data, file)


def create_app() -> Starlette:
    """Build a load app with its own broadcast, metrics and counters."""
    raise_nofile_limit()
    broadcast = Broadcast("memory://")
    metrics = Metrics()
    state = LoadState(broadcast, metrics)

    class LoadStream(EventStreamView):
        """Streams the group; counts its hooks on the app's state."""

        broadcast = state.broadcast
        groups: ClassVar[list[str]] = [GROUP]
        metrics = state.metrics

        async def on_connect(self) -> None:
            _state(self.request).connects += 1

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            _state(self.request).disconnects[reason.value] += 1

    assert LoadStream.__name__ == VIEW_NAME

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with broadcast:
            # The epoch of the stream's group: every id the stream sends carries it.
            state.epoch = (await broadcast.last_id(GROUP))[:8]
            async with anyio.create_task_group() as task_group:
                state.task_group = task_group
                yield
                # Shutdown: the publisher stops before the broadcast closes.
                task_group.cancel_scope.cancel()
            state.task_group = None
        record = os.environ.get(RECORD_ENV)
        if record:
            _write_record(record, state.stats())

    app = Starlette(
        routes=[
            Route("/events", LoadStream),
            Route("/debug/stats", stats),
            Route("/debug/gc", collect, methods=["POST"]),
            Route("/debug/publish", publish, methods=["POST"]),
            Route("/debug/published", published),
        ],
        lifespan=lifespan,
    )
    app.state.load = state
    return app
