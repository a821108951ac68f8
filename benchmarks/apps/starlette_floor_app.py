"""The floor for any endpoint routed through a Starlette app: no SSE library at all.

The same two endpoints as ``raw_app``, written as bare ASGI endpoint classes (the
shape Starlette's ``HTTPEndpoint`` and sseviews' ``EventStreamView`` have) and
served by ``Starlette(routes=[Route(...)])``. Whatever this app costs over
``raw_app`` per stream is what Starlette's app, middleware and router cost,
before any SSE framework code runs: the least a Starlette-routed SSE view can
cost.

* ``GET /burst?n=N`` -- N pre-encoded ``data: x\\n\\n`` events, one ``send``
  each (default N = 100000), then the end of the body.
* ``GET /idle`` -- the response head, then nothing until the client
  disconnects.

Run with ``python -m uvicorn benchmarks.apps.starlette_floor_app:app`` from the
repo root.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Route

from benchmarks.apps.common import END_MESSAGE, SSE_START, Receive, Scope, Send, query
from benchmarks.apps.raw_app import DEFAULT_BURST_EVENTS, EVENT_MESSAGE


class _Endpoint:
    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send

    def __await__(self) -> Generator[Any, None, None]:
        return self.run().__await__()

    async def run(self) -> None:
        raise NotImplementedError


class Burst(_Endpoint):
    async def run(self) -> None:
        values = query(self.scope).get("n")
        n = int(values[0]) if values else DEFAULT_BURST_EVENTS
        await self.send(SSE_START)
        for _ in range(n):
            await self.send(EVENT_MESSAGE)
        await self.send(END_MESSAGE)


class Idle(_Endpoint):
    async def run(self) -> None:
        await self.send(SSE_START)
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return


app = Starlette(routes=[Route("/burst", Burst), Route("/idle", Idle)])
