"""Test endless event streams in-process: `EventStreamClient` and a WHATWG SSE parser.

Starlette's `TestClient` and httpx's `ASGITransport` wait for the whole response
body, so they hang on a stream that never ends. `EventStreamClient` drives any ASGI
app directly (no server, no sockets), parses the body as it arrives, and hands
events to the test one at a time:

    async with EventStreamClient(app) as client:
        async with client.stream("/clock") as stream:
            event = await stream.next_event(timeout=2)

Leaving the `stream` block disconnects the client (the view sees `CLIENT_CLOSED`);
`await client.shutdown()` shuts the server down (the view sees `SHUTDOWN`).
"""

from __future__ import annotations

import codecs
import json as jsonlib
import re
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, unquote, urlencode, urlsplit

import anyio
import anyio.abc
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Scope

from ._compression import Decoder
from ._events import Event
from ._eventtypes import EventTypes
from ._exceptions import StreamEnded
from ._lifecycle import ShutdownSignal
from ._reserved import EVENT_CHECKS_KEY, RESET_EVENT, SHUTDOWN_KEY

__all__ = ["EventParser", "EventStream", "EventStreamClient", "StreamEnded", "TestResponse"]

_LINE_END = re.compile(r"[\r\n]")
_DIGITS = re.compile(r"[0-9]+")


@contextmanager
def _collapse_groups() -> Iterator[None]:
    """Re-raise a task group's single error as itself, as a test expects to see it."""
    try:
        yield
    except BaseExceptionGroup as group:
        while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
            inner = group.exceptions[0]
            if not isinstance(inner, BaseExceptionGroup):
                raise inner from inner.__cause__
            group = inner
        raise


class EventParser:
    """An incremental parser of `text/event-stream` bodies, as browsers parse them.

    It follows the WHATWG HTML "Server-sent events" parsing rules: an optional
    leading BOM, lines ending in CRLF, LF or CR (even split across chunks),
    comments, `event`, `data`, `id` (ignored when it contains NUL) and `retry`
    (digits only) fields, and dispatch on a blank line. An event with no data is
    not dispatched, and an unfinished event at the end of the stream is dropped.

    Attributes:
        last_event_id: The browser's "last event ID" after the events parsed so far.
        retry: The last valid `retry` value (milliseconds), or None.
        comments: The text of every comment line seen (one leading space removed).
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""
        self._started = False
        self._after_cr = False
        self._data: list[str] = []
        self._event_type = ""
        self._id_buffer = ""
        self._message_id: str | None = None
        self.last_event_id = ""
        self.retry: int | None = None
        self.comments: list[str] = []

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse the next chunk of the body and return the events it completed."""
        text = self._decoder.decode(chunk)
        if not self._started and text:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
        if self._after_cr and text:
            self._after_cr = False
            if text[0] == "\n":
                text = text[1:]
        buffer = self._pending + text
        events: list[Event] = []
        position = 0
        end = len(buffer)
        while True:
            match = _LINE_END.search(buffer, position)
            if match is None:
                break
            index = match.start()
            line = buffer[position:index]
            if buffer[index] == "\r":
                if index + 1 < end:
                    position = index + 2 if buffer[index + 1] == "\n" else index + 1
                else:
                    position = index + 1
                    self._after_cr = True  # a CRLF may be split across chunks
            else:
                position = index + 1
            self._line(line, events)
        self._pending = buffer[position:]
        return events

    def _line(self, line: str, events: list[Event]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line[0] == ":":
            comment = line[1:]
            self.comments.append(comment[1:] if comment.startswith(" ") else comment)
            return
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event_type = value
        elif field == "id":
            if "\0" not in value:
                self._id_buffer = value
                self._message_id = value
        elif field == "retry":
            if _DIGITS.fullmatch(value):
                self.retry = int(value)

    def _dispatch(self, events: list[Event]) -> None:
        self.last_event_id = self._id_buffer
        message_id, self._message_id = self._message_id, None
        if not self._data:
            self._event_type = ""
            return
        data = "\n".join(self._data)
        self._data = []
        event_type, self._event_type = self._event_type, ""
        events.append(Event(data, event=event_type or None, id=message_id))


class TestResponse:
    """A complete, non-streamed response returned by `EventStreamClient.request`."""

    __test__ = False  # not a pytest test class

    def __init__(self, status_code: int, headers: Headers, content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body decoded as JSON."""
        return jsonlib.loads(self.content)

    def __repr__(self) -> str:
        return f"<TestResponse [{self.status_code}]>"


class _Exchange:
    """One request/response exchange with the app, run in the client's task group."""

    def __init__(self, client: EventStreamClient, scope: Scope, body: bytes) -> None:
        self.client = client
        self.scope = scope
        self.body = body
        self.status_code: int | None = None
        self.headers = Headers()
        self.raw = bytearray()
        self.wire = bytearray()  # the body as sent: compressed, for a compressed stream
        self.decoder: Decoder | None = None
        self.ended = False
        self.error: BaseException | None = None
        self.parser = EventParser()
        self.events: deque[Event] = deque()
        self._request_sent = False
        self._disconnected = anyio.Event()
        self._flowing: anyio.Event | None = None  # None while not paused
        self._changed = anyio.Event()
        self.done = anyio.Event()
        # Events that did not match the view's event_types (raised to the test).
        self.mismatches: list[str] = []
        self._relayed: tuple[EventTypes, str] | None = None

    def event_mismatch(self, message: str) -> None:
        """Called by a declared view for an event that does not match its declaration."""
        self.mismatches.append(message)
        self.notify()

    def check_relayed(self, event_types: EventTypes, view_name: str) -> None:
        """Called by a declared view that relays group events: check them as parsed."""
        self._relayed = (event_types, view_name)

    def _check_parsed(self, events: list[Event]) -> None:
        assert self._relayed is not None
        event_types, view_name = self._relayed
        for event in events:
            if event.event == RESET_EVENT:
                continue  # sent by the Broadcast itself, not declared by the view
            problem = event_types.problem(event.event, event.data)
            if problem is not None:
                name = event.event or "message"
                self.mismatches.append(
                    f"{view_name} sent event {name!r} that does not match its event_types: "
                    f"{problem}; sent {event.data!r}"
                )

    def notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    async def receive(self) -> Message:
        if not self._request_sent:
            self._request_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        if not self._disconnected.is_set():
            # Like uvicorn: once disconnected, receive() answers without waiting.
            await self._disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self._disconnected.is_set():
            return  # like a real server: writes after a disconnect are dropped
        kind = message["type"]
        if kind == "http.response.start":
            if self.status_code is not None:
                raise RuntimeError("the app sent http.response.start twice")
            self.status_code = message["status"]
            self.headers = Headers(raw=list(message.get("headers", [])))
            encoding = self.headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":
                self.decoder = Decoder(encoding)  # ValueError for one it cannot read
        elif kind == "http.response.body":
            if self.status_code is None:
                raise RuntimeError("the app sent a body before http.response.start")
            if self.ended:
                raise RuntimeError("the app sent a body after the response ended")
            while self._flowing is not None and not self._disconnected.is_set():
                await self._flowing.wait()  # a paused client: the write blocks
            if self._disconnected.is_set():
                return
            chunk: bytes = message.get("body", b"")
            self.wire += chunk
            if chunk and self.decoder is not None:
                try:
                    chunk = self.decoder.decode(chunk)
                except ValueError as exc:
                    self.fail_decoding(str(exc))
                    chunk = b""
            if chunk:
                self.raw += chunk
                parsed = self.parser.feed(chunk)
                if self._relayed is not None:
                    self._check_parsed(parsed)
                self.events.extend(parsed)
            if not message.get("more_body", False):
                self.ended = True
                decoder = self.decoder
                if decoder is not None and not decoder.ended and self.scope["method"] != "HEAD":
                    self.fail_decoding(
                        f"the app ended a {decoder.name} response before the end of its encoding"
                    )
        self.notify()

    def fail_decoding(self, problem: str) -> None:
        """A compressed body that does not decode: raised to the test at its next read."""
        if self.error is None:
            self.error = AssertionError(problem)

    async def run(self, app: ASGIApp) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            self.error = exc
        finally:
            self.ended = True
            self.done.set()
            self.notify()

    def disconnect(self) -> None:
        self._disconnected.set()
        if self._flowing is not None:
            self._flowing.set()
        self.notify()

    def pause(self) -> None:
        if self._flowing is None:
            self._flowing = anyio.Event()

    def resume(self) -> None:
        flowing, self._flowing = self._flowing, None
        if flowing is not None:
            flowing.set()


class EventStream:
    """An open stream returned by `EventStreamClient.stream()`.

    Attributes:
        status_code: The response status.
        headers: The response headers (case-insensitive).
        comments: Every comment received (pings included), in order.
    """

    def __init__(self, exchange: _Exchange, timeout: float) -> None:
        self._exchange = exchange
        self._timeout = timeout
        self._comments_read = 0

    @property
    def status_code(self) -> int:
        assert self._exchange.status_code is not None
        return self._exchange.status_code

    @property
    def headers(self) -> Headers:
        return self._exchange.headers

    @property
    def comments(self) -> list[str]:
        return self._exchange.parser.comments

    @property
    def last_event_id(self) -> str:
        """The browser's last event ID: the last `id` field seen, kept across events."""
        return self._exchange.parser.last_event_id

    @property
    def retry(self) -> int | None:
        """The last `retry` value received, in milliseconds."""
        return self._exchange.parser.retry

    @property
    def raw(self) -> bytes:
        """Every body byte received so far (decoded, for a compressed stream)."""
        return bytes(self._exchange.raw)

    @property
    def wire(self) -> bytes:
        """Every body byte received so far, as sent (compressed, for a compressed stream)."""
        return bytes(self._exchange.wire)

    @property
    def text(self) -> str:
        """The body received so far, decoded as UTF-8 (for refusals: the error text)."""
        return self._exchange.raw.decode("utf-8", errors="replace")

    @property
    def ended(self) -> bool:
        """True once the app has ended the response (or returned)."""
        return self._exchange.ended

    def _raise_mismatch(self) -> None:
        mismatches = self._exchange.mismatches
        if mismatches:
            lines = "\n".join(f"  - {each}" for each in mismatches)
            mismatches.clear()
            raise AssertionError(f"the stream sent events that break its event_types:\n{lines}")

    def _raise_app_error(self) -> None:
        self._raise_mismatch()
        error = self._exchange.error
        if error is not None:
            self._exchange.error = None
            raise error

    # The API asks for a per-call timeout on reads; every other wait uses the
    # client's default, or the caller's own anyio.fail_after.
    async def next_event(self, timeout: float | None = None) -> Event:  # noqa: ASYNC109
        """Return the next dispatched event; comments and pings are skipped.

        Args:
            timeout: Seconds to wait; the client's default when omitted.

        Raises:
            TimeoutError: No event arrived in time.
            StreamEnded: The stream ended and every event was read.
            AssertionError: The view declares `event_types` and sent an event that
                does not match them (the view did not send it).
        """
        exchange = self._exchange
        self._raise_mismatch()
        with anyio.fail_after(self._timeout if timeout is None else timeout):
            while not exchange.events:
                self._raise_app_error()
                if exchange.ended:
                    raise StreamEnded("the stream has ended and every event was read")
                await exchange.wait_changed()
        return exchange.events.popleft()

    async def next_comment(self, timeout: float | None = None) -> str:  # noqa: ASYNC109
        """Return the next comment (a ping, by default) not returned before."""
        exchange = self._exchange
        with anyio.fail_after(self._timeout if timeout is None else timeout):
            while len(exchange.parser.comments) <= self._comments_read:
                self._raise_app_error()
                if exchange.ended:
                    raise StreamEnded("the stream has ended and every comment was read")
                await exchange.wait_changed()
        self._comments_read += 1
        return exchange.parser.comments[self._comments_read - 1]

    async def wait_ended(self) -> None:
        """Wait until the app ends the response; `TimeoutError` after the client's timeout."""
        exchange = self._exchange
        with anyio.fail_after(self._timeout):
            while not exchange.ended:
                await exchange.wait_changed()
        self._raise_app_error()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            try:
                yield await self.next_event()
            except StreamEnded:
                return

    def pause(self) -> None:
        """Stop reading: the app's next write blocks, as it would on a full socket."""
        self._exchange.pause()

    def resume(self) -> None:
        """Read again after `pause()`."""
        self._exchange.resume()

    async def disconnect(self) -> None:
        """Close the connection and wait until the app has finished with it.

        Raises:
            TimeoutError: The app was still running after the client's timeout.
        """
        exchange = self._exchange
        exchange.disconnect()
        with anyio.fail_after(self._timeout):
            await exchange.done.wait()
        self._raise_app_error()


class EventStreamClient:
    """Drive an ASGI app in-process and read its event streams one event at a time.

    Args:
        app: Any ASGI app: a Starlette or FastAPI app, a router, or a view class.
        base_url: Scheme and host the requests claim to come to.
        headers: Headers sent with every request.
        lifespan: Run the app's lifespan on enter and exit (when the app has one).
        timeout: Default seconds for every wait (`next_event`, disconnects, ...).

    `async with EventStreamClient(app) as client:` runs the app's lifespan startup;
    leaving the block closes open streams and runs the lifespan shutdown.

    Every event a view with `event_types` sends is checked against them: a
    mismatch raises `AssertionError` from the stream's next read, or when its
    `stream()` block is left (see Typed streams).
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        app: ASGIApp,
        *,
        base_url: str = "http://testserver",
        headers: Mapping[str, str] | None = None,
        lifespan: bool = True,
        timeout: float = 5.0,
    ) -> None:
        self.app = app
        split = urlsplit(base_url)
        self._scheme = split.scheme or "http"
        self._host = split.hostname or "testserver"
        self._port = split.port or (443 if self._scheme == "https" else 80)
        self._base_path = split.path.rstrip("/")
        self._headers = dict(headers or {})
        self._lifespan = lifespan
        self.timeout = timeout
        self.shutdown_signal = ShutdownSignal()
        self.state: dict[str, Any] = {}
        self._exchanges: set[_Exchange] = set()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._lifespan_send: Any = None
        self._lifespan_receive: Any = None
        self._lifespan_streams: list[Any] = []
        self._lifespan_running = False

    async def __aenter__(self) -> Self:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        try:
            if self._lifespan:
                await self._startup()
        except BaseException as exc:
            self._task_group.cancel_scope.cancel()
            try:
                with _collapse_groups():
                    await self._task_group.__aexit__(type(exc), exc, exc.__traceback__)
            finally:
                for stream in self._lifespan_streams:
                    stream.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        task_group = self._task_group
        assert task_group is not None
        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(self.timeout * 2):
                for exchange in list(self._exchanges):
                    exchange.disconnect()
                for exchange in list(self._exchanges):
                    await exchange.done.wait()
                if self._lifespan_running:
                    await self._lifespan_shutdown()
        finally:
            task_group.cancel_scope.cancel()
            try:
                with _collapse_groups():
                    await task_group.__aexit__(exc_type, exc, tb)
            finally:
                for stream in self._lifespan_streams:
                    stream.close()
        return None

    # -- lifespan -------------------------------------------------------------

    async def _startup(self) -> None:
        assert self._task_group is not None
        to_app_send, to_app_receive = anyio.create_memory_object_stream[Message](4)
        from_app_send, from_app_receive = anyio.create_memory_object_stream[Message](4)
        self._lifespan_send, self._lifespan_receive = to_app_send, from_app_receive
        self._lifespan_streams = [to_app_send, to_app_receive, from_app_send, from_app_receive]
        scope: Scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }

        async def run() -> None:
            try:
                await self.app(scope, to_app_receive.receive, from_app_send.send)
            except BaseException as exc:
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    raise
                # Apps without lifespan support raise; say so instead of hanging.
                ended: Message = {"type": "sseviews.lifespan.ended", "error": exc}
            else:
                # Bare ASGI apps often just return for scopes they don't handle.
                ended = {"type": "sseviews.lifespan.ended", "error": None}
            with suppress(anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
                from_app_send.send_nowait(ended)

        self._task_group.start_soon(run)
        with anyio.fail_after(self.timeout):
            await to_app_send.send({"type": "lifespan.startup"})
            message = await from_app_receive.receive()
        if message["type"] == "lifespan.startup.failed":
            raise RuntimeError(f"lifespan startup failed: {message.get('message', '')}")
        if message["type"] == "sseviews.lifespan.ended":
            return  # the app has no lifespan
        self._lifespan_running = True

    async def _lifespan_shutdown(self) -> None:
        self._lifespan_running = False
        await self._lifespan_send.send({"type": "lifespan.shutdown"})
        message = await self._lifespan_receive.receive()
        if message["type"] == "sseviews.lifespan.ended" and message["error"] is not None:
            raise RuntimeError(f"lifespan shutdown failed: {message['error']!r}")
        if message["type"] == "lifespan.shutdown.failed":
            raise RuntimeError(f"lifespan shutdown failed: {message.get('message', '')}")

    # -- requests -------------------------------------------------------------

    def _scope(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        body: bytes,
    ) -> Scope:
        split = urlsplit(url)
        path = self._base_path + (split.path or "/")
        query = split.query
        if params:
            query = (query + "&" if query else "") + urlencode(params)
        merged = {"host": self._host if self._port in (80, 443) else f"{self._host}:{self._port}"}
        merged.update({k.lower(): v for k, v in self._headers.items()})
        merged.update({k.lower(): v for k, v in (headers or {}).items()})
        if body and "content-length" not in merged:
            merged["content-length"] = str(len(body))
        raw_headers = [(k.encode("latin-1"), v.encode("utf-8")) for k, v in merged.items()]
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": method.upper(),
            "scheme": self._scheme,
            "path": unquote(path),
            "raw_path": quote(path, safe="/%:@!$&'()*+,;=").encode("ascii"),
            "root_path": "",
            "query_string": query.encode("latin-1", errors="strict")
            if query.isascii()
            else query.encode("utf-8"),
            "headers": raw_headers,
            "client": ("testclient", 50000),
            "server": (self._host, self._port),
            "state": dict(self.state),
            "extensions": {SHUTDOWN_KEY: self.shutdown_signal},
        }

    def _start(self, scope: Scope, body: bytes) -> _Exchange:
        if self._task_group is None:
            raise RuntimeError("use `async with EventStreamClient(app) as client:` first")
        exchange = _Exchange(self, scope, body)
        scope["extensions"][EVENT_CHECKS_KEY] = exchange  # a declared view reports here
        self._exchanges.add(exchange)

        async def run() -> None:
            try:
                await exchange.run(self.app)
            finally:
                self._exchanges.discard(exchange)

        self._task_group.start_soon(run)
        return exchange

    @asynccontextmanager
    async def stream(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        content: bytes = b"",
    ) -> AsyncIterator[EventStream]:
        """Open a stream; leaving the block disconnects it.

        The block is entered once the response head has arrived, so
        `stream.status_code` and `stream.headers` are set (a refused stream has
        its error status, and its body in `stream.text` once it has ended).

        Raises:
            TimeoutError: No response head arrived within the client's timeout.
        """
        exchange = self._start(self._scope(method, url, headers, params, content), content)
        stream = EventStream(exchange, self.timeout)
        try:
            with anyio.fail_after(self.timeout):
                while exchange.status_code is None:
                    if exchange.done.is_set():
                        stream._raise_app_error()
                        raise RuntimeError("the app returned without starting a response")
                    await exchange.wait_changed()
            yield stream
        finally:
            with anyio.CancelScope(shield=True):
                await stream.disconnect()

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        content: bytes | str | None = None,
        json: Any = None,
        data: Mapping[str, str] | None = None,
    ) -> TestResponse:
        """Send a plain request and return its whole response (not for streams).

        Raises:
            TimeoutError: The response did not end within the client's timeout
                (use `stream()` for event streams).
        """
        headers = dict(headers or {})
        body = b""
        if json is not None:
            body = jsonlib.dumps(json).encode()
            headers.setdefault("content-type", "application/json")
        elif data is not None:
            body = urlencode(data).encode()
            headers.setdefault("content-type", "application/x-www-form-urlencoded")
        elif content is not None:
            body = content.encode() if isinstance(content, str) else content
        exchange = self._start(self._scope(method, url, headers, params, body), body)
        try:
            with anyio.fail_after(self.timeout):
                await exchange.done.wait()
        finally:
            exchange.disconnect()
        if exchange.error is not None:
            raise exchange.error
        if exchange.status_code is None:
            raise RuntimeError("the app returned without starting a response")
        return TestResponse(exchange.status_code, exchange.headers, bytes(exchange.raw))

    async def get(self, url: str, **kwargs: Any) -> TestResponse:
        """Send a GET request (see `request`)."""
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> TestResponse:
        """Send a POST request (see `request`)."""
        return await self.request("POST", url, **kwargs)

    async def shutdown(self) -> None:
        """Shut the server down: every open stream ends with `SHUTDOWN`.

        Waits until every open request has finished.

        Raises:
            TimeoutError: A request was still running after the client's timeout.
        """
        self.shutdown_signal.trigger()
        with anyio.fail_after(self.timeout):
            for exchange in list(self._exchanges):
                await exchange.done.wait()
