"""Fan-out with sseviews: a ``Broadcast`` and a view that streams its group.

``/events`` is an ``EventStreamView`` with ``broadcast = bc`` and
``groups = ["bench"]`` that does not override ``events()``, so it streams the
group's events as the library does by default. ``/start`` publishes with
``await bc.publish("bench", {"t": ..., "i": n})``: sseviews encodes each event
once and hands the same bytes to every subscriber. Pings and send timeouts are
off, as in ``benchmarks/apps/sseviews_app.py``; the buffer bounds keep their
defaults.

Environment:

* ``FANOUT_BROADCAST_URL`` -- ``memory://`` (default) or
  ``redis://127.0.0.1:6379/0``: with Redis, several processes share the group.
* ``FANOUT_PREFIX`` -- the Redis key/channel prefix (default ``sseviews-bench``).
* ``FANOUT_RETENTION`` -- events kept per group (default: the library's 1000).
* ``FANOUT_COMPRESS`` -- an encoding (``gzip``, ``br``, ``zstd``): ``/events`` is
  then compressed for a client that accepts it (``benchmarks/bench_compression.py``).
* ``FANOUT_PING`` -- the ping interval of ``/events`` in seconds (default: none).

Replay routes (for the replay-rate case):

* ``GET /replay-events`` -- a view of the ``replay`` group whose live buffer
  bound is raised to 100k events / 64 MiB, so a connected client can take a
  burst published as fast as possible. Send ``Last-Event-ID`` to resume.
* ``GET /publish-burst?n=N`` -- publishes N events to ``replay`` as fast as
  ``publish`` allows, in this request, then answers JSON with the first and last
  ids, and the seconds it took.

``GET /trim`` returns the heap's free pages to the system (glibc's
``malloc_trim``), so that RSS read after it shows the memory still held, not
memory freed earlier and kept by the allocator (the compression benchmark's
RSS case).

Routes shared with the other fan-out apps: see ``fanout_common.py``.

Run with ``python -m uvicorn benchmarks.apps.fanout_sseviews:app`` from the repo
root.
"""

from __future__ import annotations

import ctypes
import gc
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import ClassVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from benchmarks.apps.fanout_common import GROUP, Publisher, control_routes, payload
from sseviews import Broadcast, EventStreamView

REPLAY_GROUP = "replay"
MAX_BURST = 1_000_000

_retention = os.environ.get("FANOUT_RETENTION")
bc = Broadcast(
    os.environ.get("FANOUT_BROADCAST_URL", "memory://"),
    prefix=os.environ.get("FANOUT_PREFIX", "sseviews-bench"),
    **({"retention": int(_retention)} if _retention else {}),
)


_compress = os.environ.get("FANOUT_COMPRESS")
_ping = os.environ.get("FANOUT_PING")


class Subscribe(EventStreamView):
    broadcast = bc
    groups: ClassVar[list[str]] = [GROUP]
    ping_interval = float(_ping) if _ping else None
    send_timeout = None
    compress = (_compress,) if _compress else False


class ReplaySubscribe(EventStreamView):
    broadcast = bc
    groups: ClassVar[list[str]] = [REPLAY_GROUP]
    ping_interval = None
    send_timeout = None
    max_buffer_events = 100_000
    max_buffer_bytes = 64 * 1024 * 1024


async def publish_one(index: int) -> None:
    await bc.publish(GROUP, payload(index))


publisher = Publisher(publish_one)


async def publish_burst(request: Request) -> JSONResponse:
    try:
        n = int(request.query_params.get("n", "10000"))
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_BURST:
        return JSONResponse({"error": f"n must be 1..{MAX_BURST}"}, status_code=400)
    started = time.perf_counter()
    first = last = await bc.publish(REPLAY_GROUP, payload(0))
    for index in range(1, n):
        last = await bc.publish(REPLAY_GROUP, payload(index))
    seconds = time.perf_counter() - started
    return JSONResponse({"n": n, "first_id": first, "last_id": last, "seconds": seconds})


async def trim(request: Request) -> JSONResponse:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return JSONResponse({"trimmed": False})
    gc.collect()
    return JSONResponse({"trimmed": bool(libc.malloc_trim(0))})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with bc:
        yield


app = Starlette(
    routes=[
        Route("/events", Subscribe),
        *control_routes(publisher, lambda: bc.subscriber_count),
        Route("/replay-events", ReplaySubscribe),
        Route("/publish-burst", publish_burst),
        Route("/trim", trim),
    ],
    lifespan=lifespan,
)
