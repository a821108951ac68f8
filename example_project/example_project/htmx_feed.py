"""The htmx pages: a live feed of HTML fragments, swapped in by htmx's SSE support.

A posted message is rendered once into an HTML fragment (`sseviews.htmx.Fragments`,
autoescaped) and published as an unnamed event, the one kind both htmx versions
swap: `/htmx` appends it with htmx 2's SSE extension (`sse-swap="message"`), and
`/htmx4` with htmx 4's `hx-sse:connect`, which swaps every unnamed event into its
element. htmx comes from the npm registry: `npm install` puts htmx 2 and its SSE
extension, and htmx 4 under the alias `htmx4`, in `example_project/node_modules/`
(git ignores it; `.ci/run` does it), and they are served at `/vendor/`. Until a
page's scripts are there, that page says what to run instead of streaming, its form
is disabled, and `/vendor/` answers 404 with the command once node_modules is missing.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, ClassVar
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
# What /htmx loads from /vendor/, relative to node_modules.
SCRIPTS = ("htmx.org/dist/htmx.min.js", "htmx-ext-sse/sse.js")
# htmx 4 installed beside htmx 2 under another name (an npm alias), for /htmx4.
HTMX4 = "htmx4"
HTMX4_SCRIPTS = (f"{HTMX4}/dist/htmx.min.js", f"{HTMX4}/dist/ext/hx-sse.js")
# Both pages give the same command, naming every package: `npm install --no-save`
# removes the packages it was not given, so installing one htmx would remove the other.
PACKAGES = f"htmx.org@2 htmx-ext-sse@2 {HTMX4}@npm:htmx.org@4"
GROUP = "htmx:feed"
MAX_TEXT = 500

fragments = Fragments(TEMPLATES)


class HtmxFeed(EventStreamView):
    """The feed's group; every event is an HTML fragment, unnamed (`message`)."""

    event_types: ClassVar = {"message": str}
    retry = 500
    groups = (GROUP,)


def install_command(vendor: Path) -> str:
    """The shell command that installs htmx 2, its SSE extension and htmx 4 into `vendor`."""
    folder = shlex.quote(str(vendor.parent))
    return f"cd {folder} && npm install --no-save --no-package-lock {PACKAGES}"


async def htmx_installed(vendor: Path, scripts: tuple[str, ...] = SCRIPTS) -> bool:
    """Whether every one of `scripts` is in `vendor` (checked on each request)."""
    for script in scripts:
        if not await anyio.Path(vendor / script).is_file():
            return False
    return True


def htmx_routes(
    broadcast: Broadcast, render_page: Any, vendor: Path = VENDOR
) -> list[Route | Mount]:
    """The pages, the endpoint that posts, the stream, and htmx itself at /vendor/."""
    files = StaticFiles(directory=vendor, check_dir=False)
    missing = f"htmx is not installed; run: {install_command(vendor)}\n"

    async def page(request: Request) -> Response:
        context = {"htmx": await htmx_installed(vendor), "install": install_command(vendor)}
        return render_page(request, "htmx.html", context)

    async def page4(request: Request) -> Response:
        context = {
            "htmx": await htmx_installed(vendor, HTMX4_SCRIPTS),
            "install": install_command(vendor),
        }
        return render_page(request, "htmx4.html", context)

    async def post(request: Request) -> Response:
        body = await request.body()
        if len(body) > 16 * 1024:
            raise HTTPException(413, "the body must be at most 16 KiB")
        fields = dict(parse_qsl(body.decode("utf-8", "replace")))
        author = fields.get("author", "").strip()[:40] or "anonymous"
        text = fields.get("text", "").strip()[:MAX_TEXT]
        if not text:
            raise HTTPException(422, "text must not be empty")
        # Rendered once here; every subscriber is sent the same bytes. Unnamed: htmx 4
        # swaps only unnamed events (it dispatches named ones as DOM events).
        await broadcast.publish(
            GROUP, fragments.event(None, "htmx_item.html", author=author, text=text)
        )
        if request.headers.get("hx-request") != "true":
            # The form posted without htmx (its script failed to load): the message
            # went out all the same, and the browser comes back to the page it was on.
            back = "htmx4" if fields.get("page") == "htmx4" else "htmx"
            return RedirectResponse(request.url_for(back).path, status_code=303)
        return HTMLResponse("", status_code=204)

    async def vendor_files(scope: Scope, receive: Receive, send: Send) -> None:
        # StaticFiles raises (a 500) for a folder that does not exist: say what to run.
        if await anyio.Path(vendor).is_dir():
            await files(scope, receive, send)
        else:
            await PlainTextResponse(missing, status_code=404)(scope, receive, send)

    return [
        Route("/htmx", page, name="htmx"),
        Route("/htmx4", page4, name="htmx4"),
        Route("/htmx/messages", post, methods=["POST"]),
        Route("/htmx/events", configure(HtmxFeed, broadcast=broadcast), name="htmx_events"),
        Mount("/vendor", app=vendor_files, name="vendor"),
    ]
