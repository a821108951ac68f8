"""`js_route()`: serve the browser helper `sseviews.js` from your app in one line."""

from __future__ import annotations

import hashlib
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["js_route"]


def js_route(path: str = "/sseviews.js", *, name: str = "sseviews_js") -> Route:
    """Return a Starlette `Route` that serves the browser helper `sseviews.js`.

    Add it to your routes: `Starlette(routes=[js_route(), ...])`, then load it with
    `<script src="/sseviews.js"></script>`. The file is read once; responses carry
    an `ETag`, so browsers revalidate it cheaply (`304`).

    Args:
        path: The URL path to serve it at.
        name: The route name, for `url_for()`.
    """
    body = resources.files("sseviews").joinpath("static/sseviews.js").read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}

    async def sseviews_js(request: Request) -> Response:
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type="text/javascript", headers=headers)

    return Route(path, sseviews_js, methods=["GET", "HEAD"], name=name)
