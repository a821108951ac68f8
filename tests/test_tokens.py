"""`sseviews.tokens.StreamTokens` and views that require a stream token."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import jwt
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from support.apps import app_for

from sseviews import (
    EXPIRED_EVENT,
    Broadcast,
    DisconnectReason,
    Event,
    EventStreamView,
    InvalidToken,
    SSEViewsError,
)
from sseviews.testing import EventStreamClient
from sseviews.tokens import StreamTokens

pytestmark = pytest.mark.anyio

SECRET = "s" * 32
OLD_SECRET = "o" * 32
TIMEOUT = 5.0


# -- StreamTokens ---------------------------------------------------------------------


def test_tokens_issue_and_verify_round_trip() -> None:
    tokens = StreamTokens(SECRET)
    before = int(time.time())
    claims = tokens.verify(tokens.issue("user-1", groups=["room:a"], ttl=60))
    assert claims["sub"] == "user-1"
    assert claims["groups"] == ["room:a"]
    assert before <= claims["iat"] <= claims["exp"] - 60 + 1
    assert "groups" not in tokens.verify(tokens.issue("user-1"))


@pytest.mark.parametrize("ttl", [0.5, 1, 1.5, 60])
def test_tokens_never_expire_before_their_ttl(ttl: float) -> None:
    tokens = StreamTokens(SECRET)
    for _ in range(50):
        before = time.time()
        token = tokens.issue("u", ttl=ttl)
        after = time.time()
        claims = tokens.verify(token)
        # Whole seconds, rounded up: at least the ttl, less than a second more.
        assert before + ttl <= claims["exp"] < after + ttl + 1
        time.sleep(0.003)


def test_tokens_extra_claims_are_carried() -> None:
    tokens = StreamTokens(SECRET)
    claims = tokens.verify(tokens.issue("u", claims={"role": "admin"}))
    assert claims["role"] == "admin"


def test_tokens_extra_claims_may_not_override_reserved() -> None:
    with pytest.raises(ValueError, match="exp"):
        StreamTokens(SECRET).issue("u", claims={"exp": 1})


def test_tokens_expired_token_is_rejected() -> None:
    tokens = StreamTokens(SECRET)
    expired = jwt.encode({"sub": "u", "exp": int(time.time()) - 5}, SECRET, algorithm="HS256")
    with pytest.raises(InvalidToken, match="expired"):
        tokens.verify(expired)


def test_tokens_leeway_accepts_small_clock_skew() -> None:
    tokens = StreamTokens(SECRET, leeway=30)
    late = jwt.encode({"sub": "u", "exp": int(time.time()) - 5}, SECRET, algorithm="HS256")
    assert tokens.verify(late)["sub"] == "u"


def test_tokens_foreign_secret_is_rejected() -> None:
    forged = StreamTokens("x" * 32).issue("u")
    with pytest.raises(InvalidToken, match="signature"):
        StreamTokens(SECRET).verify(forged)


def test_tokens_rotation_accepts_previous_and_issues_with_new() -> None:
    old = StreamTokens(OLD_SECRET)
    rotated = StreamTokens(SECRET, previous=[OLD_SECRET])
    assert rotated.verify(old.issue("u"))["sub"] == "u"
    fresh = rotated.issue("u")
    assert StreamTokens(SECRET).verify(fresh)["sub"] == "u"  # signed with the new secret
    with pytest.raises(InvalidToken):
        old.verify(fresh)


def test_tokens_other_algorithm_is_rejected() -> None:
    # The "none" algorithm, and any algorithm but the configured one, never verify.
    unsigned = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, None, algorithm="none")
    with pytest.raises(InvalidToken, match="malformed"):
        StreamTokens(SECRET).verify(unsigned)
    hs512 = StreamTokens("k" * 64, algorithm="HS512").issue("u")
    with pytest.raises(InvalidToken):
        StreamTokens("k" * 64).verify(hs512)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"exp": 2_000_000_000}, "sub"),
        ({"sub": "u"}, "exp"),
        ({"sub": "u", "exp": 2_000_000_000, "groups": "room:a"}, "groups"),
        ({"sub": "u", "exp": 2_000_000_000, "groups": [1]}, "groups"),
    ],
)
def test_tokens_bad_claims_are_rejected(payload: dict[str, Any], match: str) -> None:
    token = jwt.encode(payload, SECRET, algorithm="HS256")
    with pytest.raises(InvalidToken, match=match):
        StreamTokens(SECRET).verify(token)


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "x" * 5000])
def test_tokens_garbage_is_rejected(token: str) -> None:
    with pytest.raises(InvalidToken):
        StreamTokens(SECRET).verify(token)


def test_tokens_invalid_token_is_an_sseviews_error() -> None:
    assert issubclass(InvalidToken, SSEViewsError)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"secret": "short"}, ValueError, "at least 32 bytes"),
        ({"secret": SECRET, "algorithm": "RS256"}, ValueError, "HS256"),
        ({"secret": SECRET, "previous": ["short"]}, ValueError, "previous secret"),
        ({"secret": SECRET, "previous": OLD_SECRET}, TypeError, "list of secrets"),
        ({"secret": 42}, TypeError, "str or bytes"),
        ({"secret": SECRET, "ttl": 0}, ValueError, "ttl"),
        ({"secret": SECRET, "leeway": -1}, ValueError, "leeway"),
    ],
)
def test_tokens_bad_settings_raise(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        StreamTokens(**kwargs)


def test_tokens_issue_rejects_bad_arguments() -> None:
    tokens = StreamTokens(SECRET)
    with pytest.raises(TypeError, match="subject"):
        tokens.issue(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a str"):
        tokens.issue("u", groups="room:a")
    with pytest.raises(ValueError, match="ttl"):
        tokens.issue("u", ttl=-1)


def test_tokens_verify_cost_is_small() -> None:
    tokens = StreamTokens(SECRET)
    token = tokens.issue("u", groups=["room:a"])
    started = time.perf_counter()
    for _ in range(200):
        tokens.verify(token)
    per_check = (time.perf_counter() - started) / 200
    assert per_check < 0.002  # about 20 us on the development machine


# -- views ----------------------------------------------------------------------------

TOKENS = StreamTokens(SECRET)


class Seen:
    def __init__(self) -> None:
        self.claims: list[dict[str, Any] | None] = []
        self.reasons: list[DisconnectReason] = []
        self.ended = anyio.Event()


def make_app(seen: Seen, **settings: Any) -> Starlette:
    class TokenView(EventStreamView):
        tokens = TOKENS
        token_cookie = "stream_token"

        async def on_connect(self) -> None:
            seen.claims.append(self.token_claims)

        async def events(self) -> AsyncIterator[Event]:
            n = 0
            while True:
                yield Event({"n": n}, event="tick", id=n)
                n += 1
                await anyio.sleep(0.05)

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            seen.reasons.append(reason)
            seen.ended.set()

    for key, value in settings.items():
        setattr(TokenView, key, value)
    return Starlette(routes=[Route("/stream", TokenView)])


async def test_tokens_view_missing_token_gets_401_and_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen = Seen()
    caplog.set_level(logging.INFO, logger="sseviews")
    async with EventStreamClient(make_app(seen)) as client:
        response = await client.get("/stream")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "token is required" in response.text
    refusals = [r for r in caplog.records if "refused with 401" in r.getMessage()]
    assert len(refusals) == 1
    assert refusals[0].exc_info is None
    assert seen.claims == []  # on_connect never ran


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        StreamTokens("x" * 32).issue("u"),
        jwt.encode({"sub": "u", "exp": int(time.time()) - 10}, SECRET, algorithm="HS256"),
    ],
)
async def test_tokens_view_invalid_token_gets_401(token: str) -> None:
    seen = Seen()
    async with EventStreamClient(make_app(seen)) as client:
        response = await client.get("/stream", params={"token": token})
    assert response.status_code == 401
    assert response.text.startswith("invalid stream token:")
    assert seen.claims == []


@pytest.mark.parametrize("where", ["query", "bearer", "cookie"])
async def test_tokens_view_accepts_token_from_each_place(where: str) -> None:
    seen = Seen()
    token = TOKENS.issue("user-7", ttl=60)
    kwargs: dict[str, Any] = {}
    if where == "query":
        kwargs["params"] = {"token": token}
    elif where == "bearer":
        kwargs["headers"] = {"Authorization": f"Bearer {token}"}
    else:
        kwargs["headers"] = {"Cookie": f"other=1; stream_token={token}"}
    async with EventStreamClient(make_app(seen)) as client:
        async with client.stream("/stream", **kwargs) as stream:
            assert stream.status_code == 200
            assert (await stream.next_event()).event == "tick"
    assert seen.claims[0] is not None
    assert seen.claims[0]["sub"] == "user-7"


async def test_tokens_view_cookie_is_ignored_without_token_cookie_setting() -> None:
    seen = Seen()
    token = TOKENS.issue("u", ttl=60)
    async with EventStreamClient(make_app(seen, token_cookie=None)) as client:
        response = await client.get("/stream", headers={"Cookie": f"stream_token={token}"})
    assert response.status_code == 401


async def test_tokens_view_stream_ends_with_expired_on_event_boundary() -> None:
    seen = Seen()
    token = TOKENS.issue("u", ttl=1)  # expires in 1 to 2 s (whole seconds, rounded up)
    async with EventStreamClient(make_app(seen)) as client:
        async with client.stream("/stream", params={"token": token}) as stream:
            with anyio.fail_after(TIMEOUT):
                await stream.wait_ended()
            events = [event async for event in stream]
    with anyio.fail_after(TIMEOUT):
        await seen.ended.wait()
    assert seen.reasons == [DisconnectReason.EXPIRED]
    assert events[-1].event == EXPIRED_EVENT
    assert events[-1].json() == {"reason": "expired"}
    ticks = [event for event in events if event.event == "tick"]
    assert ticks
    assert [int(event.id or "") for event in ticks] == list(range(len(ticks)))
    assert stream.raw.endswith(b"\n\n")


async def test_tokens_view_without_expiry_claim_is_refused() -> None:
    seen = Seen()
    token = jwt.encode({"sub": "u"}, SECRET, algorithm="HS256")
    async with EventStreamClient(make_app(seen)) as client:
        response = await client.get("/stream", params={"token": token})
    assert response.status_code == 401


# -- groups named by the token ------------------------------------------------------


def group_app(broadcast: Broadcast, forbidden: str | None = None) -> Starlette:
    class RoomView(EventStreamView):
        tokens = TOKENS

        def groups(self) -> list[str]:
            return self.request.query_params.getlist("group")

        def authorize_group(self, group: str) -> bool:
            return group != forbidden

    RoomView.broadcast = broadcast

    return app_for(broadcast, Route("/rooms", RoomView))


async def test_tokens_groups_claim_limits_the_groups() -> None:
    broadcast = Broadcast("memory://")
    token = TOKENS.issue("u", groups=["room:a", "room:b"], ttl=60)
    async with EventStreamClient(group_app(broadcast)) as client:
        refused = await client.get("/rooms?group=room:a&group=room:c", params={"token": token})
        assert refused.status_code == 403
        assert "room:c" in refused.text
        async with client.stream("/rooms?group=room:b", params={"token": token}) as stream:
            assert stream.status_code == 200
            await broadcast.publish("room:b", {"hi": 1})
            assert (await stream.next_event()).json() == {"hi": 1}


async def test_tokens_groups_claim_applies_on_top_of_authorize_group() -> None:
    broadcast = Broadcast("memory://")
    token = TOKENS.issue("u", groups=["room:a"], ttl=60)
    async with EventStreamClient(group_app(broadcast, forbidden="room:a")) as client:
        response = await client.get("/rooms?group=room:a", params={"token": token})
    assert response.status_code == 403


async def test_tokens_without_groups_claim_leaves_groups_to_the_view() -> None:
    broadcast = Broadcast("memory://")
    token = TOKENS.issue("u", ttl=60)
    async with EventStreamClient(group_app(broadcast)) as client:
        async with client.stream("/rooms?group=room:z", params={"token": token}) as stream:
            assert stream.status_code == 200


def test_tokens_view_setting_must_be_stream_tokens() -> None:
    with pytest.raises(TypeError, match="tokens must be a StreamTokens"):

        class Bad(EventStreamView):
            tokens = "secret"

    with pytest.raises(TypeError, match="token_cookie"):

        class BadCookie(EventStreamView):
            token_cookie = 42  # type: ignore[assignment]
