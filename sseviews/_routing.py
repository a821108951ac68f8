"""`StreamRouter`, a Starlette router with helpers for registering stream views."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from starlette.routing import Route, Router

from ._checks import nothing_to_stream
from ._views import EventStreamView

__all__ = ["StreamRouter"]

V = TypeVar("V", bound=type[EventStreamView])


class StreamRouter(Router):
    """A Starlette `Router` for `EventStreamView` routes.

    Mount it (`app.mount("/events", router)`, in Starlette or FastAPI) or include
    its `.routes`. Each stream route answers GET and HEAD; other methods fall
    through to other routes at the same path, or get 405 with an `Allow` header.

    For FastAPI's `app.include_router()`, with its dependencies and OpenAPI docs,
    use `sseviews.fastapi.StreamRouter`.
    """

    def add_stream(self, path: str, view: type[EventStreamView], name: str | None = None) -> None:
        """Register `view` at `path`.

        Args:
            path: A Starlette path, for example `"/rooms/{room}"`.
            view: An `EventStreamView` subclass (the class, not an instance).
            name: The route name for `url_path_for`; the class name when omitted.

        Raises:
            TypeError: `view` is not an `EventStreamView` subclass, or it has
                nothing to stream (no `events()`, no `broadcast`, no `groups`).
        """
        if not (isinstance(view, type) and issubclass(view, EventStreamView)):
            raise TypeError(f"add_stream() expects an EventStreamView subclass, got {view!r}")
        problem = nothing_to_stream(view, EventStreamView)
        if problem is not None:
            raise TypeError(problem)
        self.routes.append(Route(path, view, methods=["GET", "HEAD"], name=name))

    def stream(self, path: str, name: str | None = None) -> Callable[[V], V]:
        """Class decorator form of `add_stream`: `@router.stream("/clock")`."""

        def register(view: V) -> V:
            self.add_stream(path, view, name=name)
            return view

        return register

    def _contains_router(self, router: Any, seen: Any = None) -> bool:
        # FastAPI's include_router() calls this on the router it includes: say what
        # to use instead of failing with an AttributeError.
        raise TypeError(
            "app.include_router() needs an APIRouter: use sseviews.fastapi.StreamRouter, "
            "whose streams get FastAPI's dependencies and OpenAPI docs, "
            'or mount this one with app.mount("/prefix", router)'
        )
