"""on_disconnect: the reason it is given, its errors, its time bound and its shield."""

from __future__ import annotations

import gc
import logging
import warnings
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.types import Message, Scope
from support.views import KIB, SendRecorder, Trace, traced_view

from sseviews import ERROR_EVENT, DisconnectReason, Event, EventStreamView, StreamEnded
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio


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
