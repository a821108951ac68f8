"""The floor for any endpoint routed through a Starlette app: no SSE library at all.

``raw_app``'s own two endpoint functions, each wrapped in a bare ASGI endpoint
class (:class:`benchmarks.apps.common.Endpoint`: the shape Starlette's
``HTTPEndpoint`` and sseviews' ``EventStreamView`` have) and served by
``Starlette(routes=[Route(...)])``. Whatever this app costs over ``raw_app`` is
what Starlette's app, middleware and router cost, before any SSE framework code
runs: the least a Starlette-routed SSE view can cost.

* ``GET /burst?n=N`` -- ``raw_app.burst``: events ``b"data: %d\n\n" % i``
  for i in 0..N-1, one ``send`` each (default N = 100000), then the end of the
  body.
* ``GET /idle`` -- ``raw_app.idle``: the response head, then a stream that
  holds a queue and waits on both it and ``receive()`` until the client
  disconnects.

Run with ``python -m uvicorn benchmarks.apps.starlette_floor_app:app`` from the
repo root.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Route

from benchmarks.apps import raw_app
from benchmarks.apps.common import Endpoint


class Burst(Endpoint):
    handler = staticmethod(raw_app.burst)


class Idle(Endpoint):
    handler = staticmethod(raw_app.idle)


app = Starlette(routes=[Route("/burst", Burst), Route("/idle", Idle)])
