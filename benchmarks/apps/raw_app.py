"""Hand-written ASGI app: the performance floor for the SSE benchmarks.

No framework and no SSE library: the endpoints do by hand what an SSE
endpoint must do, as a competent hand-written ASGI app does it, so the only
difference measured against the other apps is the framework's overhead.

Routes (anything else answers 404):

* ``GET /burst?n=N`` -- events ``0`` to ``N - 1`` (default N = 100000), each
  encoded as ``b"data: %d\\n\\n" % i`` in its own ASGI message and its own
  ``send``, as fast as the server takes them, then the end of the body.
* ``GET /idle`` -- a real idle stream (:func:`benchmarks.apps.common.queue_stream`):
  the response head, then the stream holds an ``asyncio.Queue`` (where a
  publisher would put its events) and waits on both that queue and
  ``receive()`` until the client disconnects. Nothing is ever published here.

``apps/starlette_floor_app.py`` serves these same two functions through a
``Starlette`` app.

Run with ``python -m uvicorn benchmarks.apps.raw_app:app`` from the repo root.
"""

from __future__ import annotations

import asyncio

from benchmarks.apps.common import (
    END_MESSAGE,
    SSE_START,
    Message,
    Receive,
    Scope,
    Send,
    asgi_app,
    query,
    queue_stream,
)

DEFAULT_BURST_EVENTS = 100_000


def _event_count(scope: Scope) -> int:
    values = query(scope).get("n")
    return int(values[0]) if values else DEFAULT_BURST_EVENTS


async def burst(scope: Scope, receive: Receive, send: Send) -> None:
    n = _event_count(scope)
    await send(SSE_START)
    for i in range(n):
        await send({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
    await send(END_MESSAGE)


async def idle(scope: Scope, receive: Receive, send: Send) -> None:
    queue: asyncio.Queue[Message | None] = asyncio.Queue()
    await queue_stream(receive, send, queue)


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"9")],
        }
    )
    await send({"type": "http.response.body", "body": b"not found"})


app = asgi_app({"/burst": burst, "/idle": idle}, _not_found)
