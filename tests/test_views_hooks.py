"""on_connect's answers, and the order a stream ends in: the generator's `finally`,
then on_disconnect, in the same task."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from support.views import KIB, Trace, traced_view

from sseviews import DisconnectReason, EventStreamView
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio


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
