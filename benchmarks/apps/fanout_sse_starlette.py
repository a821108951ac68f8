"""Fan-out with sse-starlette: a queue per client, as in its broadcasting example.

The pattern of sse-starlette's ``examples/02_broadcasting.py``: every client
gets its own bounded ``asyncio.Queue`` (maxsize 100); the broadcaster builds
one ``ServerSentEvent`` per event and ``put_nowait``s it into every queue; the
client's ``EventSourceResponse`` iterates a generator that awaits its queue
(sse-starlette encodes each event per client, as it does in the example). The
queue is registered in the endpoint, before the response head is sent. The
example's ``await request.is_disconnected()`` before every event is left out
(``EventSourceResponse`` watches for the disconnect in a task of its own), which
can only make sse-starlette faster here.

Pings are disabled (``ping=0``: no ping task; ``SSE_STARLETTE_PING`` overrides
it) and the separator is ``"\\n"`` (on the response and on each
``ServerSentEvent``, which otherwise encodes with its own ``"\\r\\n"``), so the
bytes on the wire match the raw app.

Routes: see ``fanout_common.py`` (``/events``, ``/start``, ``/stats``).

Run with ``python -m uvicorn benchmarks.apps.fanout_sse_starlette:app`` from the
repo root.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from benchmarks.apps.fanout_common import Publisher, control_routes, dumps, payload

PING_SECONDS = float(os.environ.get("SSE_STARLETTE_PING", "0"))
MAX_QUEUE_SIZE = 100

clients: set[asyncio.Queue[ServerSentEvent]] = set()


async def publish_one(index: int) -> None:
    event = ServerSentEvent(data=dumps(payload(index)), sep="\n")
    for queue in list(clients):
        try:
            queue.put_nowait(event)
        except asyncio.QueueFull:  # the example drops such a client
            clients.discard(queue)


publisher = Publisher(publish_one)


async def events(request: Request) -> EventSourceResponse:
    queue: asyncio.Queue[ServerSentEvent] = asyncio.Queue(maxsize=MAX_QUEUE_SIZE)
    clients.add(queue)

    async def stream() -> AsyncIterator[ServerSentEvent]:
        try:
            while True:
                yield await queue.get()
        finally:
            clients.discard(queue)

    return EventSourceResponse(stream(), ping=PING_SECONDS, sep="\n")


app = Starlette(routes=[Route("/events", events), *control_routes(publisher, lambda: len(clients))])
