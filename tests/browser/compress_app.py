"""A small app for the compressed-stream tests (browser and curl), served by uvicorn.

`/feed/{encoding}` streams the group `feed` compressed with that one encoding
(`identity` for none); every stream ends after `max_lifetime` (0.7 s), so each
client reconnects several times with its Last-Event-ID, and pings after 0.15 s
of silence. `/quiet/{encoding}` streams the same group with no pings and no
end, so nothing but each event's own write can carry it to the client.
`/?encoding=gzip` opens the feed twice (`&feed=quiet`: the quiet one): with the
browser's own `EventSource` and with `sseviews.js`.
`/stats` lists, per connection: the encoding asked for, the request's
`Accept-Encoding` and its Last-Event-ID.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from sseviews import Broadcast, Event, EventStreamView, js_route

broadcast = Broadcast("memory://")
connections: list[dict[str, Any]] = []

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>compressed streams</title>
<script src="/sseviews.js"></script></head>
<body><p id="native"></p><p id="helper"></p>
<script>
  const params = new URLSearchParams(location.search);
  const encoding = params.get("encoding");
  const feed = "/" + (params.get("feed") || "feed") + "/" + encoding;
  window.native = []; window.helper = [];
  const source = new EventSource(feed + "?client=native");
  source.addEventListener("item", (e) => {
    window.native.push(JSON.parse(e.data));
    document.getElementById("native").textContent = "EventSource: " + window.native.length;
  });
  const stream = sseviews.connect(feed + "?client=helper",
                                  {minDelay: 100, maxDelay: 500});
  stream.on("item", (data) => {
    window.helper.push(data);
    document.getElementById("helper").textContent = "sseviews.js: " + window.helper.length;
  });
</script></body></html>
"""

TEXT = "the same words again and again, as chat and dashboards repeat them; "


class Feed(EventStreamView):
    broadcast = broadcast
    groups = ("feed",)
    retry = 100
    max_lifetime = 0.7
    # Pings in the pauses between publishes: a gzip or zstd stream drops its
    # compressor at each and goes on with a new one.
    ping_interval = 0.15

    async def on_connect(self) -> None:
        connections.append(
            {
                "encoding": self.request.path_params["encoding"],
                "client": self.request.query_params.get("client", ""),
                "accept_encoding": self.request.headers.get("accept-encoding", ""),
                "last_event_id": self.last_event_id,
            }
        )


FEEDS = {
    encoding: type(f"Feed_{encoding}", (Feed,), {"compress": (encoding,)})
    for encoding in ("gzip", "br", "zstd")
}
FEEDS["identity"] = Feed
QUIET = {
    encoding: type(f"Quiet_{encoding}", (view,), {"ping_interval": None, "max_lifetime": None})
    for encoding, view in FEEDS.items()
}


class ByEncoding:
    """Dispatch `/feed/{encoding}` (or `/quiet/{encoding}`) to the view that compresses with it."""

    def __init__(self, views: dict[str, type[EventStreamView]]) -> None:
        self.views = views

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        view = self.views[scope["path_params"]["encoding"]]
        await view(scope, receive, send)


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE)


async def publish(request: Request) -> JSONResponse:
    first, last = int(request.query_params["from"]), int(request.query_params["to"])
    for n in range(first, last):
        await broadcast.publish("feed", Event({"n": n, "text": TEXT * (1 + n % 3)}, event="item"))
    return JSONResponse({"ok": True})


async def stats(request: Request) -> JSONResponse:
    return JSONResponse({"connections": connections})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with broadcast:
        yield


app = Starlette(
    routes=[
        Route("/", page),
        Route("/publish", publish, methods=["POST"]),
        Route("/stats", stats),
        js_route("/sseviews.js"),
        Route("/feed/{encoding}", ByEncoding(FEEDS)),
        Route("/quiet/{encoding}", ByEncoding(QUIET)),
    ],
    lifespan=lifespan,
)
