"""A small app for the `sseviews.js` browser tests, served by uvicorn in a subprocess.

Settings come from the environment: `TOKEN_TTL` (seconds), `HISTORY_URL` (empty:
history in memory, so a restart starts a new epoch), `MAX_LIFETIME` (seconds).
`python client_app.py publish A B` publishes items A..B-1 into the history
while the server is down. `/failing-page` streams `/failing`, whose `events()`
raises on its first `FAILURES` connections (4 by default).
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from sseviews import Broadcast, DisconnectReason, Event, EventStreamView, js_route
from sseviews.tokens import StreamTokens

SECRET = "browser-test-secret-of-32-bytes!"
TOKENS = StreamTokens(SECRET, ttl=float(os.environ.get("TOKEN_TTL", "60")))
broadcast = Broadcast("memory://", history=os.environ.get("HISTORY_URL") or None)
issued = Counter[str]()
reasons = Counter[str]()

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sseviews.js</title>
<script src="/sseviews.js"></script></head>
<body><ol id="items"></ol><p id="resets"></p>
<script>
  window.received = []; window.resets = []; window.opens = 0;
  const params = new URLSearchParams(location.search);
  const stream = sseviews.connect("/stream", {
    tokenUrl: "/token", token: params.get("token") || "", minDelay: 100, maxDelay: 1000,
  });
  stream.on("item", (data) => {
    window.received.push(data.n);
    const li = document.createElement("li");
    li.textContent = data.n;
    document.getElementById("items").append(li);
  });
  stream.onreset = (data) => {
    window.resets.push(data.reason);
    document.getElementById("resets").textContent = "reset: " + data.reason;
  };
  stream.onopen = () => { window.opens += 1; };
</script></body></html>
"""


class Feed(EventStreamView):
    tokens = TOKENS
    retry = 200
    groups = ("feed",)
    max_lifetime = float(os.environ["MAX_LIFETIME"]) if os.environ.get("MAX_LIFETIME") else None

    async def on_disconnect(self, reason: DisconnectReason) -> None:
        reasons[reason.value] += 1


Feed.broadcast = broadcast


FAILING_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sseviews.js backoff</title>
<script src="/sseviews.js"></script></head>
<body><p id="state">connecting</p>
<script>
  window.errors = 0; window.oks = 0;
  const stream = sseviews.connect("/failing", {minDelay: 200, maxDelay: 1600});
  stream.on("sseviews.error", () => { window.errors += 1; });
  stream.on("ok", () => {
    window.oks += 1;
    document.getElementById("state").textContent = "streaming after " + window.errors + " errors";
  });
</script></body></html>
"""
failing_connects: list[float] = []


class Failing(EventStreamView):
    """Fails its first FAILURES streams; its `retry:` would hold a browser back 30-90 s."""

    error_retry = 60_000

    async def events(self) -> AsyncIterator[Event]:
        failing_connects.append(time.monotonic())
        yield Event("hello", event="greeting")
        if len(failing_connects) <= int(os.environ.get("FAILURES", "4")):
            raise LookupError("the database is gone")
        yield Event("fine", event="ok")
        await anyio.sleep_forever()


async def failing_page(request: Request) -> HTMLResponse:
    return HTMLResponse(FAILING_PAGE)


async def failing_stats(request: Request) -> JSONResponse:
    return JSONResponse({"connects": failing_connects})


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE)


async def token(request: Request) -> JSONResponse:
    issued["tokens"] += 1
    return JSONResponse({"token": TOKENS.issue("browser", groups=["feed"])})


async def publish_range(first: int, last: int) -> None:
    for n in range(first, last):
        await broadcast.publish("feed", Event({"n": n}, event="item"))


async def publish(request: Request) -> JSONResponse:
    await publish_range(int(request.query_params["from"]), int(request.query_params["to"]))
    return JSONResponse({"ok": True})


async def stats(request: Request) -> JSONResponse:
    return JSONResponse({"issued": issued["tokens"], "reasons": dict(reasons)})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with broadcast:
        yield


app = Starlette(
    routes=[
        Route("/", page),
        Route("/token", token),
        Route("/publish", publish, methods=["POST"]),
        Route("/stats", stats),
        js_route("/sseviews.js"),
        Route("/stream", Feed),
        Route("/failing-page", failing_page),
        Route("/failing-stats", failing_stats),
        Route("/failing", Failing),
    ],
    lifespan=lifespan,
)


async def _publish_offline(first: int, last: int) -> None:
    async with broadcast:
        await publish_range(first, last)


if __name__ == "__main__" and sys.argv[1:2] == ["publish"]:
    anyio.run(_publish_offline, int(sys.argv[2]), int(sys.argv[3]))
