"""An sseviews idle stream written as a generator view, for memory_profile.py.

``GET /idle``: ``events()`` waits forever, so the stream sends its head only.
It costs what a view with its own ``events()`` costs per stream: the request
task iterating ``events()``, plus the writer and the listener tasks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.routing import Route

from sseviews import Event, EventStreamView


class Idle(EventStreamView):
    ping_interval = None
    send_timeout = None

    async def events(self) -> AsyncIterator[Event]:
        await anyio.sleep_forever()
        yield Event("unreachable")


app = Starlette(routes=[Route("/idle", Idle)])
