"""Server shutdown: the grace period, and streams opened after it began."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from support.views import Trace, traced_view

from sseviews import DisconnectReason, Event, EventStreamView, StreamEnded
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio


# -- shutdown ---------------------------------------------------------------------------


async def test_view_shutdown_grace_period_allows_farewell() -> None:
    trace = Trace()
    flags: list[bool] = []

    class Polite(EventStreamView):
        shutdown_grace_period = 2.0

        async def events(self) -> AsyncIterator[Any]:
            flags.append(self.is_shutting_down)
            yield "hello"
            # The documented farewell pattern (docs/lifecycle.md) polls the flag.
            while not self.is_shutting_down:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            flags.append(self.is_shutting_down)
            yield Event("bye", event="farewell")

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.disconnect(reason)

    async with EventStreamClient(Polite) as client, client.stream("/") as stream:
        assert (await stream.next_event(timeout=2)).data == "hello"
        with anyio.fail_after(1.5):
            await client.shutdown()
        farewell = await stream.next_event(timeout=1)
        assert (farewell.event, farewell.data) == ("farewell", "bye")
        with pytest.raises(StreamEnded):
            await stream.next_event(timeout=1)
    assert flags == [False, True]
    assert trace.reasons == [DisconnectReason.SHUTDOWN]


@pytest.mark.parametrize("ending", ["shutdown", "client_closed"])
async def test_view_is_shutting_down_after_the_stream_ended(ending: str) -> None:
    # A closed stream's view lets go of its connection (so that reference
    # counting frees it), except after shutdown, which the view still reports.
    views: list[EventStreamView] = []
    trace = Trace()

    class Feed(EventStreamView):
        async def on_connect(self) -> None:
            views.append(self)

        async def events(self) -> AsyncIterator[Any]:
            yield "hello"
            await anyio.sleep_forever()

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.disconnect(reason)

    async with EventStreamClient(Feed) as client:
        async with client.stream("/") as stream:
            assert (await stream.next_event(timeout=2)).data == "hello"
            if ending == "shutdown":
                with anyio.fail_after(2):
                    await client.shutdown()
        await trace.wait_disconnected()
        for _ in range(5):  # let the request task return
            await anyio.lowlevel.checkpoint()
    assert trace.reasons == [DisconnectReason(ending)]
    assert views[0].is_shutting_down is (ending == "shutdown")


async def test_view_shutdown_grace_period_expires() -> None:
    trace = Trace()

    class Deaf(EventStreamView):
        shutdown_grace_period = 0.2

        async def events(self) -> AsyncIterator[Any]:
            yield "hello"
            await anyio.sleep_forever()

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.disconnect(reason)

    async with EventStreamClient(Deaf) as client, client.stream("/") as stream:
        await stream.next_event(timeout=2)
        started = anyio.current_time()
        with anyio.fail_after(2):
            await client.shutdown()
        elapsed = anyio.current_time() - started
    assert 0.15 <= elapsed < 1.0
    assert trace.reasons == [DisconnectReason.SHUTDOWN]


async def test_view_shutdown_without_grace_ends_at_once() -> None:
    trace = Trace()

    class Polite(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield "hello"
            # The documented farewell pattern (docs/lifecycle.md) polls the flag.
            while not self.is_shutting_down:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            yield "bye"  # pragma: no cover - no grace: never reached

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.disconnect(reason)

    async with EventStreamClient(Polite) as client, client.stream("/") as stream:
        await stream.next_event(timeout=2)
        started = anyio.current_time()
        await client.shutdown()
        assert anyio.current_time() - started < 0.5
        with pytest.raises(StreamEnded):
            await stream.next_event(timeout=1)
    assert trace.reasons == [DisconnectReason.SHUTDOWN]


async def test_view_new_stream_after_shutdown_ends_at_once_so_the_browser_retries() -> None:
    # EventSource gives up for good on any status but 200, so a stream that arrives
    # during shutdown gets 200 and an immediate clean end: the browser retries later.
    trace = Trace()

    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        yield "x"  # pragma: no cover

    async with EventStreamClient(traced_view(trace, events)) as client:
        await client.shutdown()
        async with client.stream("/") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
            await stream.wait_ended()
            assert stream.raw == b""
        response = await client.get("/")
        assert response.status_code == 200
        assert response.content == b""
    assert trace.steps == []
