"""In-process apps for the tests: a Starlette app whose lifespan connects a broadcast."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from sseviews import Broadcast


def app_for(
    broadcast: Broadcast, *routes: BaseRoute, middleware: Sequence[Middleware] = ()
) -> Starlette:
    """A Starlette app of `routes` (under `middleware`) whose lifespan connects
    `broadcast` at startup and disconnects it at shutdown."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with broadcast:
            yield

    return Starlette(routes=list(routes), middleware=list(middleware), lifespan=lifespan)
