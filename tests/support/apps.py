"""In-process apps for the tests: a Starlette app whose lifespan connects a broadcast,
and the presence tests' member view."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route

from sseviews import Broadcast, EventStreamView


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


def member_view(broadcast: Broadcast, **settings: Any) -> type[EventStreamView]:
    """Streams `room:{room}`, present as `{"user": ?user}` when `?user=` is given."""

    def groups(self: EventStreamView) -> list[str]:
        return [f"room:{self.request.path_params['room']}"]

    def presence_info(self: EventStreamView) -> dict[str, Any] | None:
        user = self.request.query_params.get("user")
        return {"user": user} if user else None

    attrs: dict[str, Any] = {
        "broadcast": broadcast,
        "groups": groups,
        "presence_info": presence_info,
        "ping_interval": None,
    }
    attrs.update(settings)
    return type("MemberView", (EventStreamView,), attrs)


def room_app(broadcast: Broadcast, view: type[EventStreamView]) -> Starlette:
    """`view` at `/room/{room}`, in an app whose lifespan connects `broadcast`."""
    return app_for(broadcast, Route("/room/{room}", view))


def member_app(broadcast: Broadcast, **settings: Any) -> Starlette:
    """`member_view(broadcast, **settings)` in a `room_app()`."""
    return room_app(broadcast, member_view(broadcast, **settings))
