"""Shared pieces of the hand-written ASGI benchmark apps (``raw_app``, ``fanout_raw``).

Standard library only, so a raw app loads nothing a framework would: the ASGI
types, the SSE response head, the end-of-body message, query parsing, and
:func:`asgi_app`, which answers the lifespan protocol and dispatches HTTP
requests on their exact path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
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
