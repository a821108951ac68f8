"""The htmx page: a live feed of HTML fragments, swapped in by htmx's SSE extension.

A posted message is rendered once into an HTML fragment (`sseviews.htmx.Fragments`,
autoescaped) and published as a `feed` event; each page's `sse-swap="feed"` appends
it. htmx and its SSE extension come from the npm registry: `npm install` puts them in
`example_project/node_modules/` (git ignores it; `.ci/run` does it), and they are
served at `/vendor/`. Until they are there, the page says what to run instead of
streaming, its form is disabled, and `/vendor/` answers 404 with the same command.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import anyio
from sseviews import Broadcast, EventStreamView
from sseviews.htmx import Fragments
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from .views import configure

TEMPLATES = Path(__file__).parent / "templates"
VENDOR = Path(__file__).resolve().parents[1] / "node_modules"
# What the page loads from /vendor/, relative to node_modules.
SCRIPTS = ("htmx.org/dist/htmx.min.js", "htmx-ext-sse/sse.js")
PACKAGES = "htmx.org@2 htmx-ext-sse@2"
GROUP = "htmx:feed"
MAX_TEXT = 500

fragments = Fragments(TEMPLATES)


class HtmxFeed(EventStreamView):
    """The feed's group; every event is an HTML fragment named `feed`."""

    retry = 500
    groups = (GROUP,)


def install_command(vendor: Path) -> str:
    """The shell command that installs htmx and its SSE extension into `vendor`."""
    folder = shlex.quote(str(vendor.parent))
    return f"cd {folder} && npm install --no-save --no-package-lock {PACKAGES}"


async def htmx_installed(vendor: Path) -> bool:
    """Whether every script the page loads is in `vendor` (checked on each request)."""
    for script in SCRIPTS:
        if not await anyio.Path(vendor / script).is_file():
            return False
    return True


def htmx_routes(
    broadcast: Broadcast, render_page: Any, vendor: Path = VENDOR
) -> list[Route | Mount]:
    """The page, the endpoint that posts, the stream, and htmx itself at /vendor/."""
    files = StaticFiles(directory=vendor, check_dir=False)
    missing = f"htmx is not installed; run: {install_command(vendor)}\n"

    async def page(request: Request) -> Response:
        context = {"htmx": await htmx_installed(vendor), "install": install_command(vendor)}
        return render_page(request, "htmx.html", context)

    async def post(request: Request) -> Response:
        body = await request.body()
        if len(body) > 16 * 1024:
            raise HTTPException(413, "the body must be at most 16 KiB")
        fields = dict(parse_qsl(body.decode("utf-8", "replace")))
        author = fields.get("author", "").strip()[:40] or "anonymous"
        text = fields.get("text", "").strip()[:MAX_TEXT]
        if not text:
            raise HTTPException(422, "text must not be empty")
        # Rendered once here; every subscriber is sent the same bytes.
        await broadcast.publish(
            GROUP, fragments.event("feed", "htmx_item.html", author=author, text=text)
        )
        if request.headers.get("hx-request") != "true":
            # The form posted without htmx (its script failed to load): the message
            # went out all the same, and the browser comes back to the page.
            return RedirectResponse(request.url_for("htmx").path, status_code=303)
        return HTMLResponse("", status_code=204)

    async def vendor_files(scope: Scope, receive: Receive, send: Send) -> None:
        # StaticFiles raises (a 500) for a folder that does not exist: say what to run.
        if await anyio.Path(vendor).is_dir():
            await files(scope, receive, send)
        else:
            await PlainTextResponse(missing, status_code=404)(scope, receive, send)

    return [
        Route("/htmx", page, name="htmx"),
        Route("/htmx/messages", post, methods=["POST"]),
        Route("/htmx/events", configure(HtmxFeed, broadcast=broadcast), name="htmx_events"),
        Mount("/vendor", app=vendor_files, name="vendor"),
    ]
