"""Fan-out floor: a hand-written ASGI app with an ``asyncio.Queue`` per connection.

A registry holds one queue per open ``/events`` stream. The publisher encodes
each event once (``data: {"t":...,"i":n}\\n\\n``), builds one ASGI body
message around those bytes and ``put_nowait``s that same message into every
queue. Each connection's task awaits its queue and sends what it gets, one
``send`` per event. A second small task per connection waits for the client's
disconnect and then ends the stream (and leaves the registry).

Routes: see ``fanout_common.py`` (``/events``, ``/start``, ``/stats``).

Run with ``python -m uvicorn benchmarks.apps.fanout_raw:app`` from the repo root.
"""

from __future__ import annotations

import asyncio
from typing import Any

from benchmarks.apps.common import SSE_START, Message, Receive, Scope, Send, asgi_app, query
from benchmarks.apps.fanout_common import Publisher, dumps, payload, start_publishing, stats

# The registry: one queue per open stream. ``None`` in a queue ends its stream.
subscribers: set[asyncio.Queue[Message | None]] = set()


async def publish_one(index: int) -> None:
    body = f"data: {dumps(payload(index))}\n\n".encode()
    message: Message = {"type": "http.response.body", "body": body, "more_body": True}
    for queue in subscribers:
        queue.put_nowait(message)


publisher = Publisher(publish_one)


async def _events(scope: Scope, receive: Receive, send: Send) -> None:
    queue: asyncio.Queue[Message | None] = asyncio.Queue()
    subscribers.add(queue)  # registered before the head: no event can be missed

    async def watch_disconnect() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                subscribers.discard(queue)
                queue.put_nowait(None)
                return

    watcher = asyncio.get_running_loop().create_task(watch_disconnect())
    try:
        await send(SSE_START)
        while True:
            message = await queue.get()
            if message is None:
                return
            await send(message)
    finally:
        subscribers.discard(queue)
        watcher.cancel()


async def _json(send: Send, body: Any, status: int = 200) -> None:
    data = dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def _start(scope: Scope, receive: Receive, send: Send) -> None:
    status, body = start_publishing(publisher, len(subscribers), query(scope))
    await _json(send, body, status)


async def _stats(scope: Scope, receive: Receive, send: Send) -> None:
    await _json(send, stats(len(subscribers), publisher, query(scope)))


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    await _json(send, {"error": "not found"}, 404)


def _end_streams() -> None:
    for queue in subscribers:
        queue.put_nowait(None)


app = asgi_app({"/events": _events, "/start": _start, "/stats": _stats}, _not_found, _end_streams)
