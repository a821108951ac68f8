"""`sseviews.asyncapi(app)` and `sseviews asyncapi`: documents valid against AsyncAPI 3.0.0."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import jsonschema
import pytest
from fastapi import Depends, FastAPI, Header, Query, Security
from fastapi.security import APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.routing import Mount, Route

import sseviews
from sseviews import Broadcast, EventStreamView, StreamRouter
from sseviews._cli import main

# The official schema, from the npm package @asyncapi/specs 6.11.1
# (schemas/3.0.0.json, Apache-2.0: see schemas/asyncapi-LICENSE).
SCHEMA = json.loads((Path(__file__).parent / "schemas" / "asyncapi-3.0.0.json").read_text())


def assert_valid(document: dict[str, Any]) -> None:
    validator = jsonschema.Draft7Validator(SCHEMA)
    errors = [f"{list(error.path)}: {error.message}" for error in validator.iter_errors(document)]
    assert errors == []


class Tick(BaseModel):
    n: int


@dataclasses.dataclass
class Chat:
    text: str
    user: str | None = None


class ClockView(EventStreamView):
    """Sends the time every second.

    More text that is not the summary.
    """

    event_types: ClassVar[Any] = {"tick": Tick, "state": Literal["on", "off"]}

    async def events(self) -> AsyncIterator[Any]:
        yield Tick(n=0)


class ChatView(EventStreamView):
    event_types: ClassVar[Any] = {"message": Chat, "typing/started": str}
    broadcast = Broadcast("memory://")
    groups = ("room",)


class LegacyView(EventStreamView):
    async def events(self) -> AsyncIterator[str]:
        yield "hi"


def starlette_app() -> Starlette:
    router = StreamRouter()
    router.add_stream("/rooms/{room:int}", ChatView, name="room")
    inner = Starlette(routes=[Route("/legacy", LegacyView)])
    return Starlette(
        routes=[
            Route("/clock", ClockView),
            Mount("/events", router),
            Mount("/old", inner),
            Route("/plain", lambda request: None),
        ]
    )


def test_asyncapi_is_valid_asyncapi_3() -> None:
    document = sseviews.asyncapi(starlette_app())
    assert document["asyncapi"] == "3.0.0"
    assert_valid(document)


def test_asyncapi_the_schema_rejects_a_broken_document() -> None:
    document = sseviews.asyncapi(starlette_app())
    document["operations"]["ClockView"]["action"] = "stream"
    del document["info"]["version"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, SCHEMA, cls=jsonschema.Draft7Validator)


def test_asyncapi_one_channel_per_stream_with_its_path() -> None:
    document = sseviews.asyncapi(starlette_app())
    addresses = {key: channel["address"] for key, channel in document["channels"].items()}
    assert addresses == {
        "ClockView": "/clock",
        "room": "/events/rooms/{room}",
        "LegacyView": "/old/legacy",
    }
    room = document["channels"]["room"]
    assert room["parameters"] == {"room": {"description": "The `room` path parameter."}}
    assert document["channels"]["ClockView"]["description"] == "Sends the time every second."


def test_asyncapi_messages_per_event_name_with_payload_schemas() -> None:
    document = sseviews.asyncapi(starlette_app())
    clock = document["channels"]["ClockView"]["messages"]
    assert clock["tick"]["name"] == "tick"
    assert clock["tick"]["payload"] == {"$ref": "#/components/schemas/Tick"}
    assert clock["tick"]["contentType"] == "application/json"
    assert clock["tick"]["headers"]["properties"]["event"] == {"type": "string", "const": "tick"}
    assert clock["state"]["payload"] == {"enum": ["on", "off"]}
    assert clock["state"]["contentType"] == "text/plain"
    schemas = document["components"]["schemas"]
    assert schemas["Tick"]["properties"]["n"]["type"] == "integer"
    assert schemas["Chat"]["required"] == ["text"]

    room = document["channels"]["room"]["messages"]
    assert set(room) == {"message", "typing_started", "sseviews_reset", "sseviews_error"}
    assert room["typing_started"]["name"] == "typing/started"
    assert room["message"]["headers"]["properties"]["event"]["enum"] == ["message"]
    assert room["sseviews_reset"]["name"] == sseviews.RESET_EVENT

    legacy = document["channels"]["LegacyView"]["messages"]
    assert list(legacy) == ["message", "sseviews_error"]
    assert "declares no event_types" in legacy["message"]["summary"]
    # Any stream ends with sseviews.error when its events() raises.
    error = clock["sseviews_error"]
    assert error["name"] == sseviews.ERROR_EVENT
    assert error["payload"]["properties"]["reason"] == {"type": "string", "const": "error"}


def test_asyncapi_send_operation_with_last_event_id_resume() -> None:
    document = sseviews.asyncapi(starlette_app())
    operation = document["operations"]["room"]
    assert operation["action"] == "send"  # the app sends; the document describes the app
    assert operation["channel"] == {"$ref": "#/channels/room"}
    assert {"$ref": "#/channels/room/messages/typing_started"} in operation["messages"]
    http = operation["bindings"]["http"]
    assert http["method"] == "GET"
    assert http["query"]["properties"]["lastEventId"]["maxLength"] == 8192
    assert operation["x-last-event-id"] == {
        "header": "Last-Event-ID",
        "query": "lastEventId",
        "maxBytes": 8192,
    }
    assert "Last-Event-ID" in operation["description"]


def test_asyncapi_fastapi_app_with_mounted_and_routed_streams() -> None:
    app = FastAPI(title="Clocks", version="2.1.0")
    router = StreamRouter()
    router.add_stream("/clock", ClockView)
    app.mount("/events", router)

    async def chat_endpoint() -> None:
        pass

    # What a FastAPI path operation that runs a view exposes: its view.
    chat_endpoint.view = ChatView  # type: ignore[attr-defined]
    app.add_api_route("/api/chat", chat_endpoint, methods=["GET"], name="chat")
    app.add_api_route("/api/chat", chat_endpoint, methods=["HEAD"], name="chat")
    document = sseviews.asyncapi(app)
    assert_valid(document)
    assert document["info"]["title"] == "Clocks"
    assert document["info"]["version"] == "2.1.0"
    assert {key: channel["address"] for key, channel in document["channels"].items()} == {
        "ClockView": "/events/clock",
        "chat": "/api/chat",
    }


def test_asyncapi_fastapi_include_router_streams() -> None:
    from sseviews.fastapi import StreamRouter as APIStreamRouter

    app = FastAPI(title="Clocks", version="1.0.0")
    router = APIStreamRouter()
    router.add_stream("/clock", ClockView)
    app.include_router(router, prefix="/events")
    document = sseviews.asyncapi(app)
    assert_valid(document)
    assert [channel["address"] for channel in document["channels"].values()] == ["/events/clock"]


def test_asyncapi_same_names_get_unique_keys() -> None:
    app = Starlette(routes=[Route("/a", ClockView), Route("/b", ClockView)])
    document = sseviews.asyncapi(app, title="T", version="1")
    assert list(document["channels"]) == ["ClockView", "ClockView_2"]
    assert document["info"]["title"] == "T"
    assert_valid(document)


def test_asyncapi_rejects_what_is_not_an_app() -> None:
    with pytest.raises(TypeError, match="expects a Starlette or FastAPI app or a router"):
        sseviews.asyncapi(ClockView)


def test_asyncapi_cli_prints_the_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "streams_app.py"
    module.write_text(
        "from starlette.applications import Starlette\n"
        "from starlette.routing import Route\n"
        "from sseviews import EventStreamView\n\n"
        "class Clock(EventStreamView):\n"
        "    event_types = {'tick': int}\n\n"
        "app = Starlette(routes=[Route('/clock', Clock)])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["asyncapi", f"{module}:app", "--title", "Mine"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert_valid(document)
    assert document["info"]["title"] == "Mine"
    assert document["channels"]["Clock"]["messages"]["tick"]["payload"] == {"type": "integer"}


def test_asyncapi_cli_reports_a_bad_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = tmp_path / "not_an_app.py"
    module.write_text("app = 42\n")
    assert main(["asyncapi", f"{module}:app"]) == 1
    error = capsys.readouterr().err
    assert "sseviews asyncapi: error:" in error
    assert "expects a Starlette or FastAPI app" in error


async def require_token(token: Annotated[str, Query(description="The access token.")]) -> str:
    return token


class Shade(enum.Enum):
    light = "light"
    dark = "dark"


class ShadedClock(ClockView):
    shade: Annotated[Shade, Query()] = Shade.light
    x_trace: Annotated[str | None, Header()] = None


def test_asyncapi_fastapi_dependency_parameters_are_documented_as_in_openapi() -> None:
    from sseviews.fastapi import StreamRouter as APIStreamRouter

    router = APIStreamRouter()
    router.add_stream("/clock/{room}", ShadedClock, name="clock")
    app = FastAPI()
    app.include_router(router, prefix="/events", dependencies=[Depends(require_token)])
    document = sseviews.asyncapi(app)
    assert_valid(document)
    operation = document["operations"]["clock"]
    openapi = app.openapi()
    # Every parameter /openapi.json lists, as it lists them (the include's token too).
    assert (
        operation["x-parameters"] == openapi["paths"]["/events/clock/{room}"]["get"]["parameters"]
    )
    query = operation["bindings"]["http"]["query"]
    assert set(query["properties"]) == {"lastEventId", "token", "shade"}
    assert query["required"] == ["token"]
    assert query["properties"]["token"]["description"] == "The access token."
    assert query["properties"]["shade"]["$ref"] == "#/components/schemas/Shade"
    assert document["components"]["schemas"]["Shade"] == openapi["components"]["schemas"]["Shade"]
    header = next(each for each in operation["x-parameters"] if each["in"] == "header")
    assert header["name"] == "x-trace"
    assert document["channels"]["clock"]["parameters"] == {
        "room": {"description": "The `room` path parameter."}
    }


class Speeds:
    class Tick(enum.Enum):  # not the payload's Tick model, but named the same
        fast = "fast"


def test_asyncapi_fastapi_parameter_schema_named_like_a_payload_is_renamed() -> None:
    from sseviews.fastapi import StreamRouter as APIStreamRouter

    class Ticking(ClockView):
        speed: Annotated[Speeds.Tick, Query()] = Speeds.Tick.fast

    router = APIStreamRouter()
    router.add_stream("/clock", Ticking)
    app = FastAPI()
    app.include_router(router)
    document = sseviews.asyncapi(app)
    assert_valid(document)
    schemas = document["components"]["schemas"]
    assert schemas["Tick"]["properties"] == {"n": {"title": "N", "type": "integer"}}
    assert schemas["Tick2"]["enum"] == ["fast"]
    speed = document["operations"]["Ticking"]["bindings"]["http"]["query"]["properties"]["speed"]
    assert speed["$ref"] == "#/components/schemas/Tick2"


def test_asyncapi_starlette_streams_have_no_dependency_parameters() -> None:
    document = sseviews.asyncapi(starlette_app())
    for operation in document["operations"].values():
        assert "x-parameters" not in operation
        assert list(operation["bindings"]["http"]["query"]["properties"]) == ["lastEventId"]


bearer = HTTPBearer(description="A session token.")
api_key = APIKeyQuery(name="key", auto_error=False)


async def authorized(
    credentials: Annotated[HTTPAuthorizationCredentials, Security(bearer)],
) -> str:
    return credentials.credentials


def test_asyncapi_fastapi_security_dependencies_become_security_schemes() -> None:
    from sseviews.fastapi import StreamRouter as APIStreamRouter

    class Guarded(ClockView):
        user: Annotated[str, Depends(authorized)]
        key: Annotated[str | None, Security(api_key)]

    router = APIStreamRouter()
    router.add_stream("/guarded", Guarded)
    router.add_stream("/open", ClockView)
    app = FastAPI()
    app.include_router(router)
    document = sseviews.asyncapi(app)
    assert_valid(document)
    assert document["operations"]["Guarded"]["security"] == [
        {"$ref": "#/components/securitySchemes/HTTPBearer"},
        {"$ref": "#/components/securitySchemes/APIKeyQuery"},
    ]
    assert "security" not in document["operations"]["ClockView"]
    assert document["components"]["securitySchemes"] == {
        "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "A session token."},
        "APIKeyQuery": {"type": "httpApiKey", "name": "key", "in": "query"},
    }
