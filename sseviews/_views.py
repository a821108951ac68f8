"""`EventStreamView`, the class-based SSE endpoint users subclass."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ._admission import admit, read_last_event_id
from ._broadcast import Broadcast, Subscription
from ._checks import (
    check_events,
    check_hook_names,
    check_hooks,
    check_setting_names,
    check_settings,
    lookalike_problem,
    warn_lookalike,
)
from ._events import Event
from ._eventtypes import EventTypes, compile_event_types
from ._lifecycle import DisconnectReason
from ._logging import printable
from ._metrics import Metrics
from ._runtime import current_runtime
from ._stream import Stream

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["EventStreamView"]

logger = logging.getLogger("sseviews")

_UNSET: Any = object()


class EventStreamView:
    """A Server-Sent Events endpoint: subclass it, override the hooks, route to the class.

    The class itself is an ASGI app, like Starlette's `HTTPEndpoint`, so
    `Route("/clock", ClockView)` works, and there is one instance per connection.

    Hooks, in order: `on_connect()` before any byte is sent (raise `HTTPException`
    or return a `Response` to refuse), `events()` for the stream itself, and
    `on_disconnect(reason)` exactly once after `events()` has been closed, whatever
    ended the stream.
    """

    ping_interval: ClassVar[float | None] = 15.0
    """Seconds without any write after which a keep-alive ping is sent (see
    `ping_message()`); None sends no pings."""
    send_timeout: ClassVar[float | None] = 30.0
    """Seconds one write may block before the client is dropped with `SEND_TIMEOUT`;
    None: no limit."""
    retry: ClassVar[int | None] = None
    """Reconnection delay (milliseconds) sent to the browser before any event; None
    sends none, and the browser keeps its default (about 3 s)."""
    error_retry: ClassVar[int | None] = 10_000
    """Reconnection delay (milliseconds) sent with the `sseviews.error` event that ends
    a stream whose `events()` raised, so that clients of a failing stream come back
    later instead of at once: a random value from half to 1.5 times this, so that
    they do not all come back together. None sends the event without `retry:`."""
    headers: ClassVar[Mapping[str, str]] = {}
    """Extra response headers; they may override the defaults (`cache-control`, ...)."""
    compress: ClassVar[bool | tuple[str, ...]] = False
    """Compress the stream when the request's `Accept-Encoding` allows it: False
    (never), True (every encoding installed, preferring gzip, then zstd, then br), or a tuple of
    encodings in order of preference, such as `("zstd", "br", "gzip")`. gzip needs
    nothing; br needs `sseviews[brotli]` and zstd `sseviews[zstd]`. Each event is
    flushed as it is sent (see the Compression page)."""
    shutdown_grace_period: ClassVar[float] = 0.0
    """Seconds `events()` may go on after shutdown starts, to send a farewell and
    return (see `is_shutting_down`)."""
    disconnect_timeout: ClassVar[float] = 5.0
    """Upper bound (seconds) on `on_disconnect()`, and again on closing the session
    after it."""
    # Typed Any: a callable class attribute would otherwise be read as a method.
    session_factory: ClassVar[Any] = None
    """A SQLAlchemy `async_sessionmaker`: `self.session` is then opened, used and
    closed in the stream task. None: no session."""
    broadcast: ClassVar[Broadcast | None] = None
    """The `Broadcast` whose groups this view streams; None: no groups."""
    groups: ClassVar[Any] = ()
    """Group names: a list, or a (sync or async) method that returns them for the
    request. It runs once per connection, after `on_connect()`."""
    max_buffer_events: ClassVar[int] = 1000
    """Live group events a connection may hold before it ends with `SLOW_CONSUMER`."""
    max_buffer_bytes: ClassVar[int] = 1024 * 1024
    """Bytes of live group events a connection may hold (whichever bound, this or
    `max_buffer_events`, is reached first)."""
    max_groups: ClassVar[int] = 64
    """Most groups one connection may join (at most 256: the stream's id carries a
    position per group); more gets 400."""
    max_connections: ClassVar[int | None] = None
    """Most streams of this view open at once in this process; more get 503 with
    `Retry-After`. None: no limit."""
    retry_after: ClassVar[int] = 5
    """The `Retry-After` (seconds) sent with the 503 of `max_connections`."""
    metrics: ClassVar[Metrics | None] = None
    """A `Metrics` instance that counts this view's streams; None counts nothing."""
    tokens: ClassVar[Any] = None
    """A `sseviews.tokens.StreamTokens`: streams then need a valid token (401
    without). None: no token needed."""
    token_cookie: ClassVar[str | None] = None
    """The cookie a token may also come in (after `?token=` and
    `Authorization: Bearer`)."""
    max_lifetime: ClassVar[float | None] = None
    """Seconds (±10% jitter) after which a stream ends with `LIFETIME`; None: no
    limit."""
    announce_presence: ClassVar[bool] = False
    """With `presence_info()`: when the stream joins its groups, and when it leaves,
    send each group an ephemeral `sseviews.join` / `sseviews.leave` event (no id,
    never stored or replayed) whose data is the presence entry."""
    presence_info_max_bytes: ClassVar[int] = 1024
    """Largest `presence_info()` accepted, in bytes of JSON: a larger one is refused
    with 500 and a log line, never truncated."""
    token_claims: dict[str, Any] | None = None
    """The verified claims of the stream's token (None when the view has no `tokens`)."""
    event_types: ClassVar[Mapping[str, Any] | None] = None
    """The events the view sends: SSE event name (`"message"` for unnamed events) to
    payload type, for example `{"tick": Tick}`. Each event sent is checked against it
    (see Typed streams); None declares nothing and checks nothing."""
    _event_types: ClassVar[EventTypes | None] = None  # event_types, compiled
    # Streams (and requests being answered) of this class open in this process: the
    # limit protects this process, so it counts here (see __init_subclass__).
    _open_streams: ClassVar[int] = 0
    # Whether this class has warned about a yielded value shaped like another SSE
    # library's event (see _checks.lookalike_problem): once per class.
    _lookalike_warned: ClassVar[bool] = False
    # A list or tuple `groups`, once checked by a request (see _admission).
    _checked_groups: ClassVar[tuple[Any, int, tuple[str, ...]] | None] = None
    # _look_at bound to the class once, so that a stream holds no callable of its own.
    _looker: ClassVar[Callable[[object], None]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_setting_names(cls, EventStreamView)  # first: it explains a check below
        check_settings(cls)
        check_events(cls, EventStreamView)
        check_hooks(cls)
        check_hook_names(cls, EventStreamView)
        cls._event_types = compile_event_types(cls)
        cls._open_streams = 0  # each view class counts its own streams
        cls._lookalike_warned = False
        cls._checked_groups = None
        cls._looker = functools.partial(_look_at, cls)

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise TypeError(f"{type(self).__name__} serves HTTP requests, not {scope['type']!r}")
        self.scope = scope
        self.receive = receive
        self.send = send
        self._request: Request | None = None
        self._last_event_id: str | None = _UNSET
        self._connection: Stream | None = None
        metrics = self.metrics
        self._counters = metrics.for_view(type(self).__name__) if metrics is not None else None

    def __await__(self) -> Generator[Any, None, None]:
        return self.dispatch().__await__()

    # -- hooks ----------------------------------------------------------------

    async def on_connect(self) -> Response | None:
        """Run before any byte is sent; raise `HTTPException` or return a `Response` to refuse."""
        return None

    async def events(self) -> AsyncIterator[Any]:
        """Yield the stream's events: `Event`s, or values sent as the data of unnamed events.

        Not overriding it streams the view's groups (see `broadcast` and `groups`).
        """
        raise NotImplementedError(
            f"{type(self).__name__} must override events() (an async generator), "
            "or set broadcast and groups to stream group events"
        )
        yield  # pragma: no cover - makes this an async generator

    async def on_disconnect(self, reason: DisconnectReason) -> None:
        """Run once after `events()` has been closed, with the reason the stream ended."""

    def authorize_group(self, group: str) -> bool | Awaitable[bool]:
        """Decide whether this request may join `group` (sync or async); False gets 403."""
        return True

    def presence_info(self) -> Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None:
        """Return the stream's presence info, sync or async (None: the stream is not listed)."""
        return None

    def ping_message(self) -> Event | str:
        """Return the keep-alive sent after `ping_interval` of silence.

        Returns:
            A `str`, sent as a comment line (`: ping\n` by default) with no blank
            line after it, which no client dispatches as an event; or an `Event`,
            sent as an event (the page sees it, for example `Event("", event="ping")`).
        """
        return "ping"

    # -- context --------------------------------------------------------------

    @property
    def request(self) -> Request:
        """The Starlette `Request` of this connection (made on first use)."""
        request = self._request
        if request is None:
            request = self._request = Request(self.scope, self.receive)
        return request

    @property
    def last_event_id(self) -> str | None:
        """The `Last-Event-ID` header, else the `lastEventId` query parameter, else None.

        Raises:
            HTTPException: 400 when the value is longer than 8192 UTF-8 bytes,
                contains NUL, or is not valid UTF-8.
        """
        if self._last_event_id is _UNSET:
            self._last_event_id = read_last_event_id(self.scope)
        return self._last_event_id

    @property
    def subscription(self) -> Subscription:
        """The view's group events (replay first, then live), for an overridden `events()`.

        Iterate it inside `events()` to merge group events with your own:
        `async for event in self.subscription: yield event`.

        Raises:
            RuntimeError: The view has no `broadcast`/`groups`, or the stream has
                not started.
        """
        connection = self._connection
        subscription = connection.subscription if connection is not None else None
        if subscription is None:
            raise RuntimeError(
                f"{type(self).__name__}.subscription needs broadcast and groups set on the "
                "view, and exists only inside events()"
            )
        return subscription

    def describe(self) -> str:
        """Name this connection in log lines: view, path and client address."""
        client = self.scope.get("client")
        who = f"{client[0]}:{client[1]}" if client else "unknown client"
        return f"{type(self).__name__} {printable(self.scope.get('path', ''))} ({who})"

    @property
    def is_shutting_down(self) -> bool:
        """True once the server has started shutting down (see `shutdown_grace_period`)."""
        connection = self._connection
        return connection is not None and connection.shutting_down

    @property
    def session(self) -> AsyncSession:
        """The view's `AsyncSession`, made by `session_factory` in the stream task.

        It is created on first use inside `events()` or `on_disconnect()`, only ever
        used from the task that iterates `events()`, and closed in that task right
        after `on_disconnect()` returns.

        Raises:
            RuntimeError: `session_factory` is not set, or the session is used
                outside `events()`/`on_disconnect()` (for example in `on_connect()`)
                or from another task.
        """
        factory = self.session_factory
        if factory is None:
            raise RuntimeError(
                f"{type(self).__name__}.session needs a session_factory "
                "(for example session_factory = async_sessionmaker(engine))"
            )
        stream = self._connection
        if stream is None or stream.task is None or current_runtime().task_key() != stream.task:
            raise RuntimeError(
                "self.session is only available inside events() and on_disconnect(), in the "
                "task that iterates events(): it is created and closed in that task so that it "
                "is never shared between tasks (on_connect() runs before the stream exists)"
            )
        return stream.session_from(factory)  # type: ignore[no-any-return]

    # -- the ASGI endpoint ----------------------------------------------------

    async def dispatch(self) -> None:
        """Serve the request: refuse it, answer HEAD, or run the stream."""
        view = type(self)
        # The slot is taken before any await, so a burst cannot overshoot max_connections.
        view._open_streams += 1
        try:
            # admit() returns before the stream starts, so its frame is freed: only
            # this frame (and the stream's) stays alive while the stream is open.
            answer = await admit(self, EventStreamView, view._open_streams, self._counters)
            if not isinstance(answer, Stream):
                await answer(self.scope, self.receive, self.send)
                return
            self._connection = answer
            try:
                await answer.serve(*self._handover(answer))
            finally:
                if not answer.shutting_down:  # is_shutting_down stays True after one
                    # The view and its stream refer to each other: unlinked, a closed
                    # stream is freed at once by reference counting instead of waiting,
                    # with all it holds, for a full garbage collection.
                    self._connection = None
        finally:
            view._open_streams -= 1

    def _handover(
        self, stream: Stream
    ) -> tuple[AsyncIterator[Any] | None, Callable[[object], None] | None]:
        """What the stream needs of `events()`: the checked iterator (None: the view
        streams its subscription directly, or the stream failed), and the look at
        the first value that is not an `Event` (None once the class has warned)."""
        events = None
        if stream.source is None:
            events = self._events(stream)
        elif self._event_types is not None:
            self._event_types.relayed(self)  # checked by a test client, if any
        view = type(self)
        return events, None if view._lookalike_warned else view._looker

    def _events(self, stream: Stream) -> AsyncIterator[Any] | None:
        """`events()`, checked against `event_types`; None (the stream fails) if it
        is not an async generator."""
        agen = self.events()
        if not hasattr(agen, "__anext__"):
            if inspect.iscoroutine(agen):
                agen.close()  # an `async def` without `yield`: never started
            logger.error(
                "%s: events() must be an async generator (an async def with yield)",
                self.describe(),
            )
            stream.fail()
            return None
        event_types = self._event_types
        if event_types is not None:  # views without a declaration pay nothing per event
            agen = event_types.checked(self, agen)
        return agen


def _look_at(view: type[EventStreamView], item: object) -> None:
    """Warn (once per class) when `item` is shaped like another SSE library's event."""
    problem = lookalike_problem(item)
    if problem is not None:
        view._lookalike_warned = True
        warn_lookalike(view, view.events, problem)


EventStreamView._looker = functools.partial(_look_at, EventStreamView)
