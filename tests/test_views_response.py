"""The response a view sends: its head, and the HTTP methods and scopes it answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Message
from support.views import Trace, refusing_view, traced_view

from sseviews import EventStreamView
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio


# -- response head ----------------------------------------------------------------


async def test_view_default_response_headers_exact() -> None:
    class Clock(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield "tick"

    async with EventStreamClient(Clock) as client, client.stream("/") as stream:
        assert stream.status_code == 200
        assert stream.headers.items() == [
            ("content-type", "text/event-stream; charset=utf-8"),
            ("cache-control", "no-store"),
            ("x-accel-buffering", "no"),
        ]


async def test_view_headers_sent_before_first_event() -> None:
    gate = anyio.Event()

    class Slow(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            await gate.wait()
            yield "late"

    async with EventStreamClient(Slow) as client, client.stream("/") as stream:
        assert stream.status_code == 200
        assert stream.raw == b""
        gate.set()
        assert (await stream.next_event(timeout=2)).data == "late"


async def test_view_headers_setting_adds_and_overrides() -> None:
    class Public(EventStreamView):
        headers = {"Cache-Control": "public, max-age=1", "X-Extra": "yes"}  # noqa: RUF012

        async def events(self) -> AsyncIterator[Any]:
            yield "x"

    async with EventStreamClient(Public) as client, client.stream("/") as stream:
        assert stream.headers.getlist("cache-control") == ["public, max-age=1"]
        assert stream.headers["x-extra"] == "yes"
        assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert stream.headers["x-accel-buffering"] == "no"


# -- methods ---------------------------------------------------------------------------


async def test_view_head_runs_on_connect_without_events() -> None:
    trace = Trace()

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        trace.step("events")
        yield "x"

    view = traced_view(trace, events, headers={"X-Extra": "1"})
    async with EventStreamClient(view) as client:
        response = await client.request("HEAD", "/")
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-extra"] == "1"
    assert trace.steps == ["on_connect"]
    assert trace.reasons == []


async def test_view_head_refused_by_on_connect() -> None:
    async with EventStreamClient(refusing_view(403)) as client:
        response = await client.request("HEAD", "/")
    assert response.status_code == 403


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_view_other_methods_get_405_with_allow(method: str) -> None:
    trace = Trace()

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        yield "x"  # pragma: no cover

    view = traced_view(trace, events)
    async with EventStreamClient(Starlette(routes=[Route("/s", view)])) as client:
        direct = await client.request(method, "/s")
    async with EventStreamClient(view) as client:
        bare = await client.request(method, "/")
    for response in (direct, bare):
        assert response.status_code == 405
        allowed = {m.strip() for m in response.headers["allow"].split(",")}
        assert allowed == {"GET", "HEAD"}
    assert trace.steps == []


async def test_view_rejects_websocket_scope() -> None:
    class Clock(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield "x"  # pragma: no cover

    async def receive() -> Message:
        raise AssertionError  # pragma: no cover

    async def send(message: Message) -> None:
        raise AssertionError  # pragma: no cover

    with pytest.raises(TypeError, match="websocket"):
        await Clock({"type": "websocket", "path": "/", "headers": []}, receive, send)
