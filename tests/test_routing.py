from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route, Router

from sseviews import EventStreamView, StreamRouter
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio


class Clock(EventStreamView):
    async def events(self) -> AsyncIterator[Any]:
        yield "tick"


class Room(EventStreamView):
    async def events(self) -> AsyncIterator[Any]:
        yield {"room": self.request.path_params["room"]}


def make_router() -> StreamRouter:
    router = StreamRouter()
    router.add_stream("/clock", Clock, name="clock")
    router.add_stream("/unnamed", Clock)

    @router.stream("/rooms/{room}", name="room")
    class DecoratedRoom(Room):
        pass

    return router


def test_router_is_a_starlette_router() -> None:
    assert issubclass(StreamRouter, Router)


def test_router_add_stream_registers_get_and_head_route() -> None:
    router = StreamRouter()
    router.add_stream("/clock", Clock, name="clock")
    (route,) = router.routes
    assert isinstance(route, Route)
    assert route.path == "/clock"
    assert route.name == "clock"
    assert route.methods == {"GET", "HEAD"}


def test_router_stream_decorator_returns_the_class() -> None:
    router = StreamRouter()

    @router.stream("/clock")
    class Decorated(Clock):
        pass

    assert isinstance(Decorated, type)
    assert issubclass(Decorated, Clock)
    (route,) = router.routes
    assert isinstance(route, Route)
    assert route.path == "/clock"


def test_router_url_path_for_names() -> None:
    router = make_router()
    assert router.url_path_for("clock") == "/clock"
    assert router.url_path_for("room", room="lobby") == "/rooms/lobby"
    # Without a name, the route is named after the class, as Starlette does.
    assert router.url_path_for("Clock") == "/unnamed"


async def _noop(*args: Any) -> Any:
    raise AssertionError  # pragma: no cover


@pytest.mark.parametrize(
    "make",
    [
        lambda: Clock({"type": "http", "method": "GET", "headers": []}, _noop, _noop),
        lambda: HTTPEndpoint,
        lambda: object,
        lambda: "Clock",
        lambda: None,
    ],
    ids=["view-instance", "http-endpoint", "object", "str", "none"],
)
def test_router_add_stream_rejects_non_view(make: Any) -> None:
    router = StreamRouter()
    with pytest.raises(TypeError, match="EventStreamView"):
        router.add_stream("/x", make())
    assert router.routes == []


def test_router_stream_decorator_rejects_non_view() -> None:
    router = StreamRouter()
    with pytest.raises(TypeError, match="EventStreamView"):

        @router.stream("/x")  # type: ignore[type-var]
        class NotAView(HTTPEndpoint):
            pass


def test_router_add_stream_rejects_view_with_nothing_to_stream() -> None:
    class Base(EventStreamView):
        ping_interval = 5

    router = StreamRouter()
    with pytest.raises(TypeError, match=r"Base has nothing to stream: override `async def events"):
        router.add_stream("/x", Base)
    with pytest.raises(TypeError, match="or set `broadcast` and `groups`"):
        router.stream("/x")(Base)
    assert router.routes == []


def test_router_add_stream_accepts_view_that_only_refuses() -> None:
    class Gone(EventStreamView):
        async def on_connect(self) -> None:
            raise HTTPException(status_code=204)  # tells old clients to stop for good

    router = StreamRouter()
    router.add_stream("/old", Gone)
    assert [route.path for route in router.routes] == ["/old"]  # type: ignore[attr-defined]


def test_router_add_stream_accepts_groups_whose_broadcast_comes_later() -> None:
    class Room(EventStreamView):
        groups = ("room",)

    router = StreamRouter()
    router.add_stream("/room", Room)  # the broadcast may be set before the first request
    assert [route.path for route in router.routes] == ["/room"]  # type: ignore[attr-defined]


def test_router_add_stream_rejects_plain_function() -> None:
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("x")  # pragma: no cover

    with pytest.raises(TypeError):
        StreamRouter().add_stream("/x", endpoint)  # type: ignore[arg-type]


async def test_router_serves_streams_directly() -> None:
    async with EventStreamClient(make_router()) as client:
        async with client.stream("/clock") as stream:
            assert stream.status_code == 200
            assert (await stream.next_event(timeout=2)).data == "tick"
        async with client.stream("/rooms/lobby") as stream:
            assert (await stream.next_event(timeout=2)).json() == {"room": "lobby"}


async def test_router_mounted_in_starlette_app() -> None:
    app = Starlette(routes=[Mount("/events", app=make_router(), name="events")])
    assert app.url_path_for("events:clock") == "/events/clock"
    assert app.url_path_for("events:room", room="a") == "/events/rooms/a"
    async with EventStreamClient(app) as client:
        async with client.stream("/events/clock") as stream:
            assert (await stream.next_event(timeout=2)).data == "tick"
        async with client.stream(app.url_path_for("events:room", room="b")) as stream:
            assert (await stream.next_event(timeout=2)).json() == {"room": "b"}
        assert (await client.get("/events/nope")).status_code == 404


async def test_router_routes_included_in_starlette_app() -> None:
    app = Starlette(routes=make_router().routes)
    assert app.url_path_for("clock") == "/clock"
    async with EventStreamClient(app) as client, client.stream("/clock") as stream:
        assert (await stream.next_event(timeout=2)).data == "tick"


async def test_router_mounted_in_fastapi_app() -> None:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.mount("/events", make_router())
    assert app.url_path_for("clock") == "/events/clock"
    assert app.url_path_for("room", room="a") == "/events/rooms/a"
    async with EventStreamClient(app) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        async with client.stream("/events/clock") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert (await stream.next_event(timeout=2)).data == "tick"
        async with client.stream("/events/rooms/lobby") as stream:
            assert (await stream.next_event(timeout=2)).json() == {"room": "lobby"}


async def test_router_post_route_at_same_path_still_reachable() -> None:
    router = make_router()

    async def publish(request: Request) -> Response:
        return PlainTextResponse("published: " + (await request.body()).decode(), 201)

    router.add_route("/clock", publish, methods=["POST"])
    app = Starlette(routes=[Mount("/events", app=router)])
    async with EventStreamClient(app) as client:
        posted = await client.post("/events/clock", content="hi")
        assert posted.status_code == 201
        assert posted.text == "published: hi"
        async with client.stream("/events/clock") as stream:
            assert (await stream.next_event(timeout=2)).data == "tick"
        head = await client.request("HEAD", "/events/clock")
        assert head.status_code == 200
        assert head.content == b""


async def test_router_post_route_in_fastapi_at_same_path() -> None:
    app = FastAPI()
    router = make_router()

    @app.post("/events/clock")
    async def publish() -> dict[str, bool]:
        return {"published": True}

    app.mount("/events", router)
    async with EventStreamClient(app) as client:
        assert (await client.post("/events/clock")).json() == {"published": True}
        async with client.stream("/events/clock") as stream:
            assert (await stream.next_event(timeout=2)).data == "tick"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_router_other_methods_get_405_with_allow(method: str) -> None:
    async with EventStreamClient(make_router()) as client:
        response = await client.request(method, "/clock")
    assert response.status_code == 405
    assert {m.strip() for m in response.headers["allow"].split(",")} == {"GET", "HEAD"}
