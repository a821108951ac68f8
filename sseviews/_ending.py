"""The view's side of stream tokens and lifetimes: find and check the token, and tell
the connection when the stream must end (the token's expiry, `max_lifetime`).

Kept out of `_views.py` so that a view that uses neither pays one attribute test,
and out of `tokens.py` so that `import sseviews` never imports PyJWT.
"""

from __future__ import annotations

import random
import time
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException
from starlette.types import Scope

from ._events import Event
from ._exceptions import InvalidToken
from ._lifecycle import DisconnectReason
from ._reserved import EXPIRED_EVENT

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["check_token", "check_token_group", "read_token", "schedule_end"]

# Long enough for any JWT a browser would carry; anything longer is not ours.
MAX_TOKEN_BYTES = 8192
_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}
_FAREWELL = Event({"reason": "expired"}, event=EXPIRED_EVENT).encode()


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


def schedule_end(
    connection: Connection, claims: dict[str, Any] | None, lifetime: float | None
) -> None:
    """Tell `connection` when to end: at the token's expiry, or after `lifetime` seconds."""
    if claims is not None:
        exp = claims.get("exp")
        if isinstance(exp, int | float):
            remaining = exp - time.time()
            connection.end_at(connection.clock() + remaining, DisconnectReason.EXPIRED, _FAREWELL)
    if lifetime is not None:
        # ±10 % jitter: streams opened together (after a deploy) do not all end together.
        lifetime *= random.uniform(0.9, 1.1)
        connection.end_at(connection.clock() + lifetime, DisconnectReason.LIFETIME)
