"""FastAPI integration: stream views as FastAPI path operations.

`sseviews.fastapi.StreamRouter` is an `APIRouter` whose `add_stream`/`stream`
register an `EventStreamView` as a GET path operation. Include it like any
`APIRouter`, with `app.include_router(router, prefix=..., dependencies=[...],
tags=[...])`: FastAPI then resolves the app's, the include's and the route's
dependencies before the view's `on_connect()`, and documents the stream in
`/openapi.json` with a `text/event-stream` response.

A view receives dependency values through annotated class attributes, which
FastAPI resolves per request and sets on the view instance before `on_connect()`:

    class ClockView(EventStreamView):
        user: Annotated[User, Depends(current_user)]
        since: Annotated[int, Query()] = 0

This module needs FastAPI (`pip install "sseviews[fastapi]"`); `import sseviews`
never imports it.
"""

from __future__ import annotations

import copy
import inspect
import re
import sys
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Annotated, Any, ClassVar, TypeVar

from fastapi import APIRouter, params
from fastapi import Path as FastAPIPath
from starlette.background import BackgroundTask
from starlette.convertors import (
    Convertor,
    FloatConvertor,
    IntegerConvertor,
    PathConvertor,
    StringConvertor,
    UUIDConvertor,
)
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import Receive, Scope, Send

from . import _routing
from ._checks import nothing_to_stream
from ._eventtypes import UNNAMED
from ._schema import content_type, event_schemas
from ._views import EventStreamView

__all__ = ["StreamRouter"]

V = TypeVar("V", bound=type[EventStreamView])

# The item schema FastAPI's own `fastapi.sse` documents (OpenAPI 3.2, "Special
# Considerations for Server-Sent Events"): one object per event.
_SSE_FIELDS: dict[str, Any] = {
    "data": {"type": "string"},
    "event": {"type": "string"},
    "id": {"type": "string"},
    "retry": {"type": "integer", "minimum": 0},
}

# What a view instance already uses: an injected attribute may not shadow it.
_INSTANCE_NAMES = frozenset({"scope", "receive", "send"})


class _ViewResponse(Response):
    """What the path operation returns: running it runs the view on this request.

    The view runs in the request task, inside FastAPI's request: dependencies with
    `yield` (the default `scope="request"`) are cleaned up after it returns, that
    is after `on_disconnect()`.
    """

    # Documentation only: the view sends its own headers; `add_stream` documents
    # the `text/event-stream` content itself (with each declared event).
    media_type = None

    def __init__(
        self,
        view: type[EventStreamView] | None = None,
        values: Mapping[str, Any] | None = None,
        status_code: int = 200,
    ) -> None:
        # Response.__init__ would render a body: the view sends its own.
        self.view = view
        self.values = values or {}
        self.status_code = status_code
        self.background: BackgroundTask | None = None
        self.raw_headers = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.view is not None
        instance = self.view(scope, receive, send)
        for name, value in self.values.items():
            setattr(instance, name, value)
        await instance
        if self.background is not None:
            await self.background()


def _is_fastapi_param(marker: Any) -> bool:
    return isinstance(marker, params.Depends | params.Param | params.Body)


def _cleaned_up_before_view(marker: params.Depends, annotation: Any) -> bool:
    """True for a `yield` dependency that FastAPI closes when the endpoint returns."""
    if getattr(marker, "scope", None) != "function":
        return False
    dependency = marker.dependency
    if dependency is None:  # Depends() in Annotated: the type itself is the dependency
        args = typing.get_args(annotation)
        dependency = args[0] if args else annotation
    return inspect.isgeneratorfunction(dependency) or inspect.isasyncgenfunction(dependency)


def _injected_parameters(view: type[EventStreamView]) -> list[inspect.Parameter]:
    """The view's annotated class attributes that FastAPI resolves: `Depends`,
    `Security`, `Query`, `Header`, `Cookie` and `Path`, in `Annotated` or as the default.
    """
    base = set(EventStreamView.__mro__)
    found: dict[str, inspect.Parameter] = {}
    for klass in reversed(view.__mro__):
        if klass in base:
            continue
        annotations: dict[str, Any] = inspect.get_annotations(klass)
        module = sys.modules.get(klass.__module__)
        namespace = dict(vars(module)) if module is not None else {}
        for name, written in annotations.items():
            annotation: Any = written
            default = klass.__dict__.get(name, inspect.Parameter.empty)
            if isinstance(annotation, str):
                try:
                    annotation = eval(annotation, namespace, dict(vars(klass)))
                except Exception as exc:
                    if _is_fastapi_param(default) or any(
                        word in annotation
                        for word in ("Depends", "Security", "Query", "Header", "Cookie", "Path")
                    ):
                        raise TypeError(
                            f"{view.__name__}.{name}: cannot evaluate the annotation "
                            f"{annotation!r} ({exc}); FastAPI needs its type at import time"
                        ) from None
                    continue
            if annotation is ClassVar or typing.get_origin(annotation) is ClassVar:
                continue
            markers = [default]
            if typing.get_origin(annotation) is Annotated:
                markers.extend(annotation.__metadata__)
            marker = next((m for m in markers if _is_fastapi_param(m)), None)
            if marker is None:
                found.pop(name, None)  # a subclass may redeclare it as a plain attribute
                continue
            if isinstance(marker, params.Body):
                raise TypeError(
                    f"{view.__name__}.{name}: a stream is a GET request without a body; "
                    "use Depends, Security, Query, Header, Cookie or Path"
                )
            if isinstance(marker, params.Depends) and _cleaned_up_before_view(marker, annotation):
                raise TypeError(
                    f"{view.__name__}.{name}: a dependency with yield and scope='function' is "
                    "cleaned up before the stream starts, so the view would use it after its "
                    "cleanup; use the default scope (cleaned up after on_disconnect), or "
                    "session_factory for a database session used in events()"
                )
            if name in _INSTANCE_NAMES or hasattr(EventStreamView, name):
                raise TypeError(
                    f"{view.__name__}.{name}: the name is taken by EventStreamView; "
                    "choose another attribute name for this dependency"
                )
            found[name] = inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default
            )
    return list(found.values())


# The type each Starlette path convertor gives a path parameter, for the docs.
_CONVERTOR_TYPES: dict[type[Convertor[Any]], Any] = {
    StringConvertor: str,
    PathConvertor: str,
    IntegerConvertor: int,
    FloatConvertor: float,
    UUIDConvertor: uuid.UUID,
}


def _endpoint(view: type[EventStreamView], path: str) -> Callable[..., Any]:
    parameters = _injected_parameters(view)
    declared = {parameter.name for parameter in parameters}
    # Path parameters the view does not declare are documented (OpenAPI requires
    # each one) but not set on the view: it reads them from request.path_params.
    documented_only = []
    for name, convertor in compile_path(path)[2].items():
        if name not in declared:
            kind = _CONVERTOR_TYPES.get(type(convertor), Any)
            annotation = Annotated[kind, FastAPIPath()]  # type: ignore[valid-type]
            documented_only.append(
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation)
            )
    skipped = frozenset(parameter.name for parameter in documented_only)

    async def endpoint(**values: Any) -> Response:
        for name in skipped:
            del values[name]
        return _ViewResponse(view, values)

    # FastAPI reads the parameters to resolve from the signature.
    endpoint.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [*documented_only, *parameters], return_annotation=Response
    )
    endpoint.__name__ = view.__name__
    endpoint.__qualname__ = view.__qualname__
    endpoint.__module__ = view.__module__
    endpoint.__doc__ = view.__doc__
    endpoint.view = view  # type: ignore[attr-defined]  # sseviews.asyncapi() finds the view here
    return endpoint


class _Recursive(Exception):
    """A schema that refers to itself: it cannot be inlined."""


def _inline_refs(schema: Any, defs: Mapping[str, Any], seen: frozenset[str]) -> Any:
    if isinstance(schema, list):
        return [_inline_refs(item, defs, seen) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        name = ref.removeprefix("#/$defs/")
        if name in seen:
            raise _Recursive(name)
        rest = {key: value for key, value in schema.items() if key != "$ref"}
        return {**_inline_refs(defs[name], defs, seen | {name}), **rest}
    return {key: _inline_refs(value, defs, seen) for key, value in schema.items() if key != "$defs"}


def _standalone(schema: dict[str, Any], uri: str) -> dict[str, Any]:
    """`schema` without references out of it, wherever it is placed in a document.

    OpenAPI resolves `#/$defs/...` against the document's root, so definitions are
    inlined; a recursive type keeps its `$defs` under an `$id` of its own instead.
    """
    defs = schema.get("$defs")
    if not defs:
        return schema
    try:
        inlined: dict[str, Any] = _inline_refs(schema, defs, frozenset())
    except _Recursive:
        return {"$id": uri, **schema}
    return inlined


def _item_schema(view: type[EventStreamView]) -> dict[str, Any]:
    """The OpenAPI `itemSchema` of `view`'s `text/event-stream` response.

    One object per event (`data`, `event`, `id`, `retry`), as FastAPI's own
    `fastapi.sse` documents it. A view that declares `event_types` gets one `oneOf`
    branch per event name, with the schema of its payload: the `contentSchema` of
    a JSON `data`, or the schema of `data` itself for text payloads.
    """
    schemas = event_schemas(view)
    if not schemas:
        return {"type": "object", "properties": copy.deepcopy(_SSE_FIELDS)}
    declared: Mapping[str, Any] = view.event_types or {}
    where = re.sub(r"[^A-Za-z0-9._-]", "-", f"{view.__module__}.{view.__qualname__}")
    branches = []
    for name, schema in schemas.items():
        payload = _standalone(schema, f"urn:sseviews:{where}:{name}")
        properties = copy.deepcopy(_SSE_FIELDS)
        if content_type(declared[name]) == "application/json":
            properties["data"] = {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": payload,
            }
        else:
            properties["data"] = payload
        properties["event"] = {"type": "string", "const": name}
        # Unnamed events reach the browser as "message": they need no event field.
        required = ["data"] if name == UNNAMED else ["event", "data"]
        branches.append(
            {"title": name, "type": "object", "properties": properties, "required": required}
        )
    if len(branches) == 1:
        return branches[0]
    return {"oneOf": branches}


class StreamRouter(APIRouter, _routing.StreamRouter):
    """An `APIRouter` for `EventStreamView` routes, to pass to `app.include_router()`.

    It takes every `APIRouter` argument (`prefix`, `dependencies`, `tags`, ...) and
    holds ordinary path operations too. Each stream is a GET path operation (plus an
    undocumented HEAD): FastAPI resolves its dependencies before the view's
    `on_connect()` and documents it in `/openapi.json` as a `text/event-stream`
    response.
    """

    def add_stream(
        self,
        path: str,
        view: type[EventStreamView],
        name: str | None = None,
        *,
        dependencies: Sequence[params.Depends] | None = None,
        tags: list[str | Enum] | None = None,
        summary: str | None = None,
        description: str | None = None,
        response_description: str = "An endless `text/event-stream`",
        responses: dict[int | str, dict[str, Any]] | None = None,
        deprecated: bool | None = None,
        operation_id: str | None = None,
        include_in_schema: bool = True,
    ) -> None:
        """Register `view` at `path` as a GET path operation.

        Args:
            path: A path, for example `"/rooms/{room}"`, after the router's prefix.
            view: An `EventStreamView` subclass (the class, not an instance).
            name: The route name for `url_path_for`; the class name when omitted.
            dependencies: Dependencies run before `on_connect()`, after the app's,
                the `include_router()` call's and the router's.
            tags: OpenAPI tags, added to the router's.
            summary: The OpenAPI summary.
            description: The OpenAPI description; the view's docstring when omitted.
            response_description: The description of the 200 response.
            responses: More OpenAPI responses, as for any path operation.
            deprecated: Mark the operation deprecated in OpenAPI.
            operation_id: The OpenAPI operation id.
            include_in_schema: False leaves the stream out of `/openapi.json`.

        Raises:
            TypeError: `view` is not an `EventStreamView` subclass, it has nothing
                to stream (no `events()`, no `broadcast`, no `groups`), or one of
                its annotated attributes cannot be resolved by FastAPI.
        """
        if not (isinstance(view, type) and issubclass(view, EventStreamView)):
            raise TypeError(f"add_stream() expects an EventStreamView subclass, got {view!r}")
        problem = nothing_to_stream(view, EventStreamView)
        if problem is not None:
            raise TypeError(problem)
        endpoint = _endpoint(view, path)
        documented: dict[int | str, dict[str, Any]] = {
            200: {
                "description": response_description,
                "content": {"text/event-stream": {"itemSchema": _item_schema(view)}},
            }
        }
        documented.update(responses or {})
        self.add_api_route(
            path,
            endpoint,
            methods=["GET"],
            name=name or view.__name__,
            response_model=None,
            response_class=_ViewResponse,
            response_description=response_description,
            responses=documented,
            dependencies=dependencies,
            tags=tags,
            summary=summary,
            description=description,
            deprecated=deprecated,
            operation_id=operation_id,
            include_in_schema=include_in_schema,
        )
        # HEAD is answered as GET would be, with the same dependencies; a second
        # operation in OpenAPI would only repeat the first.
        self.add_api_route(
            path,
            endpoint,
            methods=["HEAD"],
            name=name or view.__name__,
            response_model=None,
            response_class=_ViewResponse,
            dependencies=dependencies,
            include_in_schema=False,
        )

    def stream(
        self,
        path: str,
        name: str | None = None,
        **options: Any,
    ) -> Callable[[V], V]:
        """Class decorator form of `add_stream`: `@router.stream("/clock", tags=[...])`."""

        def register(view: V) -> V:
            self.add_stream(path, view, name=name, **options)
            return view

        return register
