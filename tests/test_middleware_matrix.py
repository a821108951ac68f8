"""The middleware matrix: a stream's ASGI I/O stays in the stream's own tasks.

The rule: every call of a stream's ASGI `send` and `receive` runs in a task that
belongs to that stream (the request task, or a task it starts and always awaits
before returning), in the request's contextvars context, and is awaited to
completion in the task that started it. `Broadcast.publish()` only hands bytes to
each subscriber and wakes the stream; it never starts a stream's send. Middleware
relies on this: OpenTelemetry parents its "http send" spans on the current context,
and an anyio cancel scope around `send` must be exited in the task that entered it.

Each test serves one app, with the middleware under test, under a real uvicorn in
this test's own event loop (so it reads what the app recorded directly), and opens
one stream with a raw socket client:

- fast: reads everything as it comes;
- slow: a 4 KiB `SO_RCVBUF`, no reading until uvicorn has paused writing to it (its
  next `send` waits), then 4 KiB reads with 1 ms pauses.

The server's listening socket has a fixed 16 KiB `SO_SNDBUF`, so a reader that
stops fills the connection after a few tens of KiB. Group events are published by
`POST /publish`: another request, so another task in another context. The views:

- `generator`: `events()` yields 2000 events as fast as it can, then idles;
- `groups`: `broadcast` and `groups` set, no `events()`;
- `subscription`: `events()` relays `self.subscription`.

Every case checks that the events arrive complete and in order and that closing
the client ends the stream with `on_disconnect(CLIENT_CLOSED)` within 2 s; each
middleware adds its own check. Event padding is random, so gzip cannot shrink it.
One more test checks that a middleware's in-place edit of a response's headers
(GZipMiddleware adds Content-Encoding) stays in that response.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import httpx
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from support.apps import app_for
from support.asgi_recorder import RecorderMiddleware, RequestRecord, task_context_token
from support.inprocess import RunningServer, serve_in_process
from support.raw import RawEventStream

from sseviews import Broadcast, DisconnectReason, Event, EventStreamView

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

VIEWS = ("generator", "groups", "subscription")
READERS = ("fast", "slow")
GROUP = "room"
#: Events the generator view yields before it idles (about 350 KB).
GENERATOR_EVENTS = 2000
#: Events per POST /publish (about 38 KB).
BATCH = 40
#: Batches published to a fast reader.
FAST_BATCHES = 3
#: Most batches published to a slow reader before uvicorn must have paused writing.
MAX_FILL_BATCHES = 30
SERVER_SNDBUF = 16 * 1024
SLOW_RCVBUF = 4 * 1024
#: Bound on opening a stream, and on each POST.
REQUEST_TIMEOUT = 5.0
#: Bound on reading a stream's events.
READ_TIMEOUT = 8.0
#: on_disconnect(CLIENT_CLOSED) must be recorded within this long after the client closed.
DISCONNECT_BOUND = 2.0


def random_pad(size: int) -> str:
    return base64.b64encode(os.urandom(size)).decode("ascii")


# -- the app ---------------------------------------------------------------------------


@dataclass
class StreamRecord:
    """What one stream's view recorded about itself."""

    view: str
    reason: DisconnectReason | None = None
    disconnected_at: float | None = None
    done: anyio.Event = field(default_factory=anyio.Event)


@dataclass
class AppState:
    broadcast: Broadcast = field(default_factory=Broadcast)
    streams: dict[str, StreamRecord] = field(default_factory=dict)  # by ?tag=
    publisher_tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)  # RecorderMiddleware's


def build_app(state: AppState, middleware: Sequence[Middleware]) -> Starlette:
    """Three stream views and a publisher, behind `middleware` (outermost first)."""
    broadcast = state.broadcast

    class RecordingView(EventStreamView):
        ping_interval = 0.25  # pings from the timer while idle: writes of their own
        send_timeout = 30.0  # a slow reader is never dropped during a test
        max_buffer_events = 100_000
        max_buffer_bytes = 256 * 1024 * 1024
        view_name = ""

        async def on_connect(self) -> None:
            state.streams[self.request.query_params["tag"]] = StreamRecord(self.view_name)

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            record = state.streams[self.request.query_params["tag"]]
            record.reason = reason
            record.disconnected_at = anyio.current_time()
            record.done.set()

    class GeneratorView(RecordingView):
        view_name = "generator"

        async def events(self) -> AsyncIterator[Event]:
            for n in range(GENERATOR_EVENTS):
                yield Event({"n": n, "pad": random_pad(120)}, id=n)
            await anyio.sleep_forever()

    class GroupView(RecordingView):
        view_name = "groups"
        broadcast = state.broadcast
        groups: ClassVar[list[str]] = [GROUP]

    class SubscriptionView(RecordingView):
        view_name = "subscription"
        broadcast = state.broadcast
        groups: ClassVar[list[str]] = [GROUP]

        async def events(self) -> AsyncIterator[Event]:
            async for event in self.subscription:
                yield event

    async def publish(request: Request) -> Response:
        task = asyncio.current_task()
        assert task is not None
        state.publisher_tasks.append(task)
        start = int(request.query_params["start"])
        count = int(request.query_params["count"])
        for n in range(start, start + count):
            await broadcast.publish(GROUP, {"n": n, "pad": random_pad(680)})
        return PlainTextResponse("published")

    return app_for(
        broadcast,
        Route("/generator", GeneratorView),
        Route("/groups", GroupView),
        Route("/subscription", SubscriptionView),
        Route("/publish", publish, methods=["POST"]),
        middleware=middleware,
    )


# -- the middleware under test (besides OpenTelemetry's and Starlette's) ------------


class FailAfterSend:
    """Bound every `send` with `anyio.fail_after(30)`, as timeout middleware does; with
    `checkpoint`, yield to the event loop inside the scope before sending."""

    def __init__(self, app: ASGIApp, *, checkpoint: bool) -> None:
        self.app = app
        self.checkpoint = checkpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_within(message: Message) -> None:
            with anyio.fail_after(30):
                if self.checkpoint:
                    await anyio.lowlevel.checkpoint()
                await send(message)

        await self.app(scope, receive, send_within)


class ReceiveWrapper:
    """Wrap `receive()` and nothing else, as body-size limits and request loggers do."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def wrapped_receive() -> Message:
            return await receive()

        await self.app(scope, wrapped_receive, send)


async def call_next_only(request: Request, call_next: RequestResponseEndpoint) -> Response:
    return await call_next(request)


def gzip_that_compresses_streams() -> Middleware:
    """GZipMiddleware compressing `text/event-stream` too (Starlette excludes it by default)."""
    if "exclude_content_types" in inspect.signature(GZipMiddleware).parameters:
        return Middleware(GZipMiddleware, minimum_size=0, exclude_content_types=())
    return Middleware(GZipMiddleware, minimum_size=0)  # older Starlette compresses it anyway


STARLETTE_MIDDLEWARE: dict[str, Callable[[], Middleware]] = {
    "base_http": lambda: Middleware(BaseHTTPMiddleware, dispatch=call_next_only),
    "gzip": lambda: Middleware(GZipMiddleware, minimum_size=0),
    "gzip_compressing": gzip_that_compresses_streams,
    "receive_wrapper": lambda: Middleware(ReceiveWrapper),
}
#: Request headers each Starlette middleware case sends.
STARLETTE_HEADERS: dict[str, Mapping[str, str]] = {
    "gzip": {"Accept-Encoding": "gzip"},
    "gzip_compressing": {"Accept-Encoding": "gzip"},
}


# -- one stream through the matrix ---------------------------------------------------------


@dataclass
class Harness:
    server: RunningServer
    state: AppState
    http: httpx.AsyncClient
    published: int = 0
    publish_statuses: list[int] = field(default_factory=list)

    async def publish_batch(self) -> None:
        with anyio.fail_after(REQUEST_TIMEOUT):
            response = await self.http.post(
                "/publish", params={"start": self.published, "count": BATCH}
            )
        self.publish_statuses.append(response.status_code)
        self.published += BATCH

    async def wait_write_paused(
        self, client_port: int, record: StreamRecord, *, seconds: float
    ) -> bool:
        """Poll until uvicorn pauses writing to `client_port`: False after `seconds`, or
        at once if the stream has ended."""
        for _ in range(max(1, int(seconds / 0.005))):
            if self.server.write_paused(client_port):
                return True
            if record.reason is not None:
                return False
            await anyio.sleep(0.005)
        return self.server.write_paused(client_port)


@asynccontextmanager
async def harness(
    middleware: Sequence[Middleware], state: AppState | None = None
) -> AsyncIterator[Harness]:
    state = AppState() if state is None else state
    app = build_app(state, middleware)
    async with serve_in_process(app, sndbuf=SERVER_SNDBUF) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=REQUEST_TIMEOUT) as http:
            yield Harness(server, state, http)


@dataclass
class StreamRun:
    """One stream's run: what the client got, and how the view says it ended."""

    view: str
    reader: str
    tag: str
    stream: RawEventStream
    expected: int
    record: StreamRecord
    # The reason, if the stream had already ended before the client closed it.
    ended_before_close: DisconnectReason | None
    closed_at: float

    def numbers(self) -> list[int]:
        return [json.loads(event.data)["n"] for event in self.stream.events]


async def run_stream(
    h: Harness, view: str, reader: str, *, headers: Mapping[str, str] | None = None
) -> StreamRun:
    """Open a stream, get it its events (slow readers first fill the socket), read them,
    close the client, and wait (bounded) for on_disconnect."""
    slow = reader == "slow"
    tag = f"{view}-{reader}"
    with anyio.fail_after(REQUEST_TIMEOUT):
        stream = await RawEventStream.open(
            h.server.port,
            f"/{view}?tag={tag}",
            rcvbuf=SLOW_RCVBUF if slow else None,
            headers=headers,
        )
    try:
        assert stream.status == 200, (stream.status, stream.headers)
        record = h.state.streams[tag]
        port = stream.local_port
        # A stream that ends on its own while the socket fills is reported, with its
        # reason, by assert_delivered_and_closed().
        if view == "generator":
            expected = GENERATOR_EVENTS
            if slow:
                paused = await h.wait_write_paused(port, record, seconds=REQUEST_TIMEOUT)
                assert paused or record.reason is not None, (
                    "uvicorn never paused writing to the reader that stopped reading"
                )
        elif slow:
            for _ in range(MAX_FILL_BATCHES):
                await h.publish_batch()
                if await h.wait_write_paused(port, record, seconds=0.1):
                    break
                if record.reason is not None:
                    break
            else:
                pytest.fail(f"uvicorn never paused writing after {h.published} events")
            await h.publish_batch()  # more, while the stream's writes are blocked
            expected = h.published
        else:
            expected = FAST_BATCHES * BATCH
        with anyio.move_on_after(READ_TIMEOUT):
            if view != "generator" and not slow:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stream.read_events, expected)
                    for _ in range(FAST_BATCHES):
                        await h.publish_batch()
            else:
                await stream.read_events(expected, slow=slow)
        ended_before_close = record.reason
    finally:
        closed_at = anyio.current_time()
        stream.close()
    with anyio.move_on_after(DISCONNECT_BOUND):
        await record.done.wait()
    return StreamRun(view, reader, tag, stream, expected, record, ended_before_close, closed_at)


def assert_delivered_and_closed(run: StreamRun) -> None:
    """All events, in order, then on_disconnect(CLIENT_CLOSED) soon after the client left."""
    numbers = run.numbers()
    got = f"{len(numbers)} of {run.expected} events"
    assert run.ended_before_close is None, (
        f"the stream ended with {run.ended_before_close} before the client closed it, after {got}"
    )
    assert numbers == list(range(run.expected)), _first_difference(numbers, run.expected)
    assert run.record.reason is not None, (
        f"on_disconnect was not called within {DISCONNECT_BOUND}s of the client closing"
    )
    assert run.record.reason is DisconnectReason.CLIENT_CLOSED, run.record.reason
    assert run.record.disconnected_at is not None
    assert run.record.disconnected_at - run.closed_at <= DISCONNECT_BOUND


def _first_difference(numbers: list[int], expected: int) -> str:
    for index, (got, want) in enumerate(zip(numbers, range(expected), strict=False)):
        if got != want:
            return f"event {index} is n={got}, expected n={want} ({len(numbers)} events in all)"
    return f"got {len(numbers)} events in order, expected {expected}"


# -- 1. a pure ASGI middleware that records tasks and contexts ---------------------------


def io_rule_violations(state: AppState, stream: RequestRecord) -> dict[str, list[str]]:
    """The ways the stream's send/receive calls break the rule: each way, with the calls
    (described) that break it that way."""
    publishers = {id(request.task) for request in state.requests if request.method == "POST"}
    publishers |= {id(task) for task in state.publisher_tasks}
    problems: dict[str, list[str]] = {}
    for call in stream.calls:
        wrong = []
        if call.token_at_start != stream.token or call.token_at_end != stream.token:
            wrong.append("ran outside this request's contextvars context")
        if call.outcome in (None, "closed"):
            wrong.append("was not awaited to completion")
        elif call.task_at_end is not call.task_at_start:
            wrong.append("was finished in another task than the one that started it")
        task = call.task_at_start
        if task is None:
            wrong.append("was started outside any task")
        elif id(task) in publishers:
            wrong.append("was started in the publishing request's task")
        elif task is not stream.task and sys.version_info >= (3, 12):
            if task_context_token(task) != stream.token:
                wrong.append("was started in a task whose context is not this request's")
        if wrong:
            problems.setdefault(", ".join(wrong), []).append(call.describe())
    if stream.left_running:
        way = "(tasks) made calls and were still running when the request returned"
        problems[way] = [repr(task) for task in stream.left_running]
    return problems


def describe_violations(problems: dict[str, list[str]], stream: RequestRecord) -> str:
    lines = [f"{len(stream.calls)} calls; request task: {stream.task_name()}"]
    for way, calls in problems.items():
        lines.append(f"{len(calls)} call(s) {way}; the first: {calls[0]}")
    return "\n".join(lines)


@pytest.mark.parametrize("receive", ["wrapped", "server"])
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("view", VIEWS)
async def test_recorder_sees_every_send_and_receive_in_the_stream_task_and_context(
    view: str, reader: str, receive: str
) -> None:
    """Every call starts in the request's context, in the request task or one of its own
    (never the publisher's), and ends in the task that started it; helper tasks are done
    before the request returns. With `receive` = "server" the middleware passes the
    server's own receive() on unwrapped, as a send-only middleware does (a core that
    treats a server's receive() specially takes that path), and records sends only."""
    state = AppState()
    wrap_receive = receive == "wrapped"
    recorder = Middleware(RecorderMiddleware, requests=state.requests, wrap_receive=wrap_receive)
    async with harness([recorder], state) as h:
        run = await run_stream(h, view, reader)
        stream = next(request for request in h.state.requests if f"tag={run.tag}" in request.query)
        with anyio.fail_after(REQUEST_TIMEOUT):
            await stream.finished.wait()
        sends = [call for call in stream.calls if call.kind == "send"]
        receives = [call for call in stream.calls if call.kind == "receive"]
        assert len(sends) >= 3, f"only {len(sends)} sends recorded"  # the head, then events
        if wrap_receive:
            assert receives, "no receive() call recorded"
        problems = io_rule_violations(h.state, stream)
        assert len(problems) == 0, describe_violations(problems, stream)
        assert h.publish_statuses == [200] * len(h.publish_statuses)
        assert_delivered_and_closed(run)


# -- 2. OpenTelemetry's ASGI middleware ------------------------------------------------------


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("view", VIEWS)
async def test_opentelemetry_send_spans_belong_to_the_stream_trace(view: str, reader: str) -> None:
    """Each "http send" span of the stream is a child of the stream's server span: none
    lands in the trace of the POST that published the event."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        middleware = [Middleware(OpenTelemetryMiddleware, tracer_provider=provider)]
        async with harness(middleware) as h:
            run = await run_stream(h, view, reader)
            server_span = await wait_server_span(exporter, f"GET /{view}")
            assert h.publish_statuses == [200] * len(h.publish_statuses)
        spans = exporter.get_finished_spans()
        assert server_span.context is not None
        sends = [span for span in spans if span.name == f"GET /{view} http send"]
        assert len(sends) >= 3, f"only {len(sends)} send spans"
        publish_traces = {
            span.context.trace_id
            for span in spans
            if span.kind is SpanKind.SERVER and span.name.startswith("POST") and span.context
        }
        misplaced = [
            span
            for span in sends
            if span.context is None
            or span.context.trace_id != server_span.context.trace_id
            or span.parent is None
            or span.parent.span_id != server_span.context.span_id
        ]
        in_publish_traces = [
            span for span in misplaced if span.context and span.context.trace_id in publish_traces
        ]
        assert len(misplaced) == 0, (
            f"{len(misplaced)} of {len(sends)} 'http send' spans of the stream are not children "
            f"of its server span; {len(in_publish_traces)} of them are in a publishing POST's "
            "trace"
        )
        assert_delivered_and_closed(run)
    finally:
        provider.shutdown()


async def wait_server_span(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    """The server span `name`, once the request has ended and exported it."""
    with anyio.fail_after(REQUEST_TIMEOUT):
        while True:
            for span in exporter.get_finished_spans():
                if span.kind is SpanKind.SERVER and span.name == name:
                    return span
            await anyio.sleep(0.01)


# -- 3. a send wrapper with an anyio cancel scope ------------------------------------------


@pytest.mark.parametrize("checkpoint", ["send_only", "checkpoint_then_send"])
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("view", VIEWS)
async def test_fail_after_send_wrapper_never_ends_the_stream_with_error(
    view: str, reader: str, checkpoint: str
) -> None:
    """`with anyio.fail_after(30): await send(message)` only works when each send is
    awaited to completion in the task that entered the scope: otherwise anyio refuses
    to exit the scope, the send raises, and the stream ends with ERROR."""
    middleware = [Middleware(FailAfterSend, checkpoint=checkpoint == "checkpoint_then_send")]
    async with harness(middleware) as h:
        run = await run_stream(h, view, reader)
        assert run.ended_before_close is not DisconnectReason.ERROR, (
            f"the stream ended with ERROR after {len(run.numbers())} of {run.expected} events"
        )
        assert h.publish_statuses == [200] * len(h.publish_statuses)
        assert_delivered_and_closed(run)


# -- 4. Starlette's middleware, and one that wraps receive() --------------------------------


@pytest.mark.parametrize("middleware", list(STARLETTE_MIDDLEWARE))
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("view", VIEWS)
async def test_starlette_middleware_keeps_events_in_order_and_notices_disconnect(
    view: str, reader: str, middleware: str
) -> None:
    """BaseHTTPMiddleware (its own task and a memory stream between app and server),
    GZipMiddleware (which holds the response head until the first body, and with
    `gzip_compressing` compresses each chunk), and a receive() wrapper."""
    async with harness([STARLETTE_MIDDLEWARE[middleware]()]) as h:
        run = await run_stream(h, view, reader, headers=STARLETTE_HEADERS.get(middleware))
        if middleware == "gzip_compressing":
            assert run.stream.headers.get("content-encoding") == "gzip", run.stream.headers
        assert h.publish_statuses == [200] * len(h.publish_statuses)
        assert_delivered_and_closed(run)


async def test_gzip_header_edits_stay_in_their_own_response() -> None:
    """ASGI lets a middleware edit the messages it passes on, and GZipMiddleware adds
    Content-Encoding to the head's header list in place: a compressed stream must not
    make a later, uncompressed one claim `Content-Encoding: gzip`."""
    async with harness([gzip_that_compresses_streams()]) as h:
        with anyio.fail_after(REQUEST_TIMEOUT):
            compressed = await RawEventStream.open(
                h.server.port, "/generator?tag=compressed", headers={"Accept-Encoding": "gzip"}
            )
            compressed.close()
            plain = await RawEventStream.open(h.server.port, "/generator?tag=plain")
            try:
                assert compressed.headers.get("content-encoding") == "gzip", compressed.headers
                assert "content-encoding" not in plain.headers, (
                    f"a stream that was not compressed says it is: {plain.headers}"
                )
                events = await plain.read_events(10)
            finally:
                plain.close()
        assert [json.loads(event.data)["n"] for event in events[:10]] == list(range(10))
