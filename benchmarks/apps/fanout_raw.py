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
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from benchmarks.apps.fanout_common import Publisher, dumps, payload, start_params, stats

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SSE_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-store"),
    ],
}
END_MESSAGE: Message = {"type": "http.response.body", "body": b"", "more_body": False}

# The registry: one queue per open stream. ``None`` in a queue ends its stream.
subscribers: set[asyncio.Queue[Message | None]] = set()


async def publish_one(index: int) -> None:
    body = f"data: {dumps(payload(index))}\n\n".encode()
    message: Message = {"type": "http.response.body", "body": body, "more_body": True}
    for queue in subscribers:
        queue.put_nowait(message)


publisher = Publisher(publish_one)


async def _events(receive: Receive, send: Send) -> None:
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


async def _start(scope: Scope, send: Send) -> None:
    try:
        n, interval = start_params(parse_qs(scope["query_string"].decode("latin-1")))
    except ValueError as exc:
        await _json(send, {"error": str(exc)}, 400)
        return
    if not publisher.start(n, interval):
        await _json(send, {"error": "already publishing"}, 409)
        return
    await _json(send, {"started": True, "subscribers": len(subscribers)})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            for queue in subscribers:
                queue.put_nowait(None)
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI entry point."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/events":
        await _events(receive, send)
    elif path == "/start":
        await _start(scope, send)
    elif path == "/stats":
        query = parse_qs(scope["query_string"].decode("latin-1"))
        await _json(send, stats(len(subscribers), publisher, query))
    else:
        await _json(send, {"error": "not found"}, 404)
