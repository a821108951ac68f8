"""`asyncapi(app)`: an AsyncAPI 3.0 document describing every event stream of an app."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator, Sequence
from typing import Any

from starlette.routing import Host, Mount

from ._broadcast import RESET_EVENT
from ._eventtypes import UNNAMED
from ._schema import content_type, generate_schemas
from ._views import MAX_LAST_EVENT_ID_BYTES, EventStreamView

__all__ = ["asyncapi"]

_PARAMETER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[A-Za-z_][A-Za-z0-9_]*)?\}")
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_\-]")
_SCHEMA_REFS = "#/components/schemas/{model}"
_RESUME = (
    "A client that reconnects sends the id of the last event it received in the "
    "`Last-Event-ID` header (browsers do this by themselves), or in the `lastEventId` "
    "query parameter when it cannot set headers; a view that streams a Broadcast's "
    "groups then resumes right after that event."
)
_RESET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reason": {"type": "string", "enum": ["expired", "unknown_epoch", "ahead"]},
        "head": {"type": "string"},
    },
    "required": ["reason", "head"],
}


def _view_of(route: Any) -> type[EventStreamView] | None:
    """The stream view a route serves: a Starlette `Route` to the view class, or a
    route whose endpoint names its view in a `view` attribute (FastAPI's)."""
    endpoint = getattr(route, "endpoint", None)
    for candidate in (endpoint, getattr(endpoint, "view", None), getattr(route, "view", None)):
        if inspect.isclass(candidate) and issubclass(candidate, EventStreamView):
            return candidate
    return None


def _streams(
    routes: Sequence[Any], prefix: str
) -> Iterator[tuple[str, str, type[EventStreamView]]]:
    for route in routes:
        view = _view_of(route)
        if view is not None:
            path = getattr(route, "path", "")
            yield prefix + path, getattr(route, "name", None) or view.__name__, view
        elif callable(getattr(route, "effective_route_contexts", None)):
            # Newer FastAPI versions include a router lazily: one route stands for the
            # included router, and lists its routes with the include's prefix.
            yield from _streams(list(route.effective_route_contexts()), prefix)
        elif isinstance(route, Mount):
            yield from _streams(route.routes, prefix + route.path)
        elif isinstance(route, Host):
            yield from _streams(route.routes, prefix)


def _unique(key: str, taken: set[str]) -> str:
    key = _UNSAFE_KEY.sub("_", key) or "stream"
    candidate, number = key, 2
    while candidate in taken:
        candidate = f"{key}_{number}"
        number += 1
    taken.add(candidate)
    return candidate


def _summary(view: type[EventStreamView]) -> str | None:
    doc = inspect.getdoc(view)
    if not doc or view.__doc__ is EventStreamView.__doc__:
        return None
    return doc.split("\n\n")[0].replace("\n", " ")


def _message(name: str, payload: dict[str, Any], media_type: str, summary: str) -> dict[str, Any]:
    event_field: dict[str, Any] = (
        {"type": "string", "enum": [UNNAMED], "description": "absent for unnamed events"}
        if name == UNNAMED
        else {"type": "string", "const": name}
    )
    return {
        "name": name,
        "summary": summary,
        "contentType": media_type,
        "headers": {
            "type": "object",
            "description": "The event's SSE fields besides `data`.",
            "properties": {
                "event": event_field,
                "id": {
                    "type": "string",
                    "description": "The event id, sent back as `Last-Event-ID` to resume.",
                },
                "retry": {"type": "integer", "minimum": 0},
            },
        },
        "payload": payload,
    }


def asyncapi(app: Any, *, title: str | None = None, version: str | None = None) -> dict[str, Any]:
    """Describe every event stream of `app` as an AsyncAPI 3.0 document.

    Each route to an `EventStreamView` (in the app, in mounted routers and apps, a
    `StreamRouter` included) becomes a channel whose address is its path, with one
    `send` operation: the app sends the events, the client opens the stream with
    GET. Each event name the view declares in `event_types` becomes a message with
    the JSON Schema of its payload; a view without `event_types` gets one generic
    message. The `Last-Event-ID` header and `lastEventId` query parameter used to
    resume are described on each operation.

    Args:
        app: A Starlette or FastAPI app, or a router.
        title: The document's title (default: a FastAPI app's title, else "Event streams").
        version: The API's version (default: a FastAPI app's version, else "1.0.0").

    Returns:
        The document, a dict ready for `json.dumps`.

    Raises:
        TypeError: `app` has no routes to walk.
    """
    routes = getattr(app, "routes", None)
    if not isinstance(routes, Sequence):
        raise TypeError(f"asyncapi() expects a Starlette or FastAPI app or a router, got {app!r}")
    streams = list(dict.fromkeys(_streams(routes, "")))  # FastAPI adds HEAD as its own route

    payloads: list[tuple[Any, Any]] = []
    for index, (_, _, view) in enumerate(streams):
        for name, tp in (view.event_types or {}).items():
            payloads.append(((index, name), tp))
    schemas, definitions = generate_schemas(payloads, _SCHEMA_REFS)

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    taken: set[str] = set()
    for index, (path, route_name, view) in enumerate(streams):
        key = _unique(route_name, taken)
        messages: dict[str, Any] = {}
        message_keys: set[str] = set()
        declared = view.event_types
        if declared:
            for name, tp in declared.items():
                summary = f"The `{name}` event" if name != UNNAMED else "An unnamed event"
                payload = schemas[(index, name)]
                message = _message(name, payload, content_type(tp), summary)
                messages[_unique(name, message_keys)] = message
        else:
            messages[_unique(UNNAMED, message_keys)] = _message(
                UNNAMED,
                {"type": "string"},
                "text/plain",
                "Any event: this view declares no event_types",
            )
        if view.broadcast is not None:
            messages[_unique(RESET_EVENT, message_keys)] = _message(
                RESET_EVENT,
                _RESET_SCHEMA,
                "application/json",
                "Sent by the Broadcast when the history cannot resume after Last-Event-ID",
            )
        address = _PARAMETER.sub(r"{\1}", path) or "/"
        channel: dict[str, Any] = {"address": address, "title": view.__name__, "messages": messages}
        described = _summary(view)
        if described is not None:
            channel["description"] = described
        parameters = _PARAMETER.findall(path)
        if parameters:
            channel["parameters"] = {
                name: {"description": f"The `{name}` path parameter."} for name in parameters
            }
        channels[key] = channel
        operations[key] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{key}"},
            "summary": f"{view.__name__} streams these events (GET {address}).",
            "description": _RESUME,
            "messages": [{"$ref": f"#/channels/{key}/messages/{each}"} for each in messages],
            "bindings": {
                "http": {
                    "method": "GET",
                    "query": {
                        "type": "object",
                        "properties": {
                            "lastEventId": {
                                "type": "string",
                                "maxLength": MAX_LAST_EVENT_ID_BYTES,
                                "description": "Resume after this event id, when the "
                                "`Last-Event-ID` header is not sent.",
                            }
                        },
                    },
                    "bindingVersion": "0.3.0",
                }
            },
            "x-last-event-id": {
                "header": "Last-Event-ID",
                "query": "lastEventId",
                "maxBytes": MAX_LAST_EVENT_ID_BYTES,
            },
        }

    document: dict[str, Any] = {
        "asyncapi": "3.0.0",
        "info": {
            "title": title or getattr(app, "title", None) or "Event streams",
            "version": version or getattr(app, "version", None) or "1.0.0",
            "description": "Server-Sent Events streams (`text/event-stream`).",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
    }
    if definitions:
        document["components"] = {"schemas": definitions}
    return document
