"""Shared pieces of the hand-written ASGI apps (``raw_app``, ``fanout_raw``, ``scaleout_raw``).

Standard library only, so a raw app loads nothing a framework would: the ASGI
types, the SSE response head, the end-of-body message, query parsing, a JSON answer
(:func:`send_json`),
:func:`queue_stream` (the hand-written stream: a queue, a disconnect listener
and one ``send`` per queued message) and :func:`asgi_app`, which answers the
lifespan protocol and dispatches HTTP requests on their exact path.

:class:`Endpoint` is for the Starlette floor apps (``starlette_floor_app``,
``fanout_floor``): it turns a raw app's function into the bare endpoint class a
``Starlette`` ``Route`` serves.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping, MutableMapping
from typing import Any
from urllib.parse import parse_qs

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SSE_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-store"),
    ],
}
END_MESSAGE: Message = {"type": "http.response.body", "body": b"", "more_body": False}


def query(scope: Scope) -> dict[str, list[str]]:
    """The request's query string, parsed (``parse_qs``)."""
    return parse_qs(scope.get("query_string", b"").decode("latin-1"))


async def send_json(send: Send, body: Any, status: int = 200) -> None:
    """Answer with ``body`` as compact JSON (the whole response, in two sends)."""
    data = json.dumps(body, separators=(",", ":")).encode()
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


async def queue_stream(receive: Receive, send: Send, queue: asyncio.Queue[Message | None]) -> None:
    """Send the SSE response head, then every message put into ``queue``, until the end.

    This is the stream a competent hand-written ASGI SSE endpoint runs: it holds
    a queue that publishers put ready-made ``http.response.body`` messages into,
    and waits on both that queue and ``receive()`` at once, because an idle
    stream only learns that its client left from ``http.disconnect``. The stream
    ends when the client disconnects or when ``None`` is put into the queue (the
    server is shutting down); queued messages are sent one ``send`` each, so the
    stream's task wakes once per message.

    The two waits run under an ``asyncio.TaskGroup``: the request task is the
    writer (it awaits the queue and makes every ``send``), and a listener task
    that it starts and awaits calls ``receive()``. That is the standard
    library's structured form of the pattern, with the fewest objects per
    connection: one extra task, alive as long as the stream. The alternatives
    cost more: ``asyncio.wait`` on a ``queue.get()`` task and a ``receive()``
    task creates a task per message, and an anyio task group (the shape of
    Starlette's ``StreamingResponse``) adds a cancel scope and anyio's task
    bookkeeping per connection, and a dependency the raw floor should not have.
    """

    async def listen_for_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        queue.put_nowait(None)

    await send(SSE_START)
    async with asyncio.TaskGroup() as group:
        listener = group.create_task(listen_for_disconnect())
        while (message := await queue.get()) is not None:
            await send(message)
        # A None put by the server (shutdown), not by the listener, leaves the
        # listener waiting on receive(): stop it so the group can exit.
        listener.cancel()


class Endpoint:
    """A raw app's endpoint function as an ASGI endpoint class.

    Subclasses set ``handler = staticmethod(<function>)``. The class has the
    shape of Starlette's ``HTTPEndpoint`` and of ``EventStreamView``
    (``__init__(scope, receive, send)`` plus ``__await__``), so a ``Route``
    serves it as an ASGI app: the floor routes the raw function through
    Starlette and adds nothing else.
    """

    handler: staticmethod[[Scope, Receive, Send], Coroutine[Any, Any, None]]

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send

    def __await__(self) -> Generator[Any, None, None]:
        # The handler's coroutine is awaited as the instance's own, so the
        # floor holds no frame more than a class endpoint must.
        return self.handler(self.scope, self.receive, self.send).__await__()


async def _lifespan(receive: Receive, send: Send, on_shutdown: Callable[[], None] | None) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if on_shutdown is not None:
                on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


def asgi_app(
    routes: Mapping[str, ASGIApp],
    not_found: ASGIApp,
    on_shutdown: Callable[[], None] | None = None,
) -> ASGIApp:
    """An ASGI app serving ``routes`` (exact paths), ``not_found`` for any other.

    ``on_shutdown`` runs when the server shuts down, before the lifespan
    protocol's shutdown completes.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry point."""
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, on_shutdown)
            return
        if scope["type"] != "http":
            return
        await routes.get(scope["path"], not_found)(scope, receive, send)

    return app
