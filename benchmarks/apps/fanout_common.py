"""Shared pieces of the fan-out benchmark apps (see ``benchmarks/bench_fanout.py``).

Every fan-out app serves the same routes:

* ``GET /events`` -- an SSE stream of the ``bench`` group. The subscriber is
  registered *before* the response head is sent, so a client that has its head
  is guaranteed to receive the next event published.
* ``GET /start?n=20&interval=0.02`` -- starts one background task that
  publishes ``n`` events ``interval`` seconds apart (on a fixed schedule) and
  answers at once. Each event's data is ``{"t": <time.time() at publish>,
  "i": <index>}``, JSON-encoded once per event, so the client can compute the
  publish-to-client latency of every delivery.
* ``GET /stats`` -- JSON: subscribers registered in this process, whether a
  publisher task is running, the wall-clock time (``time.time()``) at which
  the last publishing schedule started (event ``i`` is due ``i * interval``
  later), and the garbage collector's activity
  (collections, total and longest pause, per generation) since the last
  ``?reset=1``; ``?objects=1`` adds the number of GC-tracked objects.

:func:`start_publishing` and :func:`stats` are the bodies of ``/start`` and
``/stats``; :func:`control_routes` serves both for the Starlette-based apps.
The sseviews app adds the replay routes (see ``fanout_sseviews.py``).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.routing import Route

GROUP = "bench"
DEFAULT_EVENTS = 20
DEFAULT_INTERVAL = 0.02
MAX_EVENTS = 1_000_000
_SEPARATORS = (",", ":")


def dumps(value: Any) -> str:
    """Compact JSON, the same bytes sseviews produces for a dict."""
    return json.dumps(value, separators=_SEPARATORS)


def payload(index: int) -> dict[str, Any]:
    """The data of event ``index``, stamped with the publish time (wall clock)."""
    return {"t": time.time(), "i": index}


def start_params(query: dict[str, list[str]]) -> tuple[int, float]:
    """``n`` and ``interval`` of a ``/start`` request (ValueError when invalid)."""
    n = int(query.get("n", [str(DEFAULT_EVENTS)])[0])
    interval = float(query.get("interval", [str(DEFAULT_INTERVAL)])[0])
    if not 1 <= n <= MAX_EVENTS or not 0 <= interval <= 10:
        raise ValueError("n must be 1..1000000 and interval 0..10 s")
    return n, interval


async def publish_paced(
    n: int,
    interval: float,
    publish_one: Callable[[int], Awaitable[Any]],
    on_start: Callable[[float], None] | None = None,
) -> None:
    """Call ``publish_one(i)`` for i in 0..n-1, at ``start + i * interval``.

    The schedule is fixed: a publish that runs late (the loop was busy fanning
    out the previous event) does not push the later ones back. ``on_start``
    gets ``start``, so a client can measure from the schedule as well as from
    the publish call. The schedule is kept in ``time.time()``, the clock of the
    events' stamps and of the client's arrival times, so all three compare
    directly (uvloop's ``loop.time()`` is a cached, millisecond clock).
    """
    start = time.time()
    if on_start is not None:
        on_start(start)
    for index in range(n):
        if index:
            delay = start + index * interval - time.time()
            # A late publish still yields to the loop first, as any real publisher
            # (a request handler, a Redis reader) does between two events.
            await asyncio.sleep(max(delay, 0.0))
        await publish_one(index)


class Publisher:
    """Runs at most one paced publishing task at a time (kept referenced)."""

    def __init__(self, publish_one: Callable[[int], Awaitable[Any]]) -> None:
        self._publish_one = publish_one
        self._task: asyncio.Task[None] | None = None
        self.error: str | None = None
        self.schedule_start: float | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, n: int, interval: float) -> bool:
        """Start publishing; False if a previous run is still going."""
        if self.running:
            return False
        self.error = None
        self.schedule_start = None
        self._task = asyncio.get_running_loop().create_task(
            publish_paced(n, interval, self._publish_one, self._started)
        )
        self._task.add_done_callback(self._done)
        return True

    def _started(self, wall_time: float) -> None:
        self.schedule_start = wall_time

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.error = repr(task.exception())


class GCMonitor:
    """Counts the collector's passes and times its pauses, per generation."""

    def __init__(self) -> None:
        self._started = 0.0
        self.reset()
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.collections = [0, 0, 0]
        self.pause_total = [0.0, 0.0, 0.0]
        self.pause_max = [0.0, 0.0, 0.0]

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = info["generation"]
        self.collections[generation] += 1
        self.pause_total[generation] += pause
        if pause > self.pause_max[generation]:
            self.pause_max[generation] = pause

    def snapshot(self) -> dict[str, Any]:
        return {
            "collections": list(self.collections),
            "pause_total_ms": [round(p * 1e3, 3) for p in self.pause_total],
            "pause_max_ms": [round(p * 1e3, 3) for p in self.pause_max],
        }


GC = GCMonitor()


def stats(subscribers: int, publisher: Publisher, query: dict[str, list[str]]) -> dict[str, Any]:
    """The body of ``/stats``; ``?reset=1`` zeroes the GC counters afterwards."""
    body: dict[str, Any] = {
        "pid": os.getpid(),
        "subscribers": subscribers,
        "publishing": publisher.running,
        "publish_error": publisher.error,
        "schedule_start": publisher.schedule_start,
        "gc": GC.snapshot(),
    }
    if query.get("objects") == ["1"]:
        body["gc_tracked_objects"] = len(gc.get_objects())
    if query.get("reset") == ["1"]:
        GC.reset()
    return body


def start_publishing(
    publisher: Publisher, subscribers: int, query: dict[str, list[str]]
) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of ``/start``: 400 on bad parameters, 409 if busy."""
    try:
        n, interval = start_params(query)
    except ValueError as exc:
        return 400, {"error": str(exc)}
    if not publisher.start(n, interval):
        return 409, {"error": "already publishing"}
    return 200, {"started": True, "subscribers": subscribers}


def control_routes(publisher: Publisher, subscriber_count: Callable[[], int]) -> list[Route]:
    """The Starlette routes ``/start`` and ``/stats``.

    Starlette is imported here, not at the top, so that the raw app, which
    shares this module, does not load it.
    """
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def _query(request: Request) -> dict[str, list[str]]:
        return {key: request.query_params.getlist(key) for key in request.query_params}

    async def start(request: Request) -> JSONResponse:
        status, body = start_publishing(publisher, subscriber_count(), _query(request))
        return JSONResponse(body, status_code=status)

    async def stats_route(request: Request) -> JSONResponse:
        return JSONResponse(stats(subscriber_count(), publisher, _query(request)))

    return [Route("/start", start), Route("/stats", stats_route)]
