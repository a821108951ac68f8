"""A FastAPI app that includes a `sseviews.fastapi.StreamRouter` with a prefix and an
app-wide token dependency, for `tests/test_fastapi.py` to serve with uvicorn."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Header, HTTPException

from sseviews import Event, EventStreamView
from sseviews.fastapi import StreamRouter


async def require_token(x_token: Annotated[str | None, Header()] = None) -> str:
    if x_token != "secret":
        raise HTTPException(401, "a valid X-Token header is required")
    return x_token


async def current_user(token: Annotated[str, Depends(require_token)]) -> str:
    return f"user-of-{token}"


router = StreamRouter(tags=["streams"])


@router.stream("/ticks/{start:int}")
class TickView(EventStreamView):
    ping_interval = 1.0
    user: Annotated[str, Depends(current_user)]

    async def events(self) -> AsyncIterator[Any]:
        n = self.request.path_params["start"]
        while True:
            yield Event({"n": n, "user": self.user}, event="tick", id=n)
            n += 1
            await anyio.sleep(0.05)


app = FastAPI(dependencies=[Depends(require_token)])
app.include_router(router, prefix="/events")


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
