from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sseviews import (
    ERROR_EVENT,
    DisconnectReason,
    Event,
    EventShapeWarning,
    EventStreamView,
    StreamEnded,
)
from sseviews._events import encode_data
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio

KIB = b"x" * 1024


class Trace:
    """What a view saw: hook calls in order, disconnect reasons, task ids."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.reasons: list[DisconnectReason] = []
        self.tasks: dict[str, int] = {}
        self.sessions: list[Any] = []
        self.disconnected = anyio.Event()

    def step(self, name: str) -> None:
        self.steps.append(name)
        self.tasks[name] = anyio.get_current_task().id

    def disconnect(self, reason: DisconnectReason) -> None:
        self.step("on_disconnect")
        self.reasons.append(reason)
        self.disconnected.set()

    async def wait_disconnected(self) -> None:
        with anyio.fail_after(3):
            await self.disconnected.wait()


def traced_view(trace: Trace, events: Callable[[Any], AsyncIterator[Any]], **settings: Any) -> Any:
    """Build a view whose `events()` is `events(self)` and whose hooks are traced."""

    async def on_connect(self: EventStreamView) -> None:
        trace.step("on_connect")

    async def on_disconnect(self: EventStreamView, reason: DisconnectReason) -> None:
        trace.disconnect(reason)

    namespace = {"on_connect": on_connect, "events": events, "on_disconnect": on_disconnect}
    return type("TracedView", (EventStreamView,), {**namespace, **settings})


def refusing_view(status: int) -> type[EventStreamView]:
    """A view whose `on_connect()` raises `HTTPException(status)`: `events()` never runs."""

    class Guarded(EventStreamView):
        async def on_connect(self) -> None:
            raise HTTPException(status_code=status)

        async def events(self) -> AsyncIterator[Any]:
            yield "x"  # pragma: no cover

    return Guarded


async def end_as(ending: str) -> None:
    """End an `events()` as a test's `ending` says: "error" raises, "completed" returns
    (the stream completes), any other ending waits here until the stream is cancelled."""
    if ending == "error":
        raise RuntimeError("boom")
    if ending != "completed":
        await anyio.sleep_forever()


class SendRecorder:
    """ASGI middleware that records every message the app sends, and overlapping sends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.messages: list[Message] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def recording_send(message: Message) -> None:
            self.messages.append(message)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await send(message)
            finally:
                self.in_flight -= 1

        await self.app(scope, receive, recording_send)

    @property
    def final_chunk_sent(self) -> bool:
        last = self.messages[-1]
        return last["type"] == "http.response.body" and not last.get("more_body", False)


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


# -- on_connect -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "detail", "headers"),
    [
        (401, "log in first", {"WWW-Authenticate": 'Bearer realm="sse"'}),
        (403, "not yours", {"X-Reason": "owner"}),
        (404, "no such room", None),
    ],
)
async def test_view_on_connect_http_exception_refuses(
    status: int, detail: str, headers: dict[str, str] | None
) -> None:
    trace = Trace()

    class Guarded(EventStreamView):
        async def on_connect(self) -> None:
            trace.step("on_connect")
            raise HTTPException(status_code=status, detail=detail, headers=headers)

        async def events(self) -> AsyncIterator[Any]:
            trace.step("events")
            yield "secret"

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.disconnect(reason)

    async with EventStreamClient(Guarded) as client:
        async with client.stream("/") as stream:
            assert stream.status_code == status
            await stream.wait_ended()
            assert stream.text == detail
            for name, value in (headers or {}).items():
                assert stream.headers[name] == value
            assert stream.headers["content-type"].startswith("text/plain")
        response = await client.get("/")
        assert response.status_code == status
    assert trace.steps == ["on_connect", "on_connect"]
    assert trace.reasons == []


async def test_view_on_connect_returned_response_refuses() -> None:
    trace = Trace()

    class Guarded(EventStreamView):
        async def on_connect(self) -> Response:
            trace.step("on_connect")
            return JSONResponse({"error": "forbidden"}, status_code=403, headers={"X-A": "1"})

        async def events(self) -> AsyncIterator[Any]:
            trace.step("events")
            yield "secret"

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.disconnect(reason)

    async with EventStreamClient(Guarded) as client:
        response = await client.get("/")
    assert response.status_code == 403
    assert response.json() == {"error": "forbidden"}
    assert response.headers["x-a"] == "1"
    assert trace.steps == ["on_connect"]
    assert trace.reasons == []


async def test_view_on_connect_accepts_by_returning_none() -> None:
    trace = Trace()

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        trace.step("events")
        yield "hello"

    async with EventStreamClient(traced_view(trace, events)) as client:
        async with client.stream("/") as stream:
            assert (await stream.next_event(timeout=2)).data == "hello"
    assert trace.steps == ["on_connect", "events", "on_disconnect"]


# -- what events() yields ------------------------------------------------------------


async def test_view_yielded_values_sent_as_unnamed_events() -> None:
    class Mixed(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield "plain text"
            yield '{"already": "json"}'
            yield {"a": 1, "é": [True, None]}
            yield [1, 2]
            yield 3
            yield "two\nlines"
            yield b"bytes"
            yield Event("named", event="custom", id="7")

    async with EventStreamClient(Mixed) as client, client.stream("/") as stream:
        received = [await stream.next_event(timeout=2) for _ in range(8)]
        await stream.wait_ended()
        raw = stream.raw
    assert [e.data for e in received] == [
        "plain text",
        '{"already": "json"}',
        '{"a":1,"é":[true,null]}',
        "[1,2]",
        "3",
        "two\nlines",
        "bytes",
        "named",
    ]
    assert [e.event for e in received] == [None] * 7 + ["custom"]
    assert [e.id for e in received] == [None] * 7 + ["7"]
    assert raw.startswith(b'data: plain text\n\ndata: {"already": "json"}\n\n')
    assert 'data: {"a":1,"é":[true,null]}\n\n'.encode() in raw


# -- on_disconnect reasons -----------------------------------------------------------


async def test_view_client_closed_reason() -> None:
    trace = Trace()

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        yield "hello"
        await anyio.sleep_forever()

    async with EventStreamClient(traced_view(trace, events)) as client:
        async with client.stream("/") as stream:
            await stream.next_event(timeout=2)
        await trace.wait_disconnected()
        await anyio.sleep(0.05)
    assert trace.reasons == [DisconnectReason.CLIENT_CLOSED]


async def test_view_completed_reason_ends_response_cleanly() -> None:
    trace = Trace()

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        yield "one"
        yield "two"

    app = SendRecorder(traced_view(trace, events))
    async with EventStreamClient(app) as client, client.stream("/") as stream:
        assert [(await stream.next_event(timeout=2)).data for _ in range(2)] == ["one", "two"]
        await stream.wait_ended()
        with pytest.raises(StreamEnded):
            await stream.next_event(timeout=1)
        assert stream.raw == b"data: one\n\ndata: two\n\n"
    assert trace.reasons == [DisconnectReason.COMPLETED]
    assert app.final_chunk_sent


async def test_view_shutdown_reason() -> None:
    trace = Trace()

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        yield "hello"
        await anyio.sleep_forever()

    app = SendRecorder(traced_view(trace, events))
    async with EventStreamClient(app) as client:
        async with client.stream("/") as stream:
            await stream.next_event(timeout=2)
            await client.shutdown()
            assert trace.reasons == [DisconnectReason.SHUTDOWN]
            assert stream.ended
            assert stream.raw == b"data: hello\n\n"
    assert trace.reasons == [DisconnectReason.SHUTDOWN]
    assert app.final_chunk_sent


async def test_view_send_timeout_reason(caplog: pytest.LogCaptureFixture) -> None:
    trace = Trace()
    gate = anyio.Event()

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        await gate.wait()
        for _ in range(1000):  # 1000 KiB: far more than the 64 KiB buffer
            yield KIB

    view = traced_view(trace, events, send_timeout=0.1)
    async with EventStreamClient(view) as client:
        async with client.stream("/") as stream:
            stream.pause()
            with anyio.fail_after(3):
                gate.set()
                await trace.disconnected.wait()
            assert not stream.raw.endswith(b"x")  # nothing half-written reached the client
        await anyio.sleep(0.05)
    assert trace.reasons == [DisconnectReason.SEND_TIMEOUT]
    assert any(
        r.name == "sseviews" and r.levelno == logging.WARNING and "send_timeout" in r.getMessage()
        for r in caplog.records
    )


async def test_view_error_reason_logged_and_stream_ends_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    trace = Trace()

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        yield "before"
        yield {"n": 1}
        raise LookupError("the database is gone")

    app = SendRecorder(traced_view(trace, events))
    async with EventStreamClient(app) as client, client.stream("/") as stream:
        assert (await stream.next_event(timeout=2)).data == "before"
        assert (await stream.next_event(timeout=2)).data == '{"n":1}'
        # The last event says the stream failed, and nothing of why.
        final = await stream.next_event(timeout=2)
        assert (final.event, final.json()) == (ERROR_EVENT, {"reason": "error"})
        await stream.wait_ended()
        with pytest.raises(StreamEnded):
            await stream.next_event(timeout=1)
        assert stream.raw.startswith(b'data: before\n\ndata: {"n":1}\n\n')
        assert b"database" not in stream.raw and b"LookupError" not in stream.raw
    assert trace.reasons == [DisconnectReason.ERROR]
    assert app.final_chunk_sent
    errors = [r for r in caplog.records if r.name == "sseviews" and r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], LookupError)


@pytest.mark.parametrize("broken", [object(), float("nan")], ids=["object", "nan"])
async def test_view_unencodable_value_is_error_without_half_event(
    caplog: pytest.LogCaptureFixture, broken: object
) -> None:
    trace = Trace()

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        yield Event("first")
        yield {"fine": 1, "broken": broken}
        yield "never"

    async with EventStreamClient(traced_view(trace, events)) as client:
        async with client.stream("/") as stream:
            await stream.wait_ended()
            # Not a byte of the half-encoded event: the first one, then the error event.
            first, final = stream.raw.split(b"\n\n", 1)
            assert first == b"data: first"
            assert final.startswith(b"event: sseviews.error\n")
            assert b"fine" not in final
    assert trace.reasons == [DisconnectReason.ERROR]
    assert any(r.name == "sseviews" and r.levelno >= logging.ERROR for r in caplog.records)


async def test_view_without_events_override_is_refused_with_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A view with nothing to stream (a base class routed by mistake, say) gets a 500,
    # which stops EventSource, instead of a 200 that ends at once and loops.
    trace = Trace()

    class Empty(EventStreamView):
        async def on_connect(self) -> None:
            trace.steps.append("on_connect")

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.disconnect(reason)

    async with EventStreamClient(Empty) as client, client.stream("/") as stream:
        assert stream.status_code == 500
        await stream.wait_ended()
        assert stream.raw == b"Internal Server Error"
    # on_connect() could have refused on purpose; it accepted, and no stream started.
    assert trace.steps == ["on_connect"]
    assert trace.reasons == []
    logged = [r for r in caplog.records if r.name == "sseviews" and r.levelno >= logging.ERROR]
    assert len(logged) == 1
    message = logged[0].getMessage()
    assert "Empty has nothing to stream: override `async def events(self)`" in message
    assert "or set `broadcast` and `groups`" in message


@pytest.mark.parametrize("kind", ["coroutine", "sync_generator"])
async def test_view_events_not_an_async_generator_ends_with_error(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A common slip: `async def events(self)` without a `yield`, or a plain generator.
    trace = Trace()

    async def coroutine_events(self: EventStreamView) -> Any:
        return ["never", "sent"]

    def generator_events(self: EventStreamView) -> Any:
        yield "never sent"

    async def valid_events(self: EventStreamView) -> AsyncIterator[Any]:
        yield "never sent"

    events = coroutine_events if kind == "coroutine" else generator_events
    view = traced_view(trace, valid_events)
    # Class creation refuses such an events() (test_views_settings.py); one set on the
    # class afterwards still ends the stream with an error instead of crashing it.
    view.events = events
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with EventStreamClient(view) as client:
            async with client.stream("/") as stream:
                assert (await stream.next_event(timeout=2)).event == ERROR_EVENT
                await stream.wait_ended()
                with pytest.raises(StreamEnded):
                    await stream.next_event(timeout=1)
        gc.collect()
    assert trace.reasons == [DisconnectReason.ERROR]
    logged = [r for r in caplog.records if r.name == "sseviews" and r.levelno >= logging.ERROR]
    assert any("async generator" in r.getMessage() for r in logged)
    # The view must close what events() returned, not leave a coroutine never awaited.
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []


async def test_view_error_event_retry_is_error_retry_with_jitter() -> None:
    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        raise LookupError("the database is gone")
        yield  # pragma: no cover

    view = traced_view(Trace(), events, error_retry=1000)
    retries = set()
    async with EventStreamClient(view) as client:
        for _ in range(8):
            async with client.stream("/") as stream:
                final = await stream.next_event(timeout=2)
                assert final.event == ERROR_EVENT
                await stream.wait_ended()
                assert stream.retry is not None
                retries.add(stream.retry)
    assert all(500 <= retry <= 1500 for retry in retries), retries
    assert len(retries) > 1  # jittered: clients of a failing stream spread out


async def test_view_error_event_without_retry_when_error_retry_is_none() -> None:
    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        yield "first"
        raise LookupError("the database is gone")

    view = traced_view(Trace(), events, error_retry=None)
    async with EventStreamClient(view) as client, client.stream("/") as stream:
        await stream.wait_ended()
        assert stream.raw == b'data: first\n\nevent: sseviews.error\ndata: {"reason":"error"}\n\n'
        assert stream.retry is None


async def test_view_error_event_follows_the_view_retry_setting() -> None:
    # `retry` at the start, then the error's own retry: the last one wins in a browser.
    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        raise LookupError("the database is gone")
        yield  # pragma: no cover

    view = traced_view(Trace(), events, retry=200, error_retry=60_000)
    async with EventStreamClient(view) as client, client.stream("/") as stream:
        await stream.wait_ended()
        assert stream.raw.startswith(b"retry: 200\nevent: sseviews.error\nretry: ")
        assert stream.retry is not None and 30_000 <= stream.retry <= 90_000


@pytest.mark.parametrize(
    ("returned", "hint"),
    [
        (401, "`raise HTTPException(status_code=401)` or `return Response(status_code=401)`"),
        (True, "to accept the stream, return None"),
        ("no", "refuse it by raising HTTPException or returning a starlette Response"),
    ],
    ids=["int", "bool", "str"],
)
async def test_view_on_connect_returning_neither_none_nor_response_is_500(
    caplog: pytest.LogCaptureFixture, returned: object, hint: str
) -> None:
    trace = Trace()

    class Odd(EventStreamView):
        async def on_connect(self) -> Any:
            return returned

        async def events(self) -> AsyncIterator[Any]:
            trace.step("events")
            yield "never sent"

    async with EventStreamClient(Odd) as client, client.stream("/") as stream:
        assert stream.status_code == 500
        await stream.wait_ended()
        assert stream.raw == b"Internal Server Error"
    assert trace.steps == []
    logged = [r for r in caplog.records if r.name == "sseviews" and r.levelno >= logging.ERROR]
    assert len(logged) == 1
    message = logged[0].getMessage()
    assert f"Odd.on_connect() returned {returned!r}" in message
    assert hint in message


async def test_view_groups_without_broadcast_is_refused_with_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Class creation accepts it (`Room.broadcast = broadcast` may follow the class
    # statement); the request finds it still unset.
    class Room(EventStreamView):
        groups = ("room",)

        async def events(self) -> AsyncIterator[Any]:
            yield "never sent"

    async with EventStreamClient(Room) as client, client.stream("/") as stream:
        assert stream.status_code == 500
        await stream.wait_ended()
    logged = [r for r in caplog.records if r.name == "sseviews" and r.levelno >= logging.ERROR]
    assert len(logged) == 1
    assert "Room sets groups but no broadcast" in logged[0].getMessage()
    assert "set `broadcast = Broadcast(...)` on the view" in logged[0].getMessage()


# -- values shaped like another SSE library's events ----------------------------------------


async def stream_once(view: type[EventStreamView]) -> bytes:
    async with EventStreamClient(view) as client, client.stream("/") as stream:
        await stream.wait_ended()
        return stream.raw


async def test_view_sse_starlette_tuple_warns_once_per_class() -> None:
    class Ticks(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield ("tick", {"n": 1})
            yield ("tick", {"n": 2})

    with pytest.warns(EventShapeWarning) as caught:
        raw = await stream_once(Ticks)
    # Still sent as sseviews always sent it: the warning says how to name the event.
    assert raw == b'data: ["tick",{"n":1}]\n\ndata: ["tick",{"n":2}]\n\n'
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "Ticks.events() yielded a ('tick', data) tuple" in message
    assert "yield Event(data, event='tick')" in message
    assert caught[0].filename == __file__  # at the view's events()
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        await stream_once(Ticks)  # once per class: the second stream is quiet
    assert [w for w in again if issubclass(w.category, EventShapeWarning)] == []


@pytest.mark.parametrize(
    ("item", "advice"),
    [
        ({"event": "tick", "data": {"n": 1}}, "Event(data, event=...)"),
        ({"data": "hello", "id": "7"}, "Event(data, id=...)"),
        ({"event": "tick", "data": 1, "retry": 5000}, "Event(data, event=..., retry=...)"),
    ],
)
async def test_view_sse_starlette_dict_warns(item: dict[str, Any], advice: str) -> None:
    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        yield Event("an Event first is not looked at")
        yield item

    with pytest.warns(EventShapeWarning, match="sse-starlette") as caught:
        await stream_once(traced_view(Trace(), events))
    assert advice in str(caught[0].message)


@pytest.mark.parametrize(
    "item",
    [
        {"n": 1},
        {"data": [1, 2]},  # a JSON envelope of its own
        {"event": "signup", "user": "ann"},
        ["tick", {"n": 1}],  # a list is meant as a JSON array
        (1, 2),
        ("a", "b", "c"),
        "tick",
    ],
    ids=repr,
)
async def test_view_ordinary_values_do_not_warn(item: Any) -> None:
    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        yield item

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw = await stream_once(traced_view(Trace(), events))
    assert [w for w in caught if issubclass(w.category, EventShapeWarning)] == []
    assert raw == encode_data(item)


async def test_view_on_disconnect_exception_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield "x"

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            raise RuntimeError("cleanup failed")

    async with EventStreamClient(Broken) as client, client.stream("/") as stream:
        assert (await stream.next_event(timeout=2)).data == "x"
        await stream.wait_ended()
    logged = [r for r in caplog.records if r.name == "sseviews" and r.levelno >= logging.ERROR]
    assert any("on_disconnect" in r.getMessage() for r in logged)


async def test_view_on_disconnect_bounded_by_disconnect_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = anyio.Event()

    class Stuck(EventStreamView):
        disconnect_timeout = 0.1

        async def events(self) -> AsyncIterator[Any]:
            yield "x"

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            started.set()
            await anyio.sleep_forever()

    async with EventStreamClient(Stuck) as client:
        with anyio.fail_after(2):
            async with client.stream("/") as stream:
                await stream.wait_ended()
    assert started.is_set()
    assert any(
        r.name == "sseviews" and r.levelno == logging.WARNING and "on_disconnect" in r.getMessage()
        for r in caplog.records
    )


async def test_view_on_disconnect_shielded_when_request_task_cancelled() -> None:
    # A server that gives up on a request cancels its task: on_disconnect still runs
    # to completion, awaits included.
    trace = Trace()
    running = anyio.Event()

    class Cleanup(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            running.set()
            await anyio.sleep_forever()
            yield  # pragma: no cover

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            await anyio.sleep(0.05)
            await anyio.lowlevel.checkpoint()
            trace.disconnect(reason)

    async def receive() -> Message:
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: Message) -> None:
        pass

    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "query_string": b"",
        "headers": [],
        "extensions": {},
    }
    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_await_view, Cleanup, scope, receive, send)
            await running.wait()
            tg.cancel_scope.cancel()
    assert trace.reasons == [DisconnectReason.SHUTDOWN]


async def _await_view(view: type[EventStreamView], scope: Scope, receive: Any, send: Any) -> None:
    await view(scope, receive, send)


# -- ordering: generator finally, then on_disconnect, same task -------------------------


@pytest.mark.parametrize("ending", ["client_closed", "completed", "error", "shutdown"])
async def test_view_on_disconnect_runs_after_generator_finally(ending: str) -> None:
    trace = Trace()

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        trace.step("events")
        try:
            yield "hello"
            if ending == "completed":
                return
            if ending == "error":
                raise ValueError("boom")
            await anyio.sleep_forever()
        finally:
            trace.step("finally")

    async with EventStreamClient(traced_view(trace, events)) as client:
        async with client.stream("/") as stream:
            await stream.next_event(timeout=2)
            if ending == "shutdown":
                await client.shutdown()
        await trace.wait_disconnected()
    assert trace.steps == ["on_connect", "events", "finally", "on_disconnect"]
    assert trace.reasons == [DisconnectReason(ending)]
    assert trace.tasks["events"] == trace.tasks["finally"] == trace.tasks["on_disconnect"]


@pytest.mark.parametrize("ending", ["client_closed", "send_timeout", "shutdown"])
async def test_view_on_disconnect_after_finally_when_suspended_at_blocked_yield(
    ending: str,
) -> None:
    trace = Trace()
    gate = anyio.Event()
    blocked = anyio.Event()

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        trace.step("events")
        await gate.wait()
        try:
            for i in range(10_000):
                if i == 1000:  # far past what the 64 KiB buffer takes
                    blocked.set()
                yield KIB
        except GeneratorExit:
            trace.step("closed at yield")
            raise
        finally:
            trace.step("finally")

    view = traced_view(trace, events, send_timeout=0.3 if ending == "send_timeout" else 30)
    async with EventStreamClient(view, timeout=3) as client:
        async with client.stream("/") as stream:
            stream.pause()
            gate.set()
            await anyio.sleep(0.1)
            # The writer is stuck on the paused client, so events() cannot get far.
            assert not blocked.is_set()
            assert trace.steps == ["on_connect", "events"]
            if ending == "shutdown":
                with anyio.move_on_after(2) as waited:
                    await client.shutdown()
                assert not waited.cancelled_caught, "shutdown waited on a blocked write"
            elif ending == "send_timeout":
                await trace.wait_disconnected()
        await trace.wait_disconnected()
    assert trace.steps == ["on_connect", "events", "closed at yield", "finally", "on_disconnect"]
    assert trace.reasons == [DisconnectReason(ending)]
    assert trace.tasks["events"] == trace.tasks["finally"] == trace.tasks["on_disconnect"]


def fast_producer(trace: Trace) -> Any:
    """A view whose events() always has the next event ready (a replay, a busy feed).

    It gives up by itself after 10 s, so a view that misses the disconnect still ends.
    The tests bound the time from the client's close to the disconnect separately,
    so this only has to outlast a stalled machine between the stream's start and
    the client's close (2 s did not, once, on a loaded CI machine).
    """

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        deadline = anyio.current_time() + 10
        count = 0
        try:
            while anyio.current_time() < deadline:
                count += 1
                yield count
        finally:
            trace.step("finally")

    return traced_view(trace, events)


class CheckpointingReceive:
    """Middleware whose receive() yields to the event loop before answering.

    ASGI says nothing about whether receive() may suspend when a message is ready,
    and wrappers that await anything (Starlette's BaseHTTPMiddleware runs a task
    group per receive) do.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def checkpointing_receive() -> Message:
            await anyio.lowlevel.checkpoint()
            return await receive()

        await self.app(scope, checkpointing_receive, send)


async def passthrough(request: Request, call_next: Any) -> Response:
    response: Response = await call_next(request)
    return response


@pytest.mark.parametrize("wrapping", ["bare", "checkpointing_receive", "base_http_middleware"])
async def test_view_client_closed_noticed_while_events_yield_without_waiting(
    wrapping: str,
) -> None:
    # events() that always has the next event ready must still be stopped when the
    # client goes away, not run on into the void until it ends by itself.
    trace = Trace()
    view = fast_producer(trace)
    app: ASGIApp = view
    if wrapping == "checkpointing_receive":
        app = CheckpointingReceive(view)
    elif wrapping == "base_http_middleware":
        app = Starlette(
            routes=[Route("/", view)],
            middleware=[Middleware(BaseHTTPMiddleware, dispatch=passthrough)],
        )
    async with EventStreamClient(app, timeout=4) as client:
        async with client.stream("/") as stream:
            assert (await stream.next_event(timeout=2)).data == "1"
            left = anyio.current_time()
        elapsed = anyio.current_time() - left
        await trace.wait_disconnected()
    assert trace.reasons == [DisconnectReason.CLIENT_CLOSED]
    assert elapsed < 1.0


@pytest.mark.parametrize("grace", [0, 0.3])
async def test_view_shutdown_not_held_by_a_client_that_stopped_reading(grace: float) -> None:
    # Default send_timeout (30 s): a client that stopped reading must not hold the
    # server's shutdown for the whole send_timeout, with or without a grace period.
    trace = Trace()
    gate = anyio.Event()

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        await gate.wait()
        for _ in range(1000):
            yield KIB

    view = traced_view(trace, events, shutdown_grace_period=grace)
    async with EventStreamClient(view, timeout=5) as client:
        async with client.stream("/") as stream:
            stream.pause()
            gate.set()
            await anyio.sleep(0.1)
            started = anyio.current_time()
            with anyio.move_on_after(3):
                await client.shutdown()
            elapsed = anyio.current_time() - started
            assert trace.reasons == [DisconnectReason.SHUTDOWN]
            assert elapsed < grace + 2.0


async def test_view_on_disconnect_in_same_task_as_events() -> None:
    ids: dict[str, int] = {}

    class Same(EventStreamView):
        async def on_connect(self) -> None:
            ids["on_connect"] = anyio.get_current_task().id

        async def events(self) -> AsyncIterator[Any]:
            ids["events"] = anyio.get_current_task().id
            yield "x"
            ids["events_resumed"] = anyio.get_current_task().id
            await anyio.sleep_forever()

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            ids["on_disconnect"] = anyio.get_current_task().id

    async with EventStreamClient(Same) as client:
        async with client.stream("/") as stream:
            await stream.next_event(timeout=2)
            await anyio.sleep(0.01)
    assert ids["events"] == ids["events_resumed"] == ids["on_disconnect"]
    assert ids["on_disconnect"] != anyio.get_current_task().id


# -- Last-Event-ID -----------------------------------------------------------------


def last_event_id_view(seen: list[str | None], trace: Trace | None = None) -> Any:
    class Resume(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            seen.append(self.last_event_id)
            if trace is not None:
                trace.step("events")
            yield "x"

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            if trace is not None:
                trace.disconnect(reason)

    return Resume


@pytest.mark.parametrize(
    ("url", "headers", "expected"),
    [
        ("/", {}, None),
        ("/", {"Last-Event-ID": "42"}, "42"),
        ("/?lastEventId=17", {}, "17"),
        ("/?lastEventId=17", {"Last-Event-ID": "42"}, "42"),
        ("/?lastEventId=", {}, None),
        ("/", {"Last-Event-ID": ""}, None),
        ("/?lastEventId=a%20b%C3%A9", {}, "a bé"),
        ("/", {"Last-Event-ID": "é✓"}, "é✓"),
        ("/", {"Last-Event-ID": "x" * 1024}, "x" * 1024),
        ("/?lastEventId=" + "y" * 1024, {}, "y" * 1024),
    ],
)
async def test_view_last_event_id(url: str, headers: dict[str, str], expected: str | None) -> None:
    seen: list[str | None] = []
    async with EventStreamClient(last_event_id_view(seen)) as client:
        async with client.stream(url, headers=headers) as stream:
            assert stream.status_code == 200
            await stream.next_event(timeout=2)
    assert seen == [expected]


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("/", {"Last-Event-ID": "x" * 8193}),
        ("/", {"Last-Event-ID": "é" * 4097}),
        ("/?lastEventId=" + "y" * 8193, {}),
        ("/?lastEventId=" + "%C3%A9" * 4097, {}),
        ("/", {"Last-Event-ID": "a\0b"}),
        ("/?lastEventId=a%00b", {}),
    ],
)
async def test_view_last_event_id_invalid_gets_400(url: str, headers: dict[str, str]) -> None:
    seen: list[str | None] = []
    trace = Trace()
    async with EventStreamClient(last_event_id_view(seen, trace)) as client:
        response = await client.get(url, headers=headers)
    assert response.status_code == 400
    assert seen == []
    assert trace.steps == []
    assert trace.reasons == []


async def test_view_on_connect_refusal_wins_over_bad_last_event_id() -> None:
    async with EventStreamClient(refusing_view(401)) as client:
        response = await client.get("/", headers={"Last-Event-ID": "a\0b"})
    assert response.status_code == 401


# -- pings, retry -----------------------------------------------------------------------


async def test_view_ping_sent_when_idle() -> None:
    class Idle(EventStreamView):
        ping_interval = 0.1

        async def events(self) -> AsyncIterator[Any]:
            yield "hello"
            await anyio.sleep_forever()

    async with EventStreamClient(Idle) as client, client.stream("/") as stream:
        assert (await stream.next_event(timeout=2)).data == "hello"
        with anyio.fail_after(2):
            assert await stream.next_comment() == "ping"
            assert await stream.next_comment() == "ping"
        # A comment line alone, no blank line: no client takes it for an event.
        assert stream.raw.startswith(b"data: hello\n\n: ping\n: ping\n")
        with pytest.raises(TimeoutError):
            await stream.next_event(timeout=0.05)


async def test_view_ping_not_sent_while_events_flow() -> None:
    class Busy(EventStreamView):
        ping_interval = 0.15

        async def events(self) -> AsyncIterator[Any]:
            for i in range(20):
                yield i
                await anyio.sleep(0.025)

    async with EventStreamClient(Busy) as client, client.stream("/") as stream:
        with anyio.fail_after(5):
            received = [event.data async for event in stream]
    assert received == [str(i) for i in range(20)]
    assert stream.comments == []


async def test_view_ping_interval_none_disables_pings() -> None:
    class Quiet(EventStreamView):
        ping_interval = None

        async def events(self) -> AsyncIterator[Any]:
            yield "hello"
            await anyio.sleep_forever()

    class Chatty(Quiet):
        ping_interval = 0.05

    async with EventStreamClient(Starlette(routes=[Route("/q", Quiet), Route("/c", Chatty)])) as c:
        async with c.stream("/q") as quiet, c.stream("/c") as chatty:
            await quiet.next_event(timeout=2)
            await chatty.next_event(timeout=2)
            await anyio.sleep(0.3)
            assert len(chatty.comments) >= 2
            assert quiet.comments == []
            assert quiet.raw == b"data: hello\n\n"


async def test_view_ping_message_override() -> None:
    class Custom(EventStreamView):
        ping_interval = 0.05

        def ping_message(self) -> Event:
            return Event({"alive": True}, event="heartbeat")

        async def events(self) -> AsyncIterator[Any]:
            await anyio.sleep_forever()
            yield  # pragma: no cover

    async with EventStreamClient(Custom) as client, client.stream("/") as stream:
        ping = await stream.next_event(timeout=2)
        assert (ping.event, ping.json()) == ("heartbeat", {"alive": True})


async def test_view_ping_message_str_sent_as_comment_line() -> None:
    class Custom(EventStreamView):
        ping_interval = 0.05

        def ping_message(self) -> str:
            return "keep-alive"

        async def events(self) -> AsyncIterator[Any]:
            yield Event("x", id="1")
            await anyio.sleep_forever()

    async with EventStreamClient(Custom) as client, client.stream("/") as stream:
        assert (await stream.next_event(timeout=2)).data == "x"
        with anyio.fail_after(2):
            assert await stream.next_comment() == "keep-alive"
            assert await stream.next_comment() == "keep-alive"
        assert stream.raw.startswith(b"id: 1\ndata: x\n\n: keep-alive\n: keep-alive\n")
        with pytest.raises(TimeoutError):
            await stream.next_event(timeout=0.05)


async def test_view_ping_message_wrong_type_ends_stream_with_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Wrong(EventStreamView):
        ping_interval = 0.05

        def ping_message(self) -> Any:
            return 42

        async def events(self) -> AsyncIterator[Any]:
            await anyio.sleep_forever()
            yield  # pragma: no cover

    async with EventStreamClient(Wrong) as client, client.stream("/") as stream:
        with anyio.fail_after(5):
            assert [event async for event in stream] == []
    assert "keep-alive comment must be a str" in caplog.text


async def test_view_retry_sent_before_any_event() -> None:
    class Retrying(EventStreamView):
        retry = 2500

        async def events(self) -> AsyncIterator[Any]:
            yield "first"

    async with EventStreamClient(Retrying) as client, client.stream("/") as stream:
        await stream.wait_ended()
        assert stream.retry == 2500
        first_event = stream.raw.index(b"data: first")
        assert stream.raw.index(b"retry: 2500\n") < first_event
        # Only comments may come before it.
        head = stream.raw[: stream.raw.index(b"retry: 2500\n")]
        assert all(line.startswith(b":") for line in head.split(b"\n") if line)


async def test_view_retry_none_sends_no_retry() -> None:
    class Plain(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield "first"

    async with EventStreamClient(Plain) as client, client.stream("/") as stream:
        await stream.wait_ended()
        assert stream.retry is None
        assert b"retry" not in stream.raw


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


# -- shutdown ---------------------------------------------------------------------------


async def test_view_shutdown_grace_period_allows_farewell() -> None:
    trace = Trace()
    flags: list[bool] = []

    class Polite(EventStreamView):
        shutdown_grace_period = 2.0

        async def events(self) -> AsyncIterator[Any]:
            flags.append(self.is_shutting_down)
            yield "hello"
            # The documented farewell pattern (docs/lifecycle.md) polls the flag.
            while not self.is_shutting_down:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            flags.append(self.is_shutting_down)
            yield Event("bye", event="farewell")

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.disconnect(reason)

    async with EventStreamClient(Polite) as client, client.stream("/") as stream:
        assert (await stream.next_event(timeout=2)).data == "hello"
        with anyio.fail_after(1.5):
            await client.shutdown()
        farewell = await stream.next_event(timeout=1)
        assert (farewell.event, farewell.data) == ("farewell", "bye")
        with pytest.raises(StreamEnded):
            await stream.next_event(timeout=1)
    assert flags == [False, True]
    assert trace.reasons == [DisconnectReason.SHUTDOWN]


@pytest.mark.parametrize("ending", ["shutdown", "client_closed"])
async def test_view_is_shutting_down_after_the_stream_ended(ending: str) -> None:
    # A closed stream's view lets go of its connection (so that reference
    # counting frees it), except after shutdown, which the view still reports.
    views: list[EventStreamView] = []
    trace = Trace()

    class Feed(EventStreamView):
        async def on_connect(self) -> None:
            views.append(self)

        async def events(self) -> AsyncIterator[Any]:
            yield "hello"
            await anyio.sleep_forever()

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.disconnect(reason)

    async with EventStreamClient(Feed) as client:
        async with client.stream("/") as stream:
            assert (await stream.next_event(timeout=2)).data == "hello"
            if ending == "shutdown":
                with anyio.fail_after(2):
                    await client.shutdown()
        await trace.wait_disconnected()
        for _ in range(5):  # let the request task return
            await anyio.lowlevel.checkpoint()
    assert trace.reasons == [DisconnectReason(ending)]
    assert views[0].is_shutting_down is (ending == "shutdown")


async def test_view_shutdown_grace_period_expires() -> None:
    trace = Trace()

    class Deaf(EventStreamView):
        shutdown_grace_period = 0.2

        async def events(self) -> AsyncIterator[Any]:
            yield "hello"
            await anyio.sleep_forever()

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.disconnect(reason)

    async with EventStreamClient(Deaf) as client, client.stream("/") as stream:
        await stream.next_event(timeout=2)
        started = anyio.current_time()
        with anyio.fail_after(2):
            await client.shutdown()
        elapsed = anyio.current_time() - started
    assert 0.15 <= elapsed < 1.0
    assert trace.reasons == [DisconnectReason.SHUTDOWN]


async def test_view_shutdown_without_grace_ends_at_once() -> None:
    trace = Trace()

    class Polite(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield "hello"
            # The documented farewell pattern (docs/lifecycle.md) polls the flag.
            while not self.is_shutting_down:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            yield "bye"  # pragma: no cover - no grace: never reached

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.disconnect(reason)

    async with EventStreamClient(Polite) as client, client.stream("/") as stream:
        await stream.next_event(timeout=2)
        started = anyio.current_time()
        await client.shutdown()
        assert anyio.current_time() - started < 0.5
        with pytest.raises(StreamEnded):
            await stream.next_event(timeout=1)
    assert trace.reasons == [DisconnectReason.SHUTDOWN]


async def test_view_new_stream_after_shutdown_ends_at_once_so_the_browser_retries() -> None:
    # EventSource gives up for good on any status but 200, so a stream that arrives
    # during shutdown gets 200 and an immediate clean end: the browser retries later.
    trace = Trace()

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        yield "x"  # pragma: no cover

    async with EventStreamClient(traced_view(trace, events)) as client:
        await client.shutdown()
        async with client.stream("/") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
            await stream.wait_ended()
            assert stream.raw == b""
        response = await client.get("/")
        assert response.status_code == 200
        assert response.content == b""
    assert trace.steps == []


# -- class settings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("ping_interval", 0, ValueError),
        ("ping_interval", -1, ValueError),
        ("ping_interval", "15", TypeError),
        ("ping_interval", True, TypeError),
        ("send_timeout", 0, ValueError),
        ("send_timeout", -0.5, ValueError),
        ("send_timeout", "30", TypeError),
        ("shutdown_grace_period", -1, ValueError),
        ("shutdown_grace_period", None, TypeError),
        ("disconnect_timeout", 0, ValueError),
        ("disconnect_timeout", None, TypeError),
        ("retry", -1, ValueError),
        ("retry", 1.5, TypeError),
        ("retry", True, TypeError),
        ("retry", "1000", TypeError),
        ("headers", [("x-a", "1")], TypeError),
        ("headers", "x-a: 1", TypeError),
        ("headers", {"x-a": 1}, TypeError),
        ("headers", {b"x-a": "1"}, TypeError),
    ],
)
def test_view_invalid_class_setting_raises_at_definition(
    name: str, value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match=name):
        type("Bad", (EventStreamView,), {name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ping_interval", None),
        ("ping_interval", 0.5),
        ("send_timeout", None),
        ("shutdown_grace_period", 0),
        ("retry", 0),
        ("retry", None),
        ("headers", {"x-a": "1"}),
    ],
)
def test_view_valid_class_setting_accepted(name: str, value: Any) -> None:
    view = type("Good", (EventStreamView,), {name: value})
    assert getattr(view, name) == value


def test_view_invalid_setting_checked_in_grandchild() -> None:
    class Base(EventStreamView):
        ping_interval = 1

    with pytest.raises(ValueError, match="ping_interval"):

        class Child(Base):
            ping_interval = -1


# -- database sessions ----------------------------------------------------------------


class TrackedSession(AsyncSession):
    """An AsyncSession that records where it was created and closed in `info["trace"]`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.info["trace"].step("session created")

    async def close(self) -> None:
        self.info["trace"].step("session closed")
        await super().close()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'sse.db'}")
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"))
    yield engine
    await engine.dispose()


async def notes(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as connection:
        rows = await connection.execute(text("SELECT body FROM notes ORDER BY id"))
        return [row[0] for row in rows]


def session_view(engine: AsyncEngine, trace: Trace, ending: str) -> Any:
    class Stored(EventStreamView):
        session_factory = async_sessionmaker(engine, class_=TrackedSession, info={"trace": trace})

        async def events(self) -> AsyncIterator[Any]:
            trace.step("events")
            session = self.session
            trace.sessions.append(session)
            await session.execute(text("INSERT INTO notes (body) VALUES ('from events')"))
            await session.commit()
            count = (await session.execute(text("SELECT count(*) FROM notes"))).scalar_one()
            yield {"count": count}
            await end_as(ending)

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.sessions.append(self.session)
            await self.session.execute(
                text("INSERT INTO notes (body) VALUES (:body)"), {"body": f"on {reason.value}"}
            )
            await self.session.commit()
            trace.disconnect(reason)

    return Stored


@pytest.mark.asyncio_only
@pytest.mark.parametrize("ending", ["client_closed", "error", "shutdown", "completed"])
async def test_view_session_created_used_and_closed_in_stream_task(
    engine: AsyncEngine, ending: str, caplog: pytest.LogCaptureFixture
) -> None:
    trace = Trace()
    async with EventStreamClient(session_view(engine, trace, ending)) as client:
        async with client.stream("/") as stream:
            assert (await stream.next_event(timeout=2)).json() == {"count": 1}
            if ending == "shutdown":
                await client.shutdown()
            await anyio.sleep(0.01)
        await trace.wait_disconnected()
    assert trace.reasons == [DisconnectReason(ending)]
    assert trace.steps == [
        "events",
        "session created",
        "on_disconnect",
        "session closed",
    ]
    first, second = trace.sessions
    assert first is second
    task = trace.tasks["events"]
    assert trace.tasks["session created"] == task
    assert trace.tasks["on_disconnect"] == task
    assert trace.tasks["session closed"] == task
    assert await notes(engine) == ["from events", f"on {ending}"]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.asyncio_only
async def test_view_session_holds_connection_until_closed(engine: AsyncEngine) -> None:
    trace = Trace()
    async with EventStreamClient(session_view(engine, trace, "client_closed")) as client:
        async with client.stream("/") as stream:
            await stream.next_event(timeout=2)
            # The SELECT after the commit began a transaction: the session holds a connection.
            assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        await trace.wait_disconnected()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.asyncio_only
async def test_view_session_not_created_when_unused(engine: AsyncEngine) -> None:
    trace = Trace()

    class Unused(EventStreamView):
        session_factory = async_sessionmaker(engine, class_=TrackedSession, info={"trace": trace})

        async def events(self) -> AsyncIterator[Any]:
            yield "x"

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.disconnect(reason)

    async with EventStreamClient(Unused) as client, client.stream("/") as stream:
        await stream.wait_ended()
    assert trace.steps == ["on_disconnect"]


@pytest.mark.asyncio_only
async def test_view_session_first_used_in_on_disconnect(engine: AsyncEngine) -> None:
    trace = Trace()

    class Late(EventStreamView):
        session_factory = async_sessionmaker(engine, class_=TrackedSession, info={"trace": trace})

        async def events(self) -> AsyncIterator[Any]:
            trace.step("events")
            yield "x"

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            await self.session.execute(text("INSERT INTO notes (body) VALUES ('late')"))
            await self.session.commit()
            trace.disconnect(reason)

    async with EventStreamClient(Late) as client, client.stream("/") as stream:
        await stream.wait_ended()
    assert trace.steps == ["events", "session created", "on_disconnect", "session closed"]
    assert trace.tasks["session created"] == trace.tasks["events"]
    assert trace.tasks["session closed"] == trace.tasks["events"]
    assert await notes(engine) == ["late"]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.asyncio_only
async def test_view_session_in_on_connect_raises_runtime_error(engine: AsyncEngine) -> None:
    errors: list[str] = []

    class Early(EventStreamView):
        session_factory = async_sessionmaker(engine)

        async def on_connect(self) -> None:
            try:
                self.session  # noqa: B018
            except RuntimeError as exc:
                errors.append(str(exc))

        async def events(self) -> AsyncIterator[Any]:
            yield "x"

    async with EventStreamClient(Early) as client, client.stream("/") as stream:
        assert (await stream.next_event(timeout=2)).data == "x"
    assert len(errors) == 1
    assert "on_connect" in errors[0]


@pytest.mark.asyncio_only
async def test_view_session_from_another_task_raises_runtime_error(engine: AsyncEngine) -> None:
    errors: list[str] = []

    class Spawner(EventStreamView):
        session_factory = async_sessionmaker(engine)

        async def events(self) -> AsyncIterator[Any]:
            mine = self.session

            def touch() -> None:
                try:
                    self.session  # noqa: B018
                except RuntimeError as exc:
                    errors.append(str(exc))

            async def in_child_task() -> None:
                touch()

            async with anyio.create_task_group() as tg:
                tg.start_soon(in_child_task)
            await asyncio.get_running_loop().create_task(in_child_task())
            assert self.session is mine
            yield "x"

    async with EventStreamClient(Spawner) as client, client.stream("/") as stream:
        assert (await stream.next_event(timeout=2)).data == "x"
    assert len(errors) == 2
    assert all("task" in error for error in errors)


async def test_view_session_without_factory_raises_runtime_error() -> None:
    errors: list[str] = []

    class NoFactory(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            try:
                self.session  # noqa: B018
            except RuntimeError as exc:
                errors.append(str(exc))
            yield "x"

    async with EventStreamClient(NoFactory) as client, client.stream("/") as stream:
        await stream.next_event(timeout=2)
    assert len(errors) == 1
    assert "session_factory" in errors[0]


@pytest.mark.asyncio_only
async def test_view_session_closed_when_events_fail_early(engine: AsyncEngine) -> None:
    trace = Trace()

    class Failing(EventStreamView):
        session_factory = async_sessionmaker(engine, class_=TrackedSession, info={"trace": trace})

        async def events(self) -> AsyncIterator[Any]:
            await self.session.execute(text("SELECT 1"))
            raise RuntimeError("before the first event")
            yield  # pragma: no cover

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.disconnect(reason)

    async with EventStreamClient(Failing) as client, client.stream("/") as stream:
        await stream.wait_ended()
    assert trace.steps == ["session created", "on_disconnect", "session closed"]
    assert trace.reasons == [DisconnectReason.ERROR]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


# -- resources ---------------------------------------------------------------------------


async def wait_for_task_count(count: int) -> None:
    with anyio.fail_after(2):
        while len(asyncio.all_tasks()) != count:  # noqa: ASYNC110 - nothing to wait on
            await anyio.sleep(0.01)


@pytest.mark.asyncio_only
@pytest.mark.parametrize("ending", ["client_closed", "shutdown", "completed", "error"])
async def test_view_no_task_leak(ending: str) -> None:
    proceed = anyio.Event()

    class Ticker(EventStreamView):
        ping_interval = 0.05

        async def events(self) -> AsyncIterator[Any]:
            yield "x"
            await proceed.wait()
            await end_as(ending)

    async with EventStreamClient(Ticker) as client:
        before = len(asyncio.all_tasks())
        async with client.stream("/") as stream:
            await stream.next_event(timeout=2)
            during = len(asyncio.all_tasks())
            proceed.set()
            if ending == "shutdown":
                await client.shutdown()
            if ending in ("completed", "error"):
                await stream.wait_ended()
        await wait_for_task_count(before)
        # The request task, its writer and its listener: nothing else per connection.
        assert during - before <= 3
        assert len(asyncio.all_tasks()) == before


async def test_view_single_writer_never_overlaps_sends() -> None:
    class Busy(EventStreamView):
        ping_interval = 0.01

        async def events(self) -> AsyncIterator[Any]:
            for i in range(300):
                yield KIB if i % 3 == 0 else i
                if i % 10 == 0:
                    await anyio.sleep(0.012)

    app = SendRecorder(Busy)
    async with EventStreamClient(app) as client, client.stream("/") as stream:
        for _ in range(4):
            stream.pause()
            await anyio.sleep(0.03)
            stream.resume()
            await anyio.sleep(0.01)
        await stream.wait_ended()
        count = len([e async for e in stream])
    assert count == 300
    assert app.max_in_flight == 1
    assert app.final_chunk_sent


async def test_view_is_an_asgi_app_in_a_route() -> None:
    class Room(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield {"room": self.request.path_params["room"]}

    app = Starlette(routes=[Route("/rooms/{room}", Room)])
    async with EventStreamClient(app) as client, client.stream("/rooms/lobby") as stream:
        assert (await stream.next_event(timeout=2)).json() == {"room": "lobby"}
