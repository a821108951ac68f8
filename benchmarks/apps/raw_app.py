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

from benchmarks.apps.common import (
    END_MESSAGE,
    SSE_START,
    Message,
    Receive,
    Scope,
    Send,
    asgi_app,
    query,
)

DEFAULT_BURST_EVENTS = 100_000
EVENT = b"data: x\n\n"

EVENT_MESSAGE: Message = {"type": "http.response.body", "body": EVENT, "more_body": True}


def _event_count(scope: Scope) -> int:
    values = query(scope).get("n")
    return int(values[0]) if values else DEFAULT_BURST_EVENTS


async def burst(scope: Scope, receive: Receive, send: Send) -> None:
    n = _event_count(scope)
    await send(SSE_START)
    for _ in range(n):
        await send(EVENT_MESSAGE)
    await send(END_MESSAGE)


async def idle(scope: Scope, receive: Receive, send: Send) -> None:
    await send(SSE_START)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


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
