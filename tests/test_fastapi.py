"""`sseviews.fastapi`: stream views included in FastAPI apps, with FastAPI's
dependencies and OpenAPI docs."""

from __future__ import annotations

import datetime
import enum
import http.client
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, ClassVar

import anyio
import pytest
from fastapi import (
    APIRouter,
    BackgroundTasks,
    Body,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Query,
    Security,
)
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.routing import Route
from support.processes import clean_env, free_port, stop_process

import sseviews
from sseviews import DisconnectReason, Event, EventStreamView
from sseviews.fastapi import StreamRouter
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent


async def require_token(x_token: Annotated[str | None, Header()] = None) -> str:
    if x_token != "secret":
        raise HTTPException(401, "token required", headers={"WWW-Authenticate": "Token"})
    return x_token


async def current_user(token: Annotated[str, Depends(require_token)]) -> str:
    return f"user-of-{token}"


class Tick(EventStreamView):
    """Ticks, forever."""

    async def events(self) -> AsyncIterator[Any]:
        n = 0
        while True:
            yield Event({"n": n}, event="tick", id=n)
            n += 1
            await anyio.sleep(0.01)


def token_app(router: StreamRouter, **include: Any) -> FastAPI:
    app = FastAPI(dependencies=[Depends(require_token)])
    app.include_router(router, **include)
    return app


# -- routing ------------------------------------------------------------------------


def test_fastapi_router_is_an_api_router_and_a_stream_router() -> None:
    router = StreamRouter()
    assert isinstance(router, APIRouter)
    assert isinstance(router, sseviews.StreamRouter)


def test_fastapi_add_stream_rejects_what_is_not_a_view() -> None:
    router = StreamRouter()
    with pytest.raises(TypeError, match="EventStreamView subclass"):
        router.add_stream("/x", object)  # type: ignore[arg-type]


def test_fastapi_add_stream_rejects_view_with_nothing_to_stream() -> None:
    class Base(EventStreamView):
        pass

    router = StreamRouter()
    with pytest.raises(TypeError, match=r"Base has nothing to stream: override `async def events"):
        router.add_stream("/x", Base)
    assert router.routes == []


async def test_fastapi_include_router_with_prefix_serves_the_stream() -> None:
    router = StreamRouter()
    router.add_stream("/ticks", Tick, name="ticks")
    app = FastAPI()
    app.include_router(router, prefix="/events")
    async with EventStreamClient(app) as client:
        async with client.stream("/events/ticks") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
            first = await stream.next_event(timeout=2)
            second = await stream.next_event(timeout=2)
        assert (first.event, first.id, second.id) == ("tick", "0", "1")
        assert (await client.get("/ticks")).status_code == 404
    assert app.url_path_for("ticks") == "/events/ticks"


async def test_fastapi_stream_decorator_with_path_parameters_and_convertors() -> None:
    router = StreamRouter(prefix="/rooms")

    @router.stream("/{room}/{since:int}", name="room")
    class Room(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            params = self.request.path_params
            yield {"room": params["room"], "since": params["since"]}

    assert Room.__name__ == "Room"  # the decorator returns the class
    app = FastAPI()
    app.include_router(router)
    async with EventStreamClient(app) as client:
        async with client.stream("/rooms/lobby/3") as stream:
            event = await stream.next_event(timeout=2)
        assert event.json() == {"room": "lobby", "since": 3}
        assert (await client.get("/rooms/lobby/x")).status_code == 404
        schema = (await client.get("/openapi.json")).json()
    parameters = schema["paths"]["/rooms/{room}/{since}"]["get"]["parameters"]
    documented = {p["name"]: (p["in"], p["required"], p["schema"]["type"]) for p in parameters}
    assert documented == {"room": ("path", True, "string"), "since": ("path", True, "integer")}


async def test_fastapi_stream_answers_head_and_refuses_post_with_405() -> None:
    router = StreamRouter()
    router.add_stream("/ticks", Tick)
    app = token_app(router)
    async with EventStreamClient(app, headers={"x-token": "secret"}) as client:
        head = await client.request("HEAD", "/ticks")
        assert head.status_code == 200
        assert head.headers["content-type"].startswith("text/event-stream")
        assert head.content == b""
        refused = await client.request("HEAD", "/ticks", headers={"x-token": "wrong"})
        assert refused.status_code == 401
        post = await client.post("/ticks")
        assert post.status_code == 405
        assert post.headers["allow"] == "GET"


async def test_fastapi_router_holds_path_operations_at_the_stream_path() -> None:
    router = StreamRouter()
    router.add_stream("/items", Tick)

    @router.post("/items")
    async def create_item() -> dict[str, bool]:
        return {"created": True}

    app = FastAPI()
    app.include_router(router)
    async with EventStreamClient(app) as client:
        response = await client.post("/items")
        assert (response.status_code, response.json()) == (200, {"created": True})
        async with client.stream("/items") as stream:
            assert (await stream.next_event(timeout=2)).event == "tick"


async def test_fastapi_router_mounted_in_a_fastapi_app_still_works() -> None:
    router = StreamRouter()
    router.add_stream("/ticks", Tick)
    app = FastAPI()
    app.mount("/events", router)
    async with EventStreamClient(app) as client:
        async with client.stream("/events/ticks") as stream:
            assert (await stream.next_event(timeout=2)).event == "tick"


async def test_fastapi_mounted_router_skips_the_app_dependencies() -> None:
    # The trap include_router() avoids: a mount is a separate ASGI app.
    router = StreamRouter()
    router.add_stream("/ticks", Tick)
    app = FastAPI(dependencies=[Depends(require_token)])
    app.mount("/events", router)
    async with EventStreamClient(app) as client:
        async with client.stream("/events/ticks") as stream:
            assert stream.status_code == 200
        assert (
            "/events/ticks"
            not in (await client.get("/openapi.json", headers={"x-token": "secret"})).json()[
                "paths"
            ]
        )


def test_fastapi_include_router_of_a_starlette_stream_router_says_what_to_use() -> None:
    router = sseviews.StreamRouter()
    router.add_stream("/ticks", Tick)
    app = FastAPI()
    with pytest.raises(TypeError, match=r"sseviews\.fastapi\.StreamRouter.*app\.mount"):
        app.include_router(router)  # type: ignore[arg-type]


async def test_fastapi_starlette_stream_router_mount_keeps_working() -> None:
    router = sseviews.StreamRouter()
    router.add_stream("/ticks", Tick)
    app = FastAPI()
    app.mount("/events", router)
    async with EventStreamClient(app) as client:
        async with client.stream("/events/ticks") as stream:
            assert (await stream.next_event(timeout=2)).event == "tick"


# -- dependencies -------------------------------------------------------------------


async def test_fastapi_app_dependency_refuses_the_stream_without_the_token() -> None:
    connected: list[str] = []

    class Guarded(Tick):
        async def on_connect(self) -> None:
            connected.append("on_connect")

    router = StreamRouter()
    router.add_stream("/ticks", Guarded)
    app = token_app(router, prefix="/events")
    async with EventStreamClient(app) as client:
        async with client.stream("/events/ticks") as stream:
            assert stream.status_code == 401
            assert stream.headers["www-authenticate"] == "Token"
            await stream.wait_ended()
            assert stream.text == '{"detail":"token required"}'
        assert connected == []
        async with client.stream("/events/ticks", headers={"x-token": "secret"}) as stream:
            assert stream.status_code == 200
            assert (await stream.next_event(timeout=2)).event == "tick"
        assert connected == ["on_connect"]


async def test_fastapi_dependencies_run_app_include_route_then_on_connect() -> None:
    order: list[str] = []

    def step(name: str) -> Any:
        async def dependency() -> None:
            order.append(name)

        return Depends(dependency)

    class Recorded(Tick):
        async def on_connect(self) -> None:
            order.append("on_connect")

    router = StreamRouter(dependencies=[step("router")])
    router.add_stream("/ticks", Recorded, dependencies=[step("route")])
    app = FastAPI(dependencies=[step("app")])
    app.include_router(router, dependencies=[step("include")])
    async with EventStreamClient(app) as client:
        async with client.stream("/ticks") as stream:
            await stream.next_event(timeout=2)
    assert order == ["app", "include", "router", "route", "on_connect"]


async def test_fastapi_include_dependency_http_exception_keeps_status_and_headers() -> None:
    async def closed() -> None:
        raise HTTPException(503, "maintenance", headers={"Retry-After": "30"})

    router = StreamRouter()
    router.add_stream("/ticks", Tick)
    app = FastAPI()
    app.include_router(router, dependencies=[Depends(closed)])
    async with EventStreamClient(app) as client:
        async with client.stream("/ticks") as stream:
            assert stream.status_code == 503
            assert stream.headers["retry-after"] == "30"
            await stream.wait_ended()
            assert "event:" not in stream.text and "maintenance" in stream.text


async def test_fastapi_view_attributes_get_dependency_header_and_query_values() -> None:
    seen: dict[str, Any] = {}

    class Personal(EventStreamView):
        user: Annotated[str, Depends(current_user)]
        since: Annotated[int, Query(ge=0)] = 0
        agent: Annotated[str, Header(alias="user-agent")] = "unknown"

        async def on_connect(self) -> None:
            seen.update(user=self.user, since=self.since, agent=self.agent)

        async def events(self) -> AsyncIterator[Any]:
            yield {"user": self.user, "since": self.since}

    router = StreamRouter()
    router.add_stream("/me", Personal)
    app = FastAPI()
    app.include_router(router)
    headers = {"x-token": "secret", "user-agent": "tests"}
    async with EventStreamClient(app, headers=headers) as client:
        async with client.stream("/me", params={"since": "5"}) as stream:
            event = await stream.next_event(timeout=2)
        assert event.json() == {"user": "user-of-secret", "since": 5}
        assert seen == {"user": "user-of-secret", "since": 5, "agent": "tests"}
        async with client.stream("/me", params={"since": "-1"}) as stream:
            assert stream.status_code == 422  # FastAPI's validation, before any byte
        async with client.stream("/me", headers={"x-token": "no"}) as stream:
            assert stream.status_code == 401


bearer = HTTPBearer()


async def user_from_bearer(
    credentials: Annotated[HTTPAuthorizationCredentials, Security(bearer)],
) -> str:
    if credentials.credentials != "good":
        raise HTTPException(403, "bad token")
    return "bob"


async def test_fastapi_security_dependency_guards_and_is_documented() -> None:
    class Secured(Tick):
        user: Annotated[str, Security(user_from_bearer)]

        async def events(self) -> AsyncIterator[Any]:
            yield {"user": self.user}

    router = StreamRouter()
    router.add_stream("/secure", Secured)
    app = FastAPI()
    app.include_router(router)
    async with EventStreamClient(app) as client:
        async with client.stream("/secure") as stream:
            assert stream.status_code in (401, 403)  # FastAPI's HTTPBearer refusal
        bad = {"authorization": "Bearer nope"}
        async with client.stream("/secure", headers=bad) as stream:
            assert stream.status_code == 403
        good = {"authorization": "Bearer good"}
        async with client.stream("/secure", headers=good) as stream:
            assert (await stream.next_event(timeout=2)).json() == {"user": "bob"}
        schema = (await client.get("/openapi.json")).json()
    assert schema["paths"]["/secure"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


async def test_fastapi_yield_dependency_is_cleaned_up_after_on_disconnect() -> None:
    order: list[str] = []

    cleaned_up = anyio.Event()

    async def resource() -> AsyncIterator[str]:
        order.append("open")
        try:
            yield "resource"
        finally:
            order.append("cleanup")
            cleaned_up.set()

    class UsesResource(EventStreamView):
        # The default form: `resource` is local, so an Annotated string annotation
        # (from __future__ import annotations) could not be evaluated.
        res: str = Depends(resource)

        async def on_connect(self) -> None:
            order.append(f"on_connect:{self.res}")

        async def events(self) -> AsyncIterator[Any]:
            order.append(f"events:{self.res}")
            yield {"res": self.res}
            await anyio.sleep_forever()

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            order.append(f"on_disconnect:{reason.value}")

    router = StreamRouter()
    router.add_stream("/res", UsesResource)
    app = FastAPI()
    app.include_router(router)
    async with EventStreamClient(app) as client:
        async with client.stream("/res") as stream:
            await stream.next_event(timeout=2)
            assert order == ["open", "on_connect:resource", "events:resource"]
        with anyio.fail_after(2):
            await cleaned_up.wait()
    assert order[3:] == ["on_disconnect:client_closed", "cleanup"]


def test_fastapi_function_scoped_yield_dependency_attribute_is_refused() -> None:
    def session() -> Iterator[str]:
        yield "session"

    class Early(Tick):
        db: str = Depends(session, scope="function")

    with pytest.raises(TypeError, match=r"Early\.db: .*scope='function'.*session_factory"):
        StreamRouter().add_stream("/early", Early)


def test_fastapi_function_scoped_plain_dependency_attribute_is_accepted() -> None:
    def value() -> str:
        return "plain"

    class Fine(Tick):
        v: str = Depends(value, scope="function")

    StreamRouter().add_stream("/fine", Fine)  # a plain function has no cleanup


def test_fastapi_body_attribute_is_refused() -> None:
    class WithBody(Tick):
        payload: Annotated[dict[str, Any], Body()]

    with pytest.raises(TypeError, match=r"WithBody\.payload: a stream is a GET request"):
        StreamRouter().add_stream("/b", WithBody)


def test_fastapi_attribute_named_like_a_view_member_is_refused() -> None:
    class Shadowing(Tick):
        request: Annotated[str, Depends(current_user)]  # type: ignore[assignment]

    with pytest.raises(TypeError, match=r"Shadowing\.request: the name is taken"):
        StreamRouter().add_stream("/s", Shadowing)


def test_fastapi_plain_annotations_and_classvars_are_not_parameters() -> None:
    class Plain(Tick):
        counter: int
        label: str = "x"

    router = StreamRouter()
    router.add_stream("/p", Plain)
    app = FastAPI()
    app.include_router(router)
    operation = app.openapi()["paths"]["/p"]["get"]
    assert "parameters" not in operation


async def test_fastapi_background_tasks_run_after_the_stream() -> None:
    order: list[str] = []
    done = anyio.Event()

    def background() -> None:
        order.append("background")
        done.set()

    async def schedule(tasks: BackgroundTasks) -> None:
        tasks.add_task(background)

    class Short(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield "one"

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            order.append("on_disconnect")

    router = StreamRouter()
    router.add_stream("/short", Short, dependencies=[Depends(schedule)])
    app = FastAPI()
    app.include_router(router)
    async with EventStreamClient(app) as client:
        async with client.stream("/short") as stream:
            await stream.wait_ended()
        with anyio.fail_after(2):
            await done.wait()
    assert order == ["on_disconnect", "background"]


# -- OpenAPI ------------------------------------------------------------------------


async def test_fastapi_openapi_documents_the_stream_as_a_get_event_stream() -> None:
    router = StreamRouter(tags=["streams"])
    router.add_stream("/ticks/{room}", Tick, name="ticks")
    app = token_app(router, prefix="/events", tags=["live"])

    @app.get("/items")
    async def items() -> list[int]:
        return [1]

    async with EventStreamClient(app, headers={"x-token": "secret"}) as client:
        schema = (await client.get("/openapi.json")).json()
    path = schema["paths"]["/events/ticks/{room}"]
    assert set(path) == {"get"}  # HEAD is served, not documented twice
    operation = path["get"]
    assert operation["tags"] == ["live", "streams"]
    assert operation["description"] == "Ticks, forever."
    names = {(p["in"], p["name"]) for p in operation["parameters"]}
    assert names == {("path", "room"), ("header", "x-token")}
    content = operation["responses"]["200"]["content"]
    assert list(content) == ["text/event-stream"]
    item = content["text/event-stream"]["itemSchema"]
    assert item["type"] == "object"
    assert set(item["properties"]) == {"data", "event", "id", "retry"}
    assert "/items" in schema["paths"]


def test_fastapi_include_in_schema_false_leaves_the_stream_out() -> None:
    router = StreamRouter()
    router.add_stream("/hidden", Tick, include_in_schema=False)
    app = FastAPI()
    app.include_router(router)
    assert "/hidden" not in app.openapi().get("paths", {})
    assert any(isinstance(r, Route) for r in router.routes)


class Author(BaseModel):
    name: str


class Message(BaseModel):
    text: str
    author: Author


class Thread(BaseModel):
    title: str
    replies: list[Thread] = []


class Chat(Tick):
    event_types: ClassVar[Mapping[str, Any]] = {
        "message": Message,
        "typing": str,
        "thread": Thread,
    }


def test_fastapi_openapi_describes_each_declared_event() -> None:
    router = StreamRouter()
    router.add_stream("/chat", Chat)
    app = FastAPI()
    app.include_router(router, prefix="/events")
    operation = app.openapi()["paths"]["/events/chat"]["get"]
    item = operation["responses"]["200"]["content"]["text/event-stream"]["itemSchema"]
    branches = {branch["title"]: branch for branch in item["oneOf"]}
    assert set(branches) == {"message", "typing", "thread"}

    message = branches["message"]
    assert message["required"] == ["data"]  # unnamed events arrive as "message"
    assert message["properties"]["event"] == {"type": "string", "const": "message"}
    data = message["properties"]["data"]
    assert (data["type"], data["contentMediaType"]) == ("string", "application/json")
    content = data["contentSchema"]
    assert content["required"] == ["text", "author"]
    # Definitions are inlined: a "#/$defs/..." would resolve against the document root.
    assert content["properties"]["author"]["properties"]["name"]["type"] == "string"
    assert "$defs" not in content

    typing_ = branches["typing"]
    assert typing_["required"] == ["event", "data"]
    assert typing_["properties"]["event"]["const"] == "typing"
    assert typing_["properties"]["data"] == {"type": "string"}  # text, sent as is

    thread = branches["thread"]["properties"]["data"]["contentSchema"]
    assert thread["$id"].startswith("urn:sseviews:")  # recursive: keeps its own $defs
    assert thread["$ref"] == "#/$defs/Thread"
    replies = thread["$defs"]["Thread"]["properties"]["replies"]
    assert replies["items"] == {"$ref": "#/$defs/Thread"}


def test_fastapi_openapi_single_declared_event_has_no_one_of() -> None:
    class Ticks(Tick):
        event_types: ClassVar[Mapping[str, Any]] = {"tick": dict[str, int]}

    router = StreamRouter()
    router.add_stream("/ticks", Ticks)
    app = FastAPI()
    app.include_router(router)
    operation = app.openapi()["paths"]["/ticks"]["get"]
    item = operation["responses"]["200"]["content"]["text/event-stream"]["itemSchema"]
    assert item["title"] == "tick"
    schema = item["properties"]["data"]["contentSchema"]
    assert schema == {"type": "object", "additionalProperties": {"type": "integer"}}


class Shade(enum.Enum):
    light = "light"
    dark = "dark"


class Note(BaseModel):
    """A payload with what pydantic documents differently per mode: defaults, enums,
    nested models, optional dates."""

    text: str
    author: Author
    shade: Shade = Shade.light
    at: datetime.datetime | None = None
    tags: list[str] = []


def _resolved(schema: Any, components: Mapping[str, Any]) -> Any:
    """`schema` with FastAPI's `#/components/schemas/...` references inlined."""
    if isinstance(schema, list):
        return [_resolved(item, components) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    rest = {key: _resolved(value, components) for key, value in schema.items() if key != "$ref"}
    if isinstance(ref, str):
        return {
            **_resolved(components[ref.removeprefix("#/components/schemas/")], components),
            **rest,
        }
    return rest


def _fastapi_item_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The itemSchema FastAPI's own SSE support documents for a stream of `model`."""
    sse = pytest.importorskip("fastapi.sse", reason="FastAPI's own SSE support needs 0.135+")
    app = FastAPI()

    async def native() -> AsyncIterator[Any]:
        yield None

    # The item type FastAPI reads from the return annotation, as an object (this
    # module's annotations are strings).
    native.__annotations__["return"] = AsyncIterator[model]  # type: ignore[valid-type]
    app.add_api_route("/native", native, response_class=sse.EventSourceResponse)
    document = app.openapi()
    content = document["paths"]["/native"]["get"]["responses"]["200"]["content"]
    item: dict[str, Any] = content["text/event-stream"]["itemSchema"]
    return _resolved(item, document.get("components", {}).get("schemas", {}))


def test_fastapi_item_schema_of_one_event_matches_fastapis_own_sse() -> None:
    native = _fastapi_item_schema(Note)
    assert native["properties"]["data"]["contentMediaType"] == "application/json"

    class Notes(Tick):
        event_types: ClassVar[Mapping[str, Any]] = {"message": Note}

    router = StreamRouter()
    router.add_stream("/notes", Notes)
    app = FastAPI()
    app.include_router(router)
    operation = app.openapi()["paths"]["/notes"]["get"]
    item = operation["responses"]["200"]["content"]["text/event-stream"]["itemSchema"]
    # The same item schema, with the event name added (and a title naming it).
    assert item.pop("title") == "message"
    assert item["properties"].pop("event") == {"type": "string", "const": "message"}
    assert native["properties"].pop("event") == {"type": "string"}
    assert item == native


def test_fastapi_item_schema_of_each_named_event_matches_fastapis_own_sse() -> None:
    native = _fastapi_item_schema(Note)
    native_author = _fastapi_item_schema(Author)

    class Notes(Tick):
        event_types: ClassVar[Mapping[str, Any]] = {"note": Note, "author": Author}

    router = StreamRouter()
    router.add_stream("/notes", Notes)
    app = FastAPI()
    app.include_router(router, prefix="/events")
    operation = app.openapi()["paths"]["/events/notes"]["get"]
    item = operation["responses"]["200"]["content"]["text/event-stream"]["itemSchema"]
    branches = {branch.pop("title"): branch for branch in item["oneOf"]}
    assert list(branches) == ["note", "author"]
    for name, expected in (("note", native), ("author", native_author)):
        branch = branches[name]
        assert branch["properties"].pop("event") == {"type": "string", "const": name}
        assert branch["required"] == ["event", "data"]  # a named event always has its name
        assert branch["properties"] == {
            key: value for key, value in expected["properties"].items() if key != "event"
        }
        assert branch["type"] == expected["type"] == "object"


# -- a real server ------------------------------------------------------------------


@contextmanager
def _get(port: int, path: str, headers: dict[str, str]) -> Iterator[http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers=headers)
        with connection.getresponse() as response:
            yield response
    finally:
        connection.close()


@pytest.fixture
def fastapi_server(tmp_path: Path) -> Iterator[int]:
    """`tests/apps/fastapi_app.py` under a real uvicorn on loopback: its port."""
    port = free_port()
    log = tmp_path / "uvicorn.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.apps.fastapi_app:app", "--port", str(port)],
            cwd=REPO,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                pytest.fail(f"uvicorn exited:\n{log.read_text()}")
            try:
                with _get(port, "/health", {"x-token": "secret"}) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"uvicorn did not answer in 20 s:\n{log.read_text()}")
            time.sleep(0.1)
        yield port
    finally:
        stop_process(process)


@pytest.mark.slow
def test_fastapi_uvicorn_serves_the_included_stream_only_with_the_token(
    fastapi_server: int,
) -> None:
    with _get(fastapi_server, "/events/ticks/5", {}) as refused:
        assert refused.status == 401
        assert refused.read() == b'{"detail":"a valid X-Token header is required"}'
    with _get(fastapi_server, "/events/ticks/5", {"x-token": "secret"}) as response:
        assert response.status == 200
        assert response.getheader("content-type") == "text/event-stream; charset=utf-8"
        received = b""
        while received.count(b"\n\n") < 2:
            received += response.read1(65536)
    first, second = received.split(b"\n\n")[:2]
    assert first == b'event: tick\nid: 5\ndata: {"n":5,"user":"user-of-secret"}'
    assert second.startswith(b"event: tick\nid: 6\n")
    with _get(fastapi_server, "/openapi.json", {"x-token": "secret"}) as docs:
        operation = json.loads(docs.read())["paths"]["/events/ticks/{start}"]["get"]
    assert "text/event-stream" in operation["responses"]["200"]["content"]
