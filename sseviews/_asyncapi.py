"""`asyncapi(app)`: an AsyncAPI 3.0 document describing every event stream of an app."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from starlette.routing import Host, Mount

from ._admission import MAX_LAST_EVENT_ID_BYTES
from ._eventtypes import UNNAMED
from ._reserved import ERROR_EVENT, RESET_EVENT
from ._schema import content_type, generate_schemas
from ._views import EventStreamView

__all__ = ["asyncapi", "stream_routes"]

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
        "groups": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["reason", "head", "groups"],
}


_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"reason": {"type": "string", "const": "error"}},
    "required": ["reason"],
}


def _view_of(route: Any) -> type[EventStreamView] | None:
    """The stream view a route serves: a Starlette `Route` to the view class, or a
    route whose endpoint names its view in a `view` attribute (FastAPI's)."""
    endpoint = getattr(route, "endpoint", None)
    for candidate in (endpoint, getattr(endpoint, "view", None), getattr(route, "view", None)):
        if inspect.isclass(candidate) and issubclass(candidate, EventStreamView):
            return candidate
    return None


class _Stream(NamedTuple):
    """A stream route found in an app, and where FastAPI documents it."""

    path: str
    name: str
    view: type[EventStreamView]
    # The routes FastAPI's OpenAPI is generated from, and the stream's path there;
    # None for a route that is not a FastAPI path operation.
    level: Sequence[Any] | None
    local_path: str


def _streams(routes: Sequence[Any], prefix: str, level: Sequence[Any]) -> Iterator[_Stream]:
    for route in routes:
        view = _view_of(route)
        if view is not None:
            path = getattr(route, "path", "")
            name = getattr(route, "name", None) or view.__name__
            # A FastAPI path operation (or its included form) has a dependant.
            documented = level if hasattr(route, "dependant") else None
            local = getattr(route, "path_format", None) or path
            yield _Stream(prefix + path, name, view, documented, local)
        elif callable(getattr(route, "effective_route_contexts", None)):
            # Newer FastAPI versions include a router lazily: one route stands for the
            # included router, and lists its routes with the include's prefix.
            yield from _streams(list(route.effective_route_contexts()), prefix, level)
        elif isinstance(route, Mount):
            yield from _streams(route.routes, prefix + route.path, route.routes)
        elif isinstance(route, Host):
            yield from _streams(route.routes, prefix, route.routes)


def stream_routes(app: Any, caller: str = "asyncapi()") -> list[_Stream]:
    """Every stream route of `app`, once each, in the order `asyncapi()` lists them.

    Raises:
        TypeError: `app` has no routes to walk.
    """
    routes = getattr(app, "routes", None)
    if not isinstance(routes, Sequence):
        raise TypeError(f"{caller} expects a Starlette or FastAPI app or a router, got {app!r}")
    streams: list[_Stream] = []
    seen: set[tuple[str, str, type[EventStreamView]]] = set()
    for stream in _streams(routes, "", routes):
        if stream[:3] not in seen:  # FastAPI adds HEAD as its own route
            seen.add(stream[:3])
            streams.append(stream)
    return streams


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
    # A view without a docstring of its own inherits EventStreamView's.
    if not doc or doc == inspect.getdoc(EventStreamView):
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


_REF_PREFIX = "#/components/schemas/"


def _renamed(schema: Any, names: Mapping[str, str]) -> Any:
    """`schema` with its `$ref`s to components renamed as `names` says."""
    if isinstance(schema, list):
        return [_renamed(item, names) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: _renamed(value, names) for key, value in schema.items()}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith(_REF_PREFIX):
        name = ref.removeprefix(_REF_PREFIX)
        result["$ref"] = _REF_PREFIX + names.get(name, name)
    return result


def _security_scheme(scheme: Mapping[str, Any]) -> dict[str, Any] | None:
    """An OpenAPI security scheme as AsyncAPI 3.0 writes it; None if it has no match."""
    kind = scheme.get("type")
    result: dict[str, Any]
    if kind == "apiKey":
        result = {"type": "httpApiKey", "name": scheme.get("name"), "in": scheme.get("in")}
    elif kind == "http":
        result = {"type": "http", "scheme": scheme.get("scheme")}
        if scheme.get("bearerFormat"):
            result["bearerFormat"] = scheme["bearerFormat"]
    elif kind == "oauth2":
        flows = {
            name: {
                **{key: value for key, value in flow.items() if key != "scopes"},
                "availableScopes": flow.get("scopes", {}),
            }
            for name, flow in scheme.get("flows", {}).items()
        }
        result = {"type": "oauth2", "flows": flows}
    elif kind == "openIdConnect":
        result = {"type": "openIdConnect", "openIdConnectUrl": scheme.get("openIdConnectUrl")}
    else:
        return None
    if scheme.get("description"):
        result["description"] = scheme["description"]
    return result


class _Parameters:
    """The request parameters of FastAPI streams, as the app's OpenAPI documents them.

    The dependencies of the app, of `include_router()`, of the route and of the
    view's annotated attributes can require query parameters, headers and cookies
    (a `token`, say). FastAPI's own `get_openapi()` lists them, flattened, so they
    are read from it: the same names, schemas and `required` flags as in
    `/openapi.json`.
    """

    def __init__(self, definitions: dict[str, Any]) -> None:
        self._definitions = definitions  # the AsyncAPI document's components/schemas
        self._documents: dict[int, dict[str, Any]] = {}
        self._names: dict[tuple[int, str], str] = {}
        #: The security schemes the operations refer to, for components/securitySchemes.
        self.security_schemes: dict[str, Any] = {}

    def _operation(self, level: Sequence[Any], local_path: str) -> tuple[Any, Any]:
        document = self._documents.get(id(level))
        if document is None:
            from fastapi.openapi.utils import get_openapi

            document = get_openapi(title="streams", version="0", routes=list(level))
            self._documents[id(level)] = document
        return document.get("paths", {}).get(local_path, {}).get("get", {}), document

    def of(self, level: Sequence[Any], local_path: str) -> list[dict[str, Any]]:
        """The OpenAPI parameter objects of the GET operation at `local_path`."""
        operation, document = self._operation(level, local_path)
        parameters: list[dict[str, Any]] = operation.get("parameters", [])
        components: dict[str, Any] = document.get("components", {}).get("schemas", {})
        return [self._imported(id(level), parameter, components) for parameter in parameters]

    def security(self, level: Sequence[Any], local_path: str) -> list[dict[str, Any]]:
        """References to the security schemes (`Security` dependencies, such as
        `HTTPBearer`) of the GET operation at `local_path`: any one of them opens it."""
        operation, document = self._operation(level, local_path)
        schemes = document.get("components", {}).get("securitySchemes", {})
        found: list[dict[str, Any]] = []
        for requirement in operation.get("security", []):
            for name in requirement:
                converted = _security_scheme(schemes.get(name, {}))
                if converted is None:
                    continue
                key, number = _UNSAFE_KEY.sub("_", name), 2
                while self.security_schemes.get(key, converted) != converted:
                    key = f"{_UNSAFE_KEY.sub('_', name)}_{number}"
                    number += 1
                self.security_schemes[key] = converted
                reference = {"$ref": f"#/components/securitySchemes/{key}"}
                if reference not in found:
                    found.append(reference)
        return found

    def _imported(self, key: int, schema: Any, components: Mapping[str, Any]) -> Any:
        """`schema`, its referenced components added to the document's definitions
        (under another name when the document already has a different one)."""
        used: list[str] = []
        pending = [schema]
        while pending:
            item = pending.pop()
            if isinstance(item, list):
                pending.extend(item)
            elif isinstance(item, dict):
                ref = item.get("$ref")
                if isinstance(ref, str) and ref.startswith(_REF_PREFIX):
                    name = ref.removeprefix(_REF_PREFIX)
                    if name not in used and name in components:
                        used.append(name)
                        pending.append(components[name])
                pending.extend(item.values())
        for name in used:
            if (key, name) in self._names:
                continue
            target, number = name, 2
            while target in self._definitions and self._definitions[target] != components[name]:
                target = f"{name}{number}"
                number += 1
            self._names[key, name] = target
        names = {name: self._names[key, name] for name in used}
        for name in used:
            self._definitions.setdefault(names[name], _renamed(components[name], names))
        return _renamed(schema, names)


def asyncapi(app: Any, *, title: str | None = None, version: str | None = None) -> dict[str, Any]:
    """Describe every event stream of `app` as an AsyncAPI 3.0 document.

    Each route to an `EventStreamView` (in the app, in mounted routers and apps, a
    `StreamRouter` included) becomes a channel whose address is its path, with one
    `send` operation: the app sends the events, the client opens the stream with
    GET. Each event name the view declares in `event_types` becomes a message with
    the JSON Schema of its payload; a view without `event_types` gets one generic
    message. The `Last-Event-ID` header and `lastEventId` query parameter used to
    resume are described on each operation. For a FastAPI path operation, the
    parameters its dependencies require (of the app, `include_router()`, the route
    and the view's attributes) are listed as `/openapi.json` lists them, in the
    `x-parameters` extension, and the query parameters in the HTTP binding too;
    its `Security` dependencies (`HTTPBearer`, `APIKeyQuery`, ...) become the
    operation's `security`.

    Args:
        app: A Starlette or FastAPI app, or a router.
        title: The document's title (default: a FastAPI app's title, else "Event streams").
        version: The API's version (default: a FastAPI app's version, else "1.0.0").

    Returns:
        The document, a dict ready for `json.dumps`.

    Raises:
        TypeError: `app` has no routes to walk.
    """
    streams = stream_routes(app)

    payloads: list[tuple[Any, Any]] = []
    for index, (_, _, view, _, _) in enumerate(streams):
        for name, tp in (view.event_types or {}).items():
            payloads.append(((index, name), tp))
    schemas, definitions = generate_schemas(payloads, _SCHEMA_REFS)
    documented = _Parameters(definitions)

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    taken: set[str] = set()
    for index, (path, route_name, view, level, local_path) in enumerate(streams):
        key = _unique(route_name, taken)
        openapi = documented.of(level, local_path) if level is not None else []
        security = documented.security(level, local_path) if level is not None else []
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
        messages[_unique(ERROR_EVENT, message_keys)] = _message(
            ERROR_EVENT,
            _ERROR_SCHEMA,
            "application/json",
            "Sent last when the stream failed (its events() raised), with a `retry` "
            "that makes clients back off; the details are in the server's log only",
        )
        address = _PARAMETER.sub(r"{\1}", path) or "/"
        channel: dict[str, Any] = {"address": address, "title": view.__name__, "messages": messages}
        described = _summary(view)
        if described is not None:
            channel["description"] = described
        parameters = _PARAMETER.findall(path)
        if parameters:
            described_path = {
                each["name"]: each["description"]
                for each in openapi
                if each.get("in") == "path" and each.get("description")
            }
            channel["parameters"] = {
                name: {"description": described_path.get(name, f"The `{name}` path parameter.")}
                for name in parameters
            }
        channels[key] = channel
        query: dict[str, Any] = {
            "lastEventId": {
                "type": "string",
                "maxLength": MAX_LAST_EVENT_ID_BYTES,
                "description": "Resume after this event id, when the "
                "`Last-Event-ID` header is not sent.",
            }
        }
        required: list[str] = []
        for each in openapi:
            if each.get("in") == "query":
                schema = dict(each.get("schema", {}))
                if each.get("description"):
                    schema["description"] = each["description"]
                query[each["name"]] = schema
                if each.get("required"):
                    required.append(each["name"])
        query_schema: dict[str, Any] = {"type": "object", "properties": query}
        if required:
            query_schema["required"] = required
        operations[key] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{key}"},
            "summary": f"{view.__name__} streams these events (GET {address}).",
            "description": _RESUME,
            "messages": [{"$ref": f"#/channels/{key}/messages/{each}"} for each in messages],
            "bindings": {
                "http": {"method": "GET", "query": query_schema, "bindingVersion": "0.3.0"}
            },
            "x-last-event-id": {
                "header": "Last-Event-ID",
                "query": "lastEventId",
                "maxBytes": MAX_LAST_EVENT_ID_BYTES,
            },
        }
        if openapi:
            # Headers and cookies have no place in AsyncAPI's HTTP binding: every
            # parameter is listed here as /openapi.json has it.
            operations[key]["x-parameters"] = openapi
        if security:
            operations[key]["security"] = security

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
    if documented.security_schemes:
        document.setdefault("components", {})["securitySchemes"] = documented.security_schemes
    return document
