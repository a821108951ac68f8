"""Streams that end at a set time: `max_lifetime` (LIFETIME) and token expiry (EXPIRED).

Both go through `Connection.end_at()`: on asyncio a timer the writer arms, on
other backends the writer's own deadline. Run on both backends.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from starlette.routing import Route
from support.apps import app_for

from sseviews import EXPIRED_EVENT, Broadcast, DisconnectReason, Event, EventStreamView
from sseviews.testing import EventStreamClient
from sseviews.tokens import StreamTokens

pytestmark = pytest.mark.anyio

TIMEOUT = 5.0
TOKENS = StreamTokens("t" * 32)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def no_jitter(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[float, float]]]:
    """Make the jitter factor 1 and record the range it was drawn from."""
    calls: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        calls.append((low, high))
        return 1.0

    monkeypatch.setattr(random, "uniform", uniform)
    yield calls


class Ended:
    def __init__(self) -> None:
        self.reasons: list[DisconnectReason] = []
        self.event = anyio.Event()

    async def wait(self) -> DisconnectReason:
        with anyio.fail_after(TIMEOUT):
            await self.event.wait()
        return self.reasons[-1]


def ticking_view(ended: Ended, gap: float, **settings: Any) -> type[EventStreamView]:
    class Ticking(EventStreamView):
        async def events(self) -> AsyncIterator[Event]:
            n = 0
            while True:
                yield Event(n, event="tick", id=n)
                n += 1
                if gap:
                    await anyio.sleep(gap)
                else:
                    await anyio.lowlevel.checkpoint()

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            ended.reasons.append(reason)
            ended.event.set()

    for key, value in settings.items():
        setattr(Ticking, key, value)
    return Ticking


@pytest.mark.parametrize("ping_interval", [None, 0.2])
async def test_lifetime_ends_idle_stream_cleanly(
    ping_interval: float | None, no_jitter: list[tuple[float, float]]
) -> None:
    ended = Ended()
    view = ticking_view(ended, 10.0, max_lifetime=0.3, ping_interval=ping_interval)
    async with EventStreamClient(view) as client:
        async with client.stream("/") as stream:
            started = anyio.current_time()
            with anyio.fail_after(TIMEOUT):
                await stream.wait_ended()
            elapsed = anyio.current_time() - started
            events = [event async for event in stream]
    assert await ended.wait() is DisconnectReason.LIFETIME
    assert 0.25 <= elapsed < 1.5
    assert [event.event for event in events] == ["tick"]
    # It ends on an event boundary: after the last event, only whole ping lines (a
    # ping is one comment line, with no blank line after it).
    last_event, _, after = stream.raw.rpartition(b"\n\n")
    assert last_event == b"event: tick\nid: 0\ndata: 0"
    assert after == b": ping\n" * after.count(b"\n")
    if ping_interval is not None:
        assert after  # idle for 0.3 s with pings every 0.2 s: one ping at least
    assert no_jitter == [(0.9, 1.1)]


async def test_lifetime_ends_busy_stream_on_event_boundary(
    no_jitter: list[tuple[float, float]],
) -> None:
    # events() never waits on a timer: the writer must still notice the deadline.
    ended = Ended()
    view = ticking_view(ended, 0, max_lifetime=0.3, ping_interval=None)
    async with EventStreamClient(view) as client:
        async with client.stream("/") as stream:
            with anyio.fail_after(TIMEOUT):
                await stream.wait_ended()
            events = [event async for event in stream]
    assert await ended.wait() is DisconnectReason.LIFETIME
    assert len(events) > 10
    assert [int(event.id or "") for event in events] == list(range(len(events)))
    assert stream.raw.endswith(b"\n\n")


async def test_lifetime_jitter_spreads_the_ends() -> None:
    remaining: list[float] = []

    class Long(EventStreamView):
        max_lifetime = 100.0

        async def events(self) -> AsyncIterator[Event]:
            connection: Any = self._connection
            remaining.append(connection._ending[0] - connection.clock())
            yield Event("x")

    async with EventStreamClient(Long) as client:
        for _ in range(20):
            async with client.stream("/") as stream:
                await stream.next_event()
    assert len(remaining) == 20
    assert all(89.0 <= left <= 110.0 for left in remaining)
    assert max(remaining) - min(remaining) > 1.0  # 20 draws from ±10 s


async def test_lifetime_group_stream_resumes_with_nothing_lost(
    no_jitter: list[tuple[float, float]],
) -> None:
    broadcast = Broadcast("memory://")
    ended = Ended()

    class Room(EventStreamView):
        groups = ("room",)
        max_lifetime = 0.3

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            ended.reasons.append(reason)
            ended.event.set()

    Room.broadcast = broadcast

    app = app_for(broadcast, Route("/room", Room))
    async with EventStreamClient(app) as client:
        async with client.stream("/room") as first:
            for n in range(3):
                await broadcast.publish("room", n)
            seen = [(await first.next_event()).json() for _ in range(3)]
            with anyio.fail_after(TIMEOUT):
                await first.wait_ended()
        assert await ended.wait() is DisconnectReason.LIFETIME
        for n in range(3, 6):
            await broadcast.publish("room", n)  # while no stream is open
        async with client.stream("/room", headers={"Last-Event-ID": first.last_event_id}) as again:
            seen += [(await again.next_event()).json() for _ in range(3)]
    assert seen == list(range(6))


async def test_lifetime_earliest_end_wins(no_jitter: list[tuple[float, float]]) -> None:
    ended = Ended()
    token = TOKENS.issue("u", ttl=1)
    view = ticking_view(ended, 10.0, tokens=TOKENS, max_lifetime=30.0)
    async with EventStreamClient(view) as client:
        async with client.stream("/", params={"token": token}) as stream:
            with anyio.fail_after(TIMEOUT):
                await stream.wait_ended()
            events = [event async for event in stream]
    assert await ended.wait() is DisconnectReason.EXPIRED
    assert events[-1].event == EXPIRED_EVENT

    ended = Ended()
    token = TOKENS.issue("u", ttl=60)
    view = ticking_view(ended, 10.0, tokens=TOKENS, max_lifetime=0.2)
    async with EventStreamClient(view) as client:
        async with client.stream("/", params={"token": token}) as stream:
            with anyio.fail_after(TIMEOUT):
                await stream.wait_ended()
            events = [event async for event in stream]
    assert await ended.wait() is DisconnectReason.LIFETIME
    assert EXPIRED_EVENT not in [event.event for event in events]


async def test_lifetime_client_close_first_sends_no_farewell() -> None:
    ended = Ended()
    token = TOKENS.issue("u", ttl=60)
    view = ticking_view(ended, 10.0, tokens=TOKENS)
    async with EventStreamClient(view) as client:
        async with client.stream("/", params={"token": token}) as stream:
            await stream.next_event()
    assert await ended.wait() is DisconnectReason.CLIENT_CLOSED
    assert EXPIRED_EVENT.encode() not in stream.raw


async def test_lifetime_views_without_it_have_no_ending() -> None:
    endings: list[object] = []

    class Plain(EventStreamView):
        async def events(self) -> AsyncIterator[Event]:
            endings.append(self._connection._ending)  # type: ignore[union-attr]
            yield Event("x")

    async with EventStreamClient(Plain) as client:
        async with client.stream("/") as stream:
            await stream.next_event()
    assert endings == [None]


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (-1, ValueError), ("60", TypeError), (True, TypeError)]
)
def test_lifetime_setting_is_checked(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_lifetime"):

        class Bad(EventStreamView):
            max_lifetime = value  # type: ignore[assignment]
