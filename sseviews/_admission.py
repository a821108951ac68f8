"""Admission: a request becomes a refusal, or a stream ready to start.

`admit()` decides, in this order: the method and `max_connections`; the server's
shutdown; the stream token; `on_connect()`; `Last-Event-ID`; the groups (each
through the token's groups and `authorize_group()`); HEAD; the presence entry;
the subscription (its replay position); the presence join. Each refusal is
logged and counted here, and returned as an ASGI app for the view to send. A
request that passes gets its `Stream`, with its source, its planned end and
its presence set, and not yet started.

Admission depends on the view only through `Applicant`, the few settings, hooks
and properties it reads.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from collections.abc import Awaitable, Mapping
from http.cookies import SimpleCookie
from typing import Any, ClassVar, Protocol
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._broadcast import (
    Broadcast,
    Subscription,
    check_group,
    claim_unconnected_report,
    new_member_id,
    open_subscription,
    was_connected,
)
from ._checks import on_connect_result_problem, wiring_problem
from ._compression import (
    accept_encoding,
    make_encoder,
    mark_negotiated,
    negotiate,
    offered_encodings,
)
from ._events import Event
from ._exceptions import BackendError, BroadcastNotConnected, InvalidLastEventId, InvalidToken
from ._lifecycle import DisconnectReason, find_shutdown_signal
from ._logging import printable
from ._metrics import ViewCounters
from ._presence import encode_entry
from ._reserved import EXPIRED_EVENT
from ._stream import Stream, StreamOwner, first_chunk, response_start

__all__ = [
    "MAX_LAST_EVENT_ID_BYTES",
    "Applicant",
    "admit",
    "read_last_event_id",
    "read_token",
]

logger = logging.getLogger("sseviews")

# A composite id of a stream of the most groups (256 positions of at most 29 bytes)
# fits in it.
MAX_LAST_EVENT_ID_BYTES = 8192
# Long enough for any JWT a browser would carry; anything longer is not ours.
MAX_TOKEN_BYTES = 8192

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}
_EXPIRED_FAREWELL = Event({"reason": "expired"}, event=EXPIRED_EVENT).encode()


class Applicant(StreamOwner, Protocol):
    """What admission reads of the view (`EventStreamView` is one), besides what
    the stream it admits reads."""

    max_connections: ClassVar[int | None]
    retry_after: ClassVar[int]
    tokens: ClassVar[Any]
    token_cookie: ClassVar[str | None]
    max_lifetime: ClassVar[float | None]
    groups: ClassVar[Any]
    max_groups: ClassVar[int]
    max_buffer_events: ClassVar[int]
    max_buffer_bytes: ClassVar[int]
    presence_info_max_bytes: ClassVar[int]
    # (groups, max_groups, their unique names) once a request checked a list or
    # tuple set on the class: see _resolve_groups.
    _checked_groups: ClassVar[tuple[Any, int, tuple[str, ...]] | None]
    scope: Scope
    receive: Receive
    send: Send
    token_claims: dict[str, Any] | None

    @property
    def last_event_id(self) -> str | None: ...

    async def on_connect(self) -> Response | None: ...

    def authorize_group(self, group: str) -> bool | Awaitable[bool]: ...

    def presence_info(self) -> Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None: ...


class _HeadOnly:
    """Answer with the stream's head and one last body chunk, without a stream."""

    __slots__ = ("body", "head")

    def __init__(self, head: Message, body: bytes) -> None:
        self.head = head
        self.body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(self.head)
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


async def admit(
    view: Applicant, base: type, open_streams: int, counters: ViewCounters | None
) -> ASGIApp | Stream:
    """Decide what to answer: an ASGI app to send (a refusal, HEAD), or the stream.

    Args:
        view: The view that serves the request.
        base: `EventStreamView`: what the view overrides is read against it.
        open_streams: The view's open streams in this process, this one included.
        counters: The view's metrics, if it has any.
    """
    scope = view.scope
    if scope["method"] not in ("GET", "HEAD"):
        return _refuse(
            view,
            counters,
            PlainTextResponse(
                "Method Not Allowed", status_code=405, headers={"Allow": "GET, HEAD"}
            ),
        )
    limit = view.max_connections
    if limit is not None and open_streams > limit:
        return _refuse(
            view,
            counters,
            PlainTextResponse(
                "Too many open streams",
                status_code=503,
                headers={"Retry-After": str(view.retry_after)},
            ),
            level=logging.WARNING,
            detail=f"{limit} streams open (max_connections)",
        )
    shutdown = find_shutdown_signal(scope)
    if shutdown is not None and shutdown.is_set:
        logger.info("%s: refused a new stream during shutdown", view.describe())
        return _end_at_once(view, counters)
    try:
        if view.tokens is not None:  # before on_connect(), which may read token_claims
            view.token_claims = check_token(scope, view.tokens, view.token_cookie)
        refusal = await view.on_connect()
        if refusal is None:
            _ = view.last_event_id  # 400 for a bad one, after authentication
    except HTTPException as exc:
        refusal = _refusal(exc)
    if refusal is not None:
        if not isinstance(refusal, Response):
            return _refuse(
                view,
                counters,
                PlainTextResponse("Internal Server Error", status_code=500),
                level=logging.ERROR,
                detail=on_connect_result_problem(type(view).__name__, refusal),
            )
        return _refuse(view, counters, refusal)
    groups: list[str] = []
    broadcast = view.broadcast
    if broadcast is None:
        # After on_connect(): a view that only ever refuses (a 204 that tells old
        # clients to stop, say) needs nothing to stream.
        problem = wiring_problem(type(view), base)
        if problem is not None:
            return _refuse(
                view,
                counters,
                PlainTextResponse("Internal Server Error", status_code=500),
                level=logging.ERROR,
                detail=problem,
            )
    else:
        try:
            groups = await _resolve_groups(view, base)
        except HTTPException as exc:
            return _refuse(view, counters, _refusal(exc))
    encoding = None
    if view.compress:
        encoding = negotiate(accept_encoding(scope), offered_encodings(view.compress))
    if scope["method"] == "HEAD":  # answered as GET would be, without a stream
        head = response_start(view.headers)
        if view.compress:
            mark_negotiated(head, encoding)
        return _HeadOnly(head, b"")
    stream = Stream(
        view,
        view.receive,
        view.send,
        shutdown,
        counters,
        hooked=type(view).on_disconnect is not base.on_disconnect,  # type: ignore[attr-defined]
    )
    if encoding is not None:
        stream.encoder = make_encoder(encoding)
    if view.token_claims is not None or view.max_lifetime is not None:
        schedule_end(stream, view.token_claims, view.max_lifetime)
    direct = type(view).events is base.events  # type: ignore[attr-defined]
    if not groups:
        if broadcast is not None and direct:
            # A view that only streams groups has nothing to stream without one.
            return _refuse(
                view,
                counters,
                PlainTextResponse("this stream needs at least one group", status_code=400),
            )
        return stream
    assert broadcast is not None
    subscription = Subscription(max_events=view.max_buffer_events, max_bytes=view.max_buffer_bytes)
    if direct:
        stream.send_from(subscription)  # no events(): the writer reads it
    else:
        stream.relay(subscription, view.max_buffer_events)
    entry: tuple[str, bytes] | None = None
    if type(view).presence_info is not base.presence_info:  # type: ignore[attr-defined]
        try:
            entry = await _presence_entry(view, broadcast)
        except (TypeError, ValueError) as exc:
            return _refuse(
                view,
                counters,
                PlainTextResponse("Internal Server Error", status_code=500),
                level=logging.ERROR,
                detail=str(exc),
            )
    try:
        await open_subscription(broadcast, groups, view.last_event_id, subscription)
    except InvalidLastEventId as exc:
        return _refuse(view, counters, PlainTextResponse(str(exc), status_code=400))
    except (BackendError, BroadcastNotConnected) as exc:
        if isinstance(exc, BroadcastNotConnected) and not was_connected(broadcast):
            return _refuse_unconnected(view, counters, broadcast)
        logger.warning("%s: broadcast unavailable: %s", view.describe(), exc)
        return _end_at_once(view, counters)
    if entry is not None:
        try:
            await broadcast.live.presence_join(entry[0], groups, entry[1], view.announce_presence)
        except BackendError as exc:
            subscription.close()
            logger.warning("%s: presence unavailable: %s", view.describe(), exc)
            return _end_at_once(view, counters)
        except NotImplementedError as exc:
            subscription.close()
            return _refuse(
                view,
                counters,
                PlainTextResponse("Internal Server Error", status_code=500),
                level=logging.ERROR,
                detail=str(exc),
            )
        stream.presence = (*entry, groups)
    return stream


async def _resolve_groups(view: Applicant, base: type) -> list[str]:
    value = view.groups
    cls = type(view)
    checked = cls._checked_groups
    if checked is not None and checked[0] == value and checked[1] == view.max_groups:
        groups = list(checked[2])  # the class's own names, checked by an earlier request
    elif callable(value):
        value = value()
        if inspect.isawaitable(value):
            value = await value
        groups = _check_groups(view, value)
    else:
        groups = _check_groups(view, value)
        if type(value) in (list, tuple):
            # The same for every request: later ones skip the checks. A copy, so a
            # list changed in place later is not taken for the one checked here.
            cls._checked_groups = (type(value)(value), view.max_groups, tuple(groups))
    claims = view.token_claims
    authorizes = cls.authorize_group is not base.authorize_group  # type: ignore[attr-defined]
    if claims is None and not authorizes:
        return groups
    for group in groups:
        if claims is not None:
            check_token_group(claims, group)
        if authorizes:
            allowed = view.authorize_group(group)
            if inspect.isawaitable(allowed):
                allowed = await allowed
            if not allowed:
                raise HTTPException(403, f"not allowed to join group {group!r}")
    return groups


def _check_groups(view: Applicant, value: Any) -> list[str]:
    """The unique names of `value` (the view's `groups`, or what its method returned).

    Raises:
        TypeError: `value` is a str.
        HTTPException: 400 for too many groups, or an invalid name.
    """
    if isinstance(value, str):
        raise TypeError(f"{type(view).__name__}.groups must return a list of names, not a str")
    groups = list(dict.fromkeys(value))  # unique, in order
    if len(groups) > view.max_groups:
        raise HTTPException(
            400, f"too many groups for one stream ({len(groups)} > {view.max_groups})"
        )
    for group in groups:
        try:
            check_group(group)
        except (TypeError, ValueError) as exc:
            raise HTTPException(400, f"invalid group name: {exc}") from None
    return groups


async def _presence_entry(view: Applicant, broadcast: Broadcast) -> tuple[str, bytes] | None:
    """Call `presence_info()`: the connection id and entry JSON, or None.

    Raises:
        TypeError: The info is not a JSON-serialisable mapping.
        ValueError: It is larger than `presence_info_max_bytes`.
    """
    info = view.presence_info()
    if inspect.isawaitable(info):
        info = await info
    if info is None:
        return None
    member = new_member_id(broadcast)
    return member, encode_entry(member, info, view.presence_info_max_bytes)


def _refusal(exc: HTTPException) -> Response:
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return PlainTextResponse(str(exc.detail), status_code=exc.status_code, headers=exc.headers)


def _refuse(
    view: Applicant,
    counters: ViewCounters | None,
    response: Response,
    *,
    level: int = logging.INFO,
    detail: str | None = None,
) -> Response:
    """Answer without a stream: count it, log why (`detail`, else the body)."""
    if counters is not None:
        counters.refuse(response.status_code)
    if detail is None:
        detail = bytes(response.body[:1000]).decode("utf-8", "replace")
    reason = printable(detail)
    logger.log(level, "%s: refused with %d: %s", view.describe(), response.status_code, reason)
    return response


def _refuse_unconnected(
    view: Applicant, counters: ViewCounters | None, broadcast: Broadcast
) -> Response:
    """Refuse a stream whose broadcast was never connected: 503, and an ERROR once.

    A 200 that ends at once would make browsers reconnect forever to a stream
    that can never work; a 503 makes `EventSource` stop and show the error.
    """
    if claim_unconnected_report(broadcast):
        logger.error(
            "%s: the view's broadcast was never connected, so none of its streams can "
            "be served (503); connect it in the app's lifespan with "
            "`async with broadcast: yield`",
            view.describe(),
        )
    return _refuse(
        view,
        counters,
        PlainTextResponse(
            "the stream's broadcast is not connected (the app's lifespan must run "
            "`async with broadcast:`)",
            status_code=503,
            headers={"Retry-After": str(view.retry_after)},
        ),
    )


def _end_at_once(view: Applicant, counters: ViewCounters | None) -> ASGIApp:
    """Answer 200 and end the stream at once, so that EventSource retries later.

    Browsers give up for good on any status but 200, so a stream that cannot
    be served right now (shutdown, backend reconnecting) ends cleanly instead:
    the browser reconnects after its retry delay, with its Last-Event-ID.
    """
    if counters is not None:
        counters.refuse(200)
    return _HeadOnly(response_start(view.headers), first_chunk(view.retry))


def read_token(scope: Scope, cookie: str | None) -> str | None:
    """The token from `?token=`, else `Authorization: Bearer`, else the cookie `cookie`."""
    query: bytes = scope.get("query_string", b"")
    if b"token=" in query:
        for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if key == "token" and value:
                return value
    header: bytes | None = None
    cookies: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            header = value
        elif name == b"cookie":
            cookies = value
    if header is not None:
        scheme, _, credentials = header.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    if cookie is not None and cookies is not None:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(cookies.decode("latin-1"))
        except Exception:  # a malformed Cookie header is no token
            return None
        morsel = jar.get(cookie)
        if morsel is not None and morsel.value:
            return morsel.value
    return None


def check_token(scope: Scope, tokens: Any, cookie: str | None) -> dict[str, Any]:
    """Verify the request's token with `tokens` (a `StreamTokens`): its claims.

    Raises:
        HTTPException: 401 when the token is missing or `verify()` rejects it.
    """
    token = read_token(scope, cookie)
    if token is None:
        raise HTTPException(401, "a stream token is required", headers=_UNAUTHORIZED)
    if len(token) > MAX_TOKEN_BYTES:
        raise HTTPException(401, "invalid stream token: too long", headers=_UNAUTHORIZED)
    try:
        claims: dict[str, Any] = tokens.verify(token)
    except InvalidToken as exc:
        raise HTTPException(401, f"invalid stream token: {exc}", headers=_UNAUTHORIZED) from None
    return claims


def check_token_group(claims: dict[str, Any], group: str) -> None:
    """Raises HTTPException 403 when the token names groups and `group` is not one."""
    allowed = claims.get("groups")
    if allowed is not None and group not in allowed:
        raise HTTPException(403, f"the stream token does not allow group {group!r}")


def schedule_end(stream: Stream, claims: dict[str, Any] | None, lifetime: float | None) -> None:
    """Tell `stream` when to end: at the token's expiry, or after `lifetime` seconds."""
    if claims is not None:
        exp = claims.get("exp")
        if isinstance(exp, int | float):
            remaining = exp - time.time()
            stream.end_at(stream.clock() + remaining, DisconnectReason.EXPIRED, _EXPIRED_FAREWELL)
    if lifetime is not None:
        # ±10 % jitter: streams opened together (after a deploy) do not all end together.
        lifetime *= random.uniform(0.9, 1.1)
        stream.end_at(stream.clock() + lifetime, DisconnectReason.LIFETIME)


def _bad_request(detail: str) -> HTTPException:
    return HTTPException(status_code=400, detail=detail)


def read_last_event_id(scope: Scope) -> str | None:
    """Return the client's Last-Event-ID (header first, then `?lastEventId=`)."""
    raw: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"last-event-id":
            raw = value
            break
    if raw is not None:
        if len(raw) > MAX_LAST_EVENT_ID_BYTES:
            raise _bad_request(f"Last-Event-ID is longer than {MAX_LAST_EVENT_ID_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad_request("Last-Event-ID is not valid UTF-8") from None
        if text:
            if "\0" in text:
                raise _bad_request("Last-Event-ID contains NUL")
            return text
    query: bytes = scope.get("query_string", b"")
    if b"lastEventId" not in query:
        return None
    try:
        pairs = parse_qsl(
            query.decode("latin-1"), keep_blank_values=True, encoding="utf-8", errors="strict"
        )
    except UnicodeDecodeError:
        raise _bad_request("the query string is not valid UTF-8") from None
    for key, value in pairs:
        if key == "lastEventId":
            if len(value.encode("utf-8")) > MAX_LAST_EVENT_ID_BYTES:
                raise _bad_request(f"lastEventId is longer than {MAX_LAST_EVENT_ID_BYTES} bytes")
            if "\0" in value:
                raise _bad_request("lastEventId contains NUL")
            return value or None
    return None
