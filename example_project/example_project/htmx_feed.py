"""The htmx pages: a live feed of HTML fragments, swapped in by htmx's SSE support.

A posted message is rendered once into an HTML fragment (`sseviews.htmx.Fragments`,
autoescaped) and published as an unnamed event, the one kind both htmx versions
swap: `/htmx` appends it with htmx 2's SSE extension (`sse-swap="message"`), and
`/htmx4` with htmx 4's `hx-sse:connect`, which swaps every unnamed event into its
element. htmx comes from the npm registry (`.ci/run` installs htmx 2 and its SSE
extension, and htmx 4 under the alias `htmx4`, into `example_project/node_modules/`,
which git ignores) and is served at `/vendor/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from sseviews import Broadcast, EventStreamView
from sseviews.htmx import Fragments
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .views import configure

TEMPLATES = Path(__file__).parent / "templates"
VENDOR = Path(__file__).resolve().parents[1] / "node_modules"
# htmx 4 installed beside htmx 2 under another name: `npm install htmx4@npm:htmx.org@4`.
HTMX4 = VENDOR / "htmx4"
GROUP = "htmx:feed"
MAX_TEXT = 500

fragments = Fragments(TEMPLATES)


class HtmxFeed(EventStreamView):
    """The feed's group; every event is an HTML fragment, unnamed (`message`)."""

    event_types: ClassVar = {"message": str}
    retry = 500
    groups = (GROUP,)


def htmx_routes(broadcast: Broadcast, render_page: Any) -> list[Route | Mount]:
    """The page, the endpoint that posts, the stream, and htmx itself at /vendor/."""

    async def page(request: Request) -> Response:
        return render_page(request, "htmx.html", {"vendor": VENDOR.is_dir()})

    async def page4(request: Request) -> Response:
        return render_page(request, "htmx4.html", {"htmx": HTMX4.is_dir()})

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
        return HTMLResponse("", status_code=204)

    return [
        Route("/htmx", page, name="htmx"),
        Route("/htmx4", page4, name="htmx4"),
        Route("/htmx/messages", post, methods=["POST"]),
        Route("/htmx/events", configure(HtmxFeed, broadcast=broadcast), name="htmx_events"),
        Mount("/vendor", StaticFiles(directory=VENDOR, check_dir=False), name="vendor"),
    ]
