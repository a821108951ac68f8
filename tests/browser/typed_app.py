"""A FastAPI app with typed streams, for the `sseviews typescript` browser test.

`/events/rooms/{room}` declares `event_types` of every kind the generator covers
(a pydantic model, a dataclass, a TypedDict, text, a `Literal`, an `int`), and the
`include_router()` dependency requires `?token=letmein`. `/` is the page; `/ts/`
serves the compiled TypeScript from the folder in the `TS_DIR` environment variable.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any, ClassVar, Literal, TypedDict

import anyio
from fastapi import Depends, FastAPI, HTTPException, Query
from pydantic import BaseModel
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

from sseviews import Event, EventStreamView, js_route
from sseviews.fastapi import StreamRouter

TOKEN = "letmein"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>typed streams</title>
<script src="/sseviews.js"></script>
<script type="module" src="/ts/typed_page.js"></script></head>
<body><h1>Typed events</h1><ol id="log"></ol></body></html>
"""


class Tick(BaseModel):
    n: int
    room: str


@dataclasses.dataclass
class Note:
    text: str
    author: str | None = None


class Presence(TypedDict):
    user: str
    online: bool


async def require_token(token: Annotated[str | None, Query()] = None) -> None:
    if token != TOKEN:
        raise HTTPException(401, "?token= is required")


class RoomView(EventStreamView):
    """A room's events, one of each declared kind, then silence."""

    event_types: ClassVar[dict[str, Any]] = {
        "message": str,
        "tick": Tick,
        "note": Note,
        "presence": Presence,
        "state": Literal["open", "closed"],
        "count": int,
    }

    async def events(self) -> AsyncIterator[Any]:
        room = self.request.path_params["room"]
        yield Event("42", id=1)  # text that happens to be JSON: it stays text
        yield Event(Tick(n=1, room=room), event="tick", id=2)
        yield Event(Note("hello"), event="note", id=3)
        yield Event({"user": "ann", "online": True}, event="presence", id=4)
        yield Event("open", event="state", id=5)
        yield Event(7, event="count", id=6)
        await anyio.sleep_forever()


router = StreamRouter()
router.add_stream("/rooms/{room}", RoomView)

app = FastAPI()
app.include_router(router, prefix="/events", dependencies=[Depends(require_token)])
app.router.routes.append(js_route("/sseviews.js"))


@app.get("/", response_class=HTMLResponse)
async def page() -> str:
    return PAGE


if os.environ.get("TS_DIR"):
    app.mount("/ts", StaticFiles(directory=os.environ["TS_DIR"]))
