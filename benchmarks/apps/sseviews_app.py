"""The same two SSE endpoints written as sseviews ``EventStreamView`` classes.

* ``GET /burst?n=N`` -- ``events()`` yields the string ``"x"`` N times
  (default 100000); each becomes ``data: x\\n\\n`` on the wire.
* ``GET /idle`` -- ``events()`` waits forever: response head only.

Pings and send timeouts are switched off, as in the other two apps.

Run with ``python -m uvicorn benchmarks.apps.sseviews_app:app`` from the repo
root.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.routing import Route

from sseviews import EventStreamView

DEFAULT_BURST_EVENTS = 100_000


class Burst(EventStreamView):
    ping_interval = None
    send_timeout = None

    async def events(self) -> AsyncIterator[str]:
        n = int(self.request.query_params.get("n", str(DEFAULT_BURST_EVENTS)))
        for _ in range(n):
            yield "x"


class Idle(EventStreamView):
    ping_interval = None
    send_timeout = None

    async def events(self) -> AsyncIterator[str]:
        await anyio.sleep_forever()
        yield "unreachable"


app = Starlette(routes=[Route("/burst", Burst), Route("/idle", Idle)])
