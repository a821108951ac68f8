"""Fan-out floor: a hand-written ASGI app with an ``asyncio.Queue`` per connection.

A registry holds one queue per open ``/events`` stream. The publisher encodes
each event once (``data: {"t":...,"i":n}\\n\\n``), builds one ASGI body
message around those bytes and ``put_nowait``s that same message into every
queue: publishing only fills queues, it never writes to a connection. Each
stream is :func:`benchmarks.apps.common.queue_stream`, the same hand-written
stream as ``raw_app``'s ``/idle``: it holds its queue and waits on both it and
``receive()`` (a listener task under an ``asyncio.TaskGroup``), and its task
wakes once per event and sends it with its own ``send``. The stream ends (and
leaves the registry) when the client disconnects, or at server shutdown.

Routes: see ``fanout_common.py`` (``/events``, ``/start``, ``/stats``), served
by :func:`events`, :func:`start_route` and :func:`stats_route`;
:func:`end_streams` ends every stream at shutdown. ``fanout_floor`` serves the
same functions through a Starlette app.

Run with ``python -m uvicorn benchmarks.apps.fanout_raw:app`` from the repo root.
"""

from __future__ import annotations

import asyncio

from benchmarks.apps.common import (
    Message,
    Receive,
    Scope,
    Send,
    asgi_app,
    query,
    queue_stream,
    send_json,
)
from benchmarks.apps.fanout_common import Publisher, dumps, payload, start_publishing, stats

# The registry: one queue per open stream. ``None`` in a queue ends its stream.
subscribers: set[asyncio.Queue[Message | None]] = set()


async def publish_one(index: int) -> None:
    body = f"data: {dumps(payload(index))}\n\n".encode()
    message: Message = {"type": "http.response.body", "body": body, "more_body": True}
    for queue in subscribers:
        queue.put_nowait(message)


publisher = Publisher(publish_one)


async def events(scope: Scope, receive: Receive, send: Send) -> None:
    queue: asyncio.Queue[Message | None] = asyncio.Queue()
    subscribers.add(queue)  # registered before the head: no event can be missed
    try:
        await queue_stream(receive, send, queue)
    finally:
        subscribers.discard(queue)


async def start_route(scope: Scope, receive: Receive, send: Send) -> None:
    status, body = start_publishing(publisher, len(subscribers), query(scope))
    await send_json(send, body, status)


async def stats_route(scope: Scope, receive: Receive, send: Send) -> None:
    await send_json(send, stats(len(subscribers), publisher, query(scope)))


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    await send_json(send, {"error": "not found"}, 404)


def end_streams() -> None:
    for queue in subscribers:
        queue.put_nowait(None)


app = asgi_app(
    {"/events": events, "/start": start_route, "/stats": stats_route}, _not_found, end_streams
)
