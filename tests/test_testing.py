from __future__ import annotations

import gc
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sseviews import DisconnectReason, Event, EventStreamView, StreamEnded
from sseviews.testing import EventParser, EventStreamClient

pytestmark = pytest.mark.anyio

BOM = "\ufeff".encode()


def feed_all(parser: EventParser, *chunks: bytes) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


# -- EventParser ----------------------------------------------------------------


def test_parser_simple_event() -> None:
    (event,) = EventParser().feed(b"event: e\nid: 1\ndata: hello\n\n")
    assert (event.data, event.event, event.id) == ("hello", "e", "1")


def test_parser_bom_stripped_once() -> None:
    (event,) = EventParser().feed(BOM + b"data: a\n\n")
    assert event.data == "a"
    # A second BOM is part of the first field name, so the line is ignored.
    assert EventParser().feed(BOM + BOM + b"data: a\n\n") == []


def test_parser_bom_split_across_chunks() -> None:
    events = feed_all(EventParser(), BOM[:1], BOM[1:] + b"data: a\n\n")
    assert [event.data for event in events] == ["a"]


def test_parser_bom_only_at_stream_start() -> None:
    parser = EventParser()
    assert [e.data for e in parser.feed(b"data: a\n\n")] == ["a"]
    assert parser.feed(BOM + b"data: b\n\n") == []


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_parser_line_endings(eol: bytes) -> None:
    wire = b"data: a" + eol + b"data: b" + eol + eol + b"data: c" + eol + eol
    assert [e.data for e in EventParser().feed(wire)] == ["a\nb", "c"]


def test_parser_mixed_line_endings() -> None:
    wire = b"data: a\rdata: b\r\ndata: c\n\r\n"
    assert [e.data for e in EventParser().feed(wire)] == ["a\nb\nc"]


def test_parser_crlf_split_across_feeds() -> None:
    parser = EventParser()
    assert parser.feed(b"data: a\r") == []
    # The LF completes the CRLF: it must not count as a second (blank) line.
    assert parser.feed(b"\ndata: b\r") == []
    events = parser.feed(b"\n\r\n")
    assert [e.data for e in events] == ["a\nb"]


def test_parser_cr_then_cr_across_feeds_is_blank_line() -> None:
    parser = EventParser()
    assert parser.feed(b"data: a\r") == []
    assert [e.data for e in parser.feed(b"\r")] == ["a"]


def test_parser_cr_then_empty_chunk_then_lf() -> None:
    parser = EventParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\n") == []
    assert [e.data for e in parser.feed(b"\n")] == ["a"]


def test_parser_multibyte_utf8_split_across_chunks() -> None:
    wire = "data: é😀✓\n\n".encode()
    start = wire.index("😀".encode())
    chunks = [wire[: start + 1], wire[start + 1 : start + 3], wire[start + 3 :]]
    assert [e.data for e in feed_all(EventParser(), *chunks)] == ["é😀✓"]


def test_parser_byte_at_a_time() -> None:
    wire = BOM + "id: 1\r\ndata: é\r\n\r\n: c\rdata: x\r\r".encode()
    events = feed_all(EventParser(), *[wire[i : i + 1] for i in range(len(wire))])
    assert [(e.data, e.id) for e in events] == [("é", "1"), ("x", None)]


def test_parser_comments_collected() -> None:
    parser = EventParser()
    events = parser.feed(b": ping\n:no space\n:  two\ndata: x\n\n:\n\n")
    assert [e.data for e in events] == ["x"]
    assert parser.comments == ["ping", "no space", " two", ""]


def test_parser_only_one_leading_space_removed() -> None:
    (event,) = EventParser().feed(b"data:  x\ndata:y\n\n")
    assert event.data == " x\ny"


def test_parser_retry_digits_only() -> None:
    parser = EventParser()
    parser.feed(b"retry: 3000\n\n")
    assert parser.retry == 3000
    for bad in (b"retry: -1\n", b"retry: 1.5\n", b"retry: 1e3\n", b"retry: \n", b"retry: 12a\n"):
        parser.feed(bad)
        assert parser.retry == 3000
    parser.feed(b"retry:42\n")
    assert parser.retry == 42


def test_parser_id_with_nul_ignored() -> None:
    parser = EventParser()
    (first,) = parser.feed(b"id: 1\ndata: a\n\n")
    (second,) = parser.feed(b"id: 2\0x\ndata: b\n\n")
    assert first.id == "1"
    assert second.id is None
    assert parser.last_event_id == "1"


def test_parser_last_event_id_persists_across_events() -> None:
    parser = EventParser()
    events = parser.feed(b"id: 5\ndata: a\n\ndata: b\n\n")
    assert [e.id for e in events] == ["5", None]
    assert parser.last_event_id == "5"


def test_parser_empty_id_resets_last_event_id() -> None:
    parser = EventParser()
    parser.feed(b"id: 5\ndata: a\n\n")
    (event,) = parser.feed(b"id\ndata: b\n\n")
    assert event.id == ""
    assert parser.last_event_id == ""


def test_parser_event_without_data_not_dispatched() -> None:
    parser = EventParser()
    assert parser.feed(b"event: e\nid: 9\n\n") == []
    # The id still counts (WHATWG sets the last event ID before the data check) ...
    assert parser.last_event_id == "9"
    # ... but the event type is reset.
    (event,) = parser.feed(b"data: x\n\n")
    assert event.event is None


def test_parser_unterminated_event_dropped() -> None:
    parser = EventParser()
    assert parser.feed(b"data: a\n\ndata: b\n") == [Event("a")]
    assert parser.feed(b"data: c") == []


def test_parser_data_without_colon() -> None:
    (event,) = EventParser().feed(b"data\n\n")
    assert event.data == ""
    (event,) = EventParser().feed(b"data\ndata\n\n")
    assert event.data == "\n"


def test_parser_unknown_fields_ignored() -> None:
    (event,) = EventParser().feed(b"foo: bar\nDATA: no\ndata: yes\n\n")
    assert event.data == "yes"


def test_parser_event_field_names_event() -> None:
    parser = EventParser()
    (named, unnamed) = parser.feed(b"event: up\ndata: 1\n\nevent\ndata: 2\n\n")
    assert named.event == "up"
    assert unnamed.event is None


# -- EventStreamClient: apps used below ------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.reasons: list[DisconnectReason] = []
        self.done = anyio.Event()

    def record(self, reason: DisconnectReason) -> None:
        self.reasons.append(reason)
        self.done.set()


def idle_view(recorder: Recorder, **settings: Any) -> type[EventStreamView]:
    class IdleView(EventStreamView):
        ping_interval = settings.get("ping_interval")

        async def events(self) -> AsyncIterator[Any]:
            yield Event("first", id="1")
            await anyio.sleep_forever()

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            recorder.record(reason)

    return IdleView


async def raw_app(body_chunks: list[bytes], scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for chunk in body_chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def raw_stream(*chunks: bytes) -> Any:
    """A bare ASGI app with no lifespan: use it with `EventStreamClient(..., lifespan=False)`."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await raw_app(list(chunks), scope, receive, send)

    return app


# -- EventStreamClient ----------------------------------------------------------


async def test_client_lifespan_runs_with_state_visible_to_requests() -> None:
    log: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        log.append("startup")
        yield {"greeting": "hello"}
        log.append("shutdown")

    async def home(request: Request) -> Response:
        return PlainTextResponse(request.state.greeting)

    class StateView(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield self.request.state.greeting

    app = Starlette(routes=[Route("/", home), Route("/s", StateView)], lifespan=lifespan)
    async with EventStreamClient(app) as client:
        assert log == ["startup"]
        response = await client.get("/")
        assert response.text == "hello"
        async with client.stream("/s") as stream:
            assert (await stream.next_event()).data == "hello"
    assert log == ["startup", "shutdown"]


async def test_client_lifespan_startup_failure_raises() -> None:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("boom")
        yield  # pragma: no cover

    app = Starlette(lifespan=lifespan)
    with pytest.raises(RuntimeError, match="lifespan startup failed"), anyio.fail_after(5):
        async with EventStreamClient(app):
            pass  # pragma: no cover


async def test_client_exception_in_block_propagates_unwrapped() -> None:
    # Like Starlette's TestClient and httpx: a failing assertion or error inside the
    # client block reaches pytest as itself, not wrapped in an ExceptionGroup.
    with pytest.raises(LookupError, match="from the test"):
        async with EventStreamClient(Starlette(), timeout=2):
            raise LookupError("from the test")


async def test_client_app_without_lifespan_works() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError("http only")
        await PlainTextResponse("ok")(scope, receive, send)

    async with EventStreamClient(app, timeout=2) as client:
        assert (await client.get("/")).text == "ok"


async def test_client_app_returning_from_lifespan_scope_works() -> None:
    # A common bare ASGI app: it ignores every scope but "http" by returning. Servers
    # (uvicorn, hypercorn) carry on without a lifespan; so must the test client.
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await PlainTextResponse("ok")(scope, receive, send)

    with anyio.fail_after(3):
        async with EventStreamClient(app, timeout=1) as client:
            assert (await client.get("/")).text == "ok"


async def test_client_closes_its_lifespan_streams() -> None:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = EventStreamClient(Starlette(lifespan=lifespan))
        async with client:
            assert (await client.get("/")).status_code == 404
        del client
        gc.collect()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == []


async def test_client_next_event_returns_events_in_order() -> None:
    app = raw_stream(b"id: 1\nevent: a\ndata: x\n\n", b"data: y\n\n")
    async with EventStreamClient(app, lifespan=False) as client, client.stream("/") as stream:
        first = await stream.next_event(timeout=2)
        second = await stream.next_event(timeout=2)
        assert (first.data, first.event, first.id) == ("x", "a", "1")
        assert (second.data, second.event, second.id) == ("y", None, None)
        assert stream.last_event_id == "1"


async def test_client_next_event_timeout_raises_timeout_error() -> None:
    recorder = Recorder()
    async with EventStreamClient(idle_view(recorder)) as client:
        async with client.stream("/") as stream:
            await stream.next_event(timeout=2)
            with anyio.fail_after(2):
                with pytest.raises(TimeoutError):
                    await stream.next_event(timeout=0.05)
    assert recorder.reasons == [DisconnectReason.CLIENT_CLOSED]


async def test_client_next_event_raises_stream_ended_after_end() -> None:
    app = raw_stream(b"data: a\n\ndata: unterminated\n")
    async with EventStreamClient(app, lifespan=False) as client, client.stream("/") as stream:
        assert (await stream.next_event(timeout=2)).data == "a"
        with pytest.raises(StreamEnded):
            await stream.next_event(timeout=2)
        assert stream.ended
        with pytest.raises(StreamEnded):
            await stream.next_event(timeout=2)


async def test_client_stream_async_iteration_stops_at_end() -> None:
    app = raw_stream(b"data: a\n\n", b"data: b\n\n", b"data: c\n\n")
    async with EventStreamClient(app, lifespan=False) as client, client.stream("/") as stream:
        with anyio.fail_after(2):
            assert [event.data async for event in stream] == ["a", "b", "c"]


async def test_client_stream_exposes_status_headers_raw() -> None:
    app = raw_stream(b"data: a\n\n")
    async with EventStreamClient(app, lifespan=False) as client, client.stream("/") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"] == "text/event-stream"
        await stream.wait_ended()
        assert stream.raw == b"data: a\n\n"


async def test_client_next_comment_exposes_pings() -> None:
    recorder = Recorder()
    app = idle_view(recorder, ping_interval=0.05)
    async with EventStreamClient(app) as client, client.stream("/") as stream:
        assert (await stream.next_event(timeout=2)).data == "first"
        assert await stream.next_comment(timeout=2) == "ping"
        assert await stream.next_comment(timeout=2) == "ping"
        assert stream.comments[:2] == ["ping", "ping"]
        # Comments never show up as events.
        with pytest.raises(TimeoutError):
            await stream.next_event(timeout=0.1)


async def test_client_next_comment_raises_stream_ended() -> None:
    app = raw_stream(b": hello\n\n")
    async with EventStreamClient(app, lifespan=False) as client, client.stream("/") as stream:
        assert await stream.next_comment(timeout=2) == "hello"
        with pytest.raises(StreamEnded):
            await stream.next_comment(timeout=2)


async def test_client_leaving_stream_block_gives_client_closed() -> None:
    recorder = Recorder()
    async with EventStreamClient(idle_view(recorder)) as client:
        async with client.stream("/") as stream:
            await stream.next_event(timeout=2)
            assert recorder.reasons == []
        # Leaving the block waits until the app has finished with the stream.
        assert recorder.reasons == [DisconnectReason.CLIENT_CLOSED]


async def test_client_explicit_disconnect_gives_client_closed() -> None:
    recorder = Recorder()
    async with EventStreamClient(idle_view(recorder)) as client:
        async with client.stream("/") as stream:
            await stream.next_event(timeout=2)
            await stream.disconnect()
            assert recorder.reasons == [DisconnectReason.CLIENT_CLOSED]
            assert stream.ended


async def test_client_shutdown_gives_shutdown() -> None:
    recorder = Recorder()
    async with EventStreamClient(idle_view(recorder)) as client:
        async with client.stream("/") as stream:
            await stream.next_event(timeout=2)
            await client.shutdown()
            assert recorder.reasons == [DisconnectReason.SHUTDOWN]
            assert stream.ended
            with pytest.raises(StreamEnded):
                await stream.next_event(timeout=1)
        assert recorder.reasons == [DisconnectReason.SHUTDOWN]


async def test_client_shutdown_ends_every_open_stream() -> None:
    recorders = [Recorder(), Recorder(), Recorder()]
    routes = [Route(f"/{i}", idle_view(r)) for i, r in enumerate(recorders)]
    async with EventStreamClient(Starlette(routes=routes)) as client:
        async with client.stream("/0") as s0, client.stream("/1") as s1, client.stream("/2") as s2:
            for stream in (s0, s1, s2):
                await stream.next_event(timeout=2)
            await client.shutdown()
    assert [r.reasons for r in recorders] == [[DisconnectReason.SHUTDOWN]] * 3


async def test_client_exit_closes_open_streams() -> None:
    recorder = Recorder()
    client = EventStreamClient(idle_view(recorder))
    with anyio.fail_after(5):
        await client.__aenter__()
        opening = client.stream("/")
        stream = await opening.__aenter__()
        await stream.next_event(timeout=2)
        # Leave the client with the stream still open.
        await client.__aexit__(None, None, None)
        assert recorder.reasons == [DisconnectReason.CLIENT_CLOSED]
        assert stream.ended
        await opening.__aexit__(None, None, None)


async def test_client_request_get_post_for_plain_routes() -> None:
    async def echo(request: Request) -> Response:
        body = await request.body()
        return JSONResponse(
            {
                "method": request.method,
                "body": body.decode(),
                "q": request.query_params.get("q"),
                "x": request.headers.get("x-test"),
                "ct": request.headers.get("content-type"),
            },
            status_code=201 if request.method == "POST" else 200,
        )

    app = Starlette(routes=[Route("/echo", echo, methods=["GET", "POST", "PUT"])])
    async with EventStreamClient(app, headers={"x-test": "default"}) as client:
        got = await client.get("/echo?q=1")
        assert got.status_code == 200
        assert got.json() == {"method": "GET", "body": "", "q": "1", "x": "default", "ct": None}

        posted = await client.post("/echo", json={"a": 1}, headers={"x-test": "mine"})
        assert posted.status_code == 201
        assert posted.json()["body"] == '{"a": 1}'
        assert posted.json()["x"] == "mine"
        assert posted.json()["ct"] == "application/json"

        form = await client.post("/echo", data={"k": "v w"})
        assert form.json()["body"] == "k=v+w"

        put = await client.request("PUT", "/echo", content="raw", params={"q": "2"})
        assert put.json()["body"] == "raw"
        assert put.json()["q"] == "2"

        missing = await client.get("/nope")
        assert missing.status_code == 404
        assert missing.text == "Not Found"


async def test_client_app_exception_reraised() -> None:
    class Boom(Exception):
        pass

    async def broken(request: Request) -> Response:
        raise Boom("from the app")

    app = Starlette(routes=[Route("/broken", broken)])
    async with EventStreamClient(app) as client:
        with pytest.raises(Boom, match="from the app"):
            await client.get("/broken")


async def test_client_app_exception_in_stream_reraised() -> None:
    class Boom(Exception):
        pass

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: a\n\n", "more_body": True})
        raise Boom("mid-stream")

    async with EventStreamClient(app, lifespan=False) as client:
        with pytest.raises(Boom, match="mid-stream"):
            async with client.stream("/") as stream:
                assert (await stream.next_event(timeout=2)).data == "a"
                await stream.next_event(timeout=2)


async def test_client_request_timeout_on_endless_stream() -> None:
    recorder = Recorder()
    async with EventStreamClient(idle_view(recorder), timeout=0.2) as client:
        with anyio.fail_after(3), pytest.raises(TimeoutError):
            await client.get("/")
    assert recorder.reasons == [DisconnectReason.CLIENT_CLOSED]


async def test_client_pause_makes_sends_block() -> None:
    sent: list[int] = []
    go = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await go.wait()
        for i in range(3):
            await send(
                {"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True}
            )
            sent.append(i)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async with EventStreamClient(app, lifespan=False) as client:
        async with client.stream("/") as stream:
            stream.pause()
            go.set()
            await anyio.sleep(0.1)
            assert sent == []
            assert stream.raw == b""
            stream.resume()
            assert [(await stream.next_event(timeout=2)).data for _ in range(3)] == ["0", "1", "2"]
            await stream.wait_ended()
            assert sent == [0, 1, 2]


async def test_client_paused_send_released_by_disconnect() -> None:
    go = anyio.Event()
    finished = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await go.wait()
        await send({"type": "http.response.body", "body": b"data: a\n\n", "more_body": True})
        finished.set()

    async with EventStreamClient(app, lifespan=False) as client:
        with anyio.fail_after(3):
            async with client.stream("/") as stream:
                stream.pause()
                go.set()
                await anyio.sleep(0.05)
                assert not finished.is_set()
            assert finished.is_set()
            assert stream.raw == b""


async def test_client_stream_path_query_and_headers_reach_app() -> None:
    seen: dict[str, Any] = {}

    class Probe(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            request = self.request
            seen.update(
                path=request.url.path,
                query=dict(request.query_params),
                header=request.headers.get("x-probe"),
            )
            yield "ok"

    routes = [Route("/rooms/{room}", Probe)]
    async with EventStreamClient(Starlette(routes=routes)) as client:
        async with client.stream(
            "/rooms/a%20b?x=1", params={"y": "é"}, headers={"X-Probe": "yes"}
        ) as stream:
            assert (await stream.next_event(timeout=2)).data == "ok"
    assert seen == {"path": "/rooms/a b", "query": {"x": "1", "y": "é"}, "header": "yes"}


async def test_client_refused_stream_has_status_and_text() -> None:
    class Refuse(EventStreamView):
        async def on_connect(self) -> Response | None:
            return PlainTextResponse("go away", status_code=403)

    async with EventStreamClient(Refuse) as client, client.stream("/") as stream:
        assert stream.status_code == 403
        await stream.wait_ended()
        assert stream.text == "go away"
        with pytest.raises(StreamEnded):
            await stream.next_event(timeout=1)


async def test_client_two_clients_have_separate_shutdown() -> None:
    first, second = Recorder(), Recorder()
    view_a, view_b = idle_view(first), idle_view(second)
    async with EventStreamClient(view_a) as client_a, EventStreamClient(view_b) as client_b:
        async with client_a.stream("/") as a, client_b.stream("/") as b:
            await a.next_event(timeout=2)
            await b.next_event(timeout=2)
            await client_a.shutdown()
            assert first.reasons == [DisconnectReason.SHUTDOWN]
            assert second.reasons == []
            assert not b.ended
    assert second.reasons == [DisconnectReason.CLIENT_CLOSED]
