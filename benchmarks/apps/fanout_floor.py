"""Fan-out floor through Starlette: ``fanout_raw``'s own functions, routed by a ``Starlette`` app.

The fan-out counterpart of ``starlette_floor_app``: ``fanout_raw.events`` (the
hand-written :func:`benchmarks.apps.common.queue_stream` of a queue in
``fanout_raw``'s registry), ``fanout_raw.start_route`` and
``fanout_raw.stats_route``, each wrapped in a bare endpoint class
(:class:`benchmarks.apps.common.Endpoint`) and served by
``Starlette(routes=[Route(...)])``; the publisher, the registry and the bytes
on the wire are ``fanout_raw``'s. No SSE code runs.

Whatever this app costs over ``fanout_raw`` is Starlette's: the app, the router,
and above all, per delivery, the ``send`` wrappers of ``ServerErrorMiddleware``
and ``ExceptionMiddleware`` that every message of a Starlette-routed stream
passes through, whatever its SSE library.

Routes: see ``fanout_common.py`` (``/events``, ``/start``, ``/stats``).

Run with ``python -m uvicorn benchmarks.apps.fanout_floor:app`` from the repo
root.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import Route

from benchmarks.apps import fanout_raw
from benchmarks.apps.common import Endpoint


class Events(Endpoint):
    handler = staticmethod(fanout_raw.events)


class Start(Endpoint):
    handler = staticmethod(fanout_raw.start_route)


class Stats(Endpoint):
    handler = staticmethod(fanout_raw.stats_route)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    fanout_raw.end_streams()  # at shutdown, as fanout_raw's own app does


app = Starlette(
    routes=[Route("/events", Events), Route("/start", Start), Route("/stats", Stats)],
    lifespan=lifespan,
)
