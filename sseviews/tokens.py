"""Signed stream tokens: short-lived JWTs that authenticate an `EventSource`.

A browser's `EventSource` cannot send an `Authorization` header, so a page fetches
a short-lived token from your app and passes it in the stream's URL (`?token=`),
or your app sets it as a cookie. A view that sets `tokens = StreamTokens(...)`
refuses a stream without a valid token with `401`, exposes the verified claims as
`self.token_claims`, lets the stream join only the groups the token names, and
ends the stream with `DisconnectReason.EXPIRED` when the token expires.

Needs PyJWT: `pip install sseviews[tokens]`.

    tokens = StreamTokens(os.environ["STREAM_SECRET"])
    token = tokens.issue("user-42", groups=["room:lobby"], ttl=300)
    claims = tokens.verify(token)   # {"sub": "user-42", "groups": [...], "iat": ..., "exp": ...}
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jwt

from ._exceptions import InvalidToken

__all__ = ["InvalidToken", "StreamTokens"]

# HMAC keys shorter than the hash output weaken the signature (RFC 7518, 3.2).
_HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_RESERVED = frozenset({"sub", "groups", "iat", "exp"})


def _key(secret: str | bytes, algorithm: str, name: str) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, bytes):
        raise TypeError(f"StreamTokens {name} must be a str or bytes, got {type(secret).__name__}")
    minimum = _HMAC_KEY_BYTES[algorithm]
    if len(secret) < minimum:
        raise ValueError(
            f"StreamTokens {name} must be at least {minimum} bytes for {algorithm} "
            f'(got {len(secret)}); make one with `python -c "import secrets; '
            f'print(secrets.token_urlsafe({minimum}))"`'
        )
    return secret


class StreamTokens:
    """Issue and verify signed stream tokens (HMAC JWTs).

    Args:
        secret: The key new tokens are signed with: at least as many bytes as the
            hash (32 for HS256). Keep it out of your code, e.g. in an environment
            variable.
        algorithm: `"HS256"`, `"HS384"` or `"HS512"`.
        previous: Older secrets that `verify()` still accepts, for rotation: sign
            with the new secret, keep the old one here until the last token it
            signed has expired, then drop it.
        ttl: Default lifetime of an issued token, in seconds.
        leeway: Seconds of clock skew tolerated when checking `exp` and `iat`.

    Raises:
        ValueError: An unknown algorithm, a secret too short, or a ttl <= 0.
        TypeError: A secret that is neither str nor bytes.
    """

    __slots__ = ("_keys", "algorithm", "leeway", "ttl")

    def __init__(
        self,
        secret: str | bytes,
        *,
        algorithm: str = "HS256",
        previous: Iterable[str | bytes] = (),
        ttl: float = 300.0,
        leeway: float = 0.0,
    ) -> None:
        if algorithm not in _HMAC_KEY_BYTES:
            raise ValueError(
                f"StreamTokens algorithm must be one of {sorted(_HMAC_KEY_BYTES)}, "
                f"got {algorithm!r}"
            )
        if isinstance(previous, str | bytes):
            raise TypeError("StreamTokens previous must be a list of secrets, not one secret")
        self.algorithm = algorithm
        keys = [_key(secret, algorithm, "secret")]
        keys.extend(_key(old, algorithm, "previous secret") for old in previous)
        self._keys: tuple[bytes, ...] = tuple(keys)
        self.ttl = _positive("ttl", ttl)
        if isinstance(leeway, bool) or not isinstance(leeway, int | float) or leeway < 0:
            raise ValueError(f"StreamTokens leeway must be a number >= 0, got {leeway!r}")
        self.leeway = leeway

    def __repr__(self) -> str:
        return (
            f"StreamTokens(algorithm={self.algorithm!r}, secrets={len(self._keys)}, "
            f"ttl={self.ttl!r})"
        )

    def issue(
        self,
        subject: str,
        *,
        groups: Sequence[str] | None = None,
        ttl: float | None = None,
        claims: Mapping[str, Any] | None = None,
    ) -> str:
        """Return a token for `subject`, signed with the newest secret.

        Args:
            subject: Who the token is for (the `sub` claim), e.g. a user id.
            groups: The only groups a stream with this token may join; None
                leaves the view's `groups` and `authorize_group` to decide alone.
            ttl: Seconds until the token expires (default: the instance's `ttl`).
                A stream that uses it ends with `DisconnectReason.EXPIRED` then.
            claims: Extra JSON claims to carry (not `sub`, `groups`, `iat`, `exp`).

        Raises:
            TypeError: `subject` is not a str, or `groups` is a str.
            ValueError: `ttl` <= 0, or `claims` names a reserved claim.
        """
        if not isinstance(subject, str):
            raise TypeError(f"StreamTokens.issue() subject must be a str, got {subject!r}")
        now = time.time()
        lifetime = self.ttl if ttl is None else _positive("ttl", ttl)
        payload: dict[str, Any] = {}
        if claims:
            reserved = _RESERVED.intersection(claims)
            if reserved:
                raise ValueError(
                    f"StreamTokens.issue() claims may not set {sorted(reserved)}; "
                    "use the subject, groups and ttl arguments"
                )
            payload.update(claims)
        payload["sub"] = subject
        payload["iat"] = int(now)
        # JWT times are whole seconds. Rounded up, so a token is never valid for
        # less than its ttl (truncating could leave a 1 s token a few ms of life).
        payload["exp"] = math.ceil(now + lifetime)
        if groups is not None:
            if isinstance(groups, str):
                raise TypeError("StreamTokens.issue() groups must be a list of names, not a str")
            payload["groups"] = [_group(group) for group in groups]
        return jwt.encode(payload, self._keys[0], algorithm=self.algorithm)

    def verify(self, token: str) -> dict[str, Any]:
        """Check `token` against every secret, newest first; return its claims.

        Raises:
            InvalidToken: The token is malformed, signed with an unknown secret,
                expired, lacks `sub` or `exp`, or has a `groups` claim that is not
                a list of strings. The message says which.
        """
        if not isinstance(token, str) or not token:
            raise InvalidToken("no token given")
        options: Any = {"require": ["exp", "sub"]}
        algorithms = [self.algorithm]
        for key in self._keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token, key, algorithms=algorithms, options=options, leeway=self.leeway
                )
            except jwt.InvalidSignatureError:
                continue  # maybe signed with another of the secrets
            except jwt.ExpiredSignatureError:
                raise InvalidToken("the token has expired") from None
            except jwt.InvalidTokenError as exc:
                raise InvalidToken(f"malformed token: {exc}") from None
            groups = claims.get("groups")
            if groups is not None and (
                not isinstance(groups, list) or not all(isinstance(g, str) for g in groups)
            ):
                raise InvalidToken("the token's groups claim must be a list of strings")
            return claims
        raise InvalidToken("the token's signature does not match any secret")


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"StreamTokens {name} must be a number of seconds > 0, got {value!r}")
    return value


def _group(group: object) -> str:
    if not isinstance(group, str):
        raise TypeError(f"StreamTokens.issue() groups must hold str names, got {group!r}")
    return group
