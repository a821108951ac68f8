"""Hand-written ASGI app: the performance floor for the SSE benchmarks.

No framework, no encoding at run time: every event is the same pre-encoded
``b"data: x\\n\\n"`` handed to the server in its own ``send`` call, exactly as
the framework-based apps produce it, so the only difference measured is the
framework overhead.

Routes (anything else answers 404):

* ``GET /burst?n=N`` -- N events as fast as the server accepts them, then the
  end of the body (default N = 100000).
* ``GET /idle`` -- the response head only, then nothing until the client
  disconnects.

Run with ``python -m uvicorn benchmarks.apps.raw_app:app`` from the repo root.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_BURST_EVENTS = 100_000
EVENT = b"data: x\n\n"

SSE_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-store"),
    ],
}
EVENT_MESSAGE: Message = {"type": "http.response.body", "body": EVENT, "more_body": True}
END_MESSAGE: Message = {"type": "http.response.body", "body": b"", "more_body": False}


def _event_count(scope: Scope) -> int:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("n")
    return int(values[0]) if values else DEFAULT_BURST_EVENTS


async def _burst(scope: Scope, send: Send) -> None:
    n = _event_count(scope)
    await send(SSE_START)
    for _ in range(n):
        await send(EVENT_MESSAGE)
    await send(END_MESSAGE)


async def _idle(receive: Receive, send: Send) -> None:
    await send(SSE_START)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _not_found(send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"9")],
        }
    )
    await send({"type": "http.response.body", "body": b"not found"})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
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
    if path == "/burst":
        await _burst(scope, send)
    elif path == "/idle":
        await _idle(receive, send)
    else:
        await _not_found(send)
