"""Pings while idle, and the retry field."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from sseviews import Event, EventStreamView
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio


# -- pings, retry -----------------------------------------------------------------------


async def test_view_ping_sent_when_idle() -> None:
    class Idle(EventStreamView):
        ping_interval = 0.1

        async def events(self) -> AsyncIterator[Any]:
            yield "hello"
            await anyio.sleep_forever()

    async with EventStreamClient(Idle) as client, client.stream("/") as stream:
        assert (await stream.next_event(timeout=2)).data == "hello"
        with anyio.fail_after(2):
            assert await stream.next_comment() == "ping"
            assert await stream.next_comment() == "ping"
        # A comment line alone, no blank line: no client takes it for an event.
        assert stream.raw.startswith(b"data: hello\n\n: ping\n: ping\n")
        with pytest.raises(TimeoutError):
            await stream.next_event(timeout=0.05)


async def test_view_ping_not_sent_while_events_flow() -> None:
    class Busy(EventStreamView):
        ping_interval = 0.15

        async def events(self) -> AsyncIterator[Any]:
            for i in range(20):
                yield i
                await anyio.sleep(0.025)

    async with EventStreamClient(Busy) as client, client.stream("/") as stream:
        with anyio.fail_after(5):
            received = [event.data async for event in stream]
    assert received == [str(i) for i in range(20)]
    assert stream.comments == []


async def test_view_ping_interval_none_disables_pings() -> None:
    class Quiet(EventStreamView):
        ping_interval = None

        async def events(self) -> AsyncIterator[Any]:
            yield "hello"
            await anyio.sleep_forever()

    class Chatty(Quiet):
        ping_interval = 0.05

    async with EventStreamClient(Starlette(routes=[Route("/q", Quiet), Route("/c", Chatty)])) as c:
        async with c.stream("/q") as quiet, c.stream("/c") as chatty:
            await quiet.next_event(timeout=2)
            await chatty.next_event(timeout=2)
            await anyio.sleep(0.3)
            assert len(chatty.comments) >= 2
            assert quiet.comments == []
            assert quiet.raw == b"data: hello\n\n"


async def test_view_ping_message_override() -> None:
    class Custom(EventStreamView):
        ping_interval = 0.05

        def ping_message(self) -> Event:
            return Event({"alive": True}, event="heartbeat")

        async def events(self) -> AsyncIterator[Any]:
            await anyio.sleep_forever()
            yield  # pragma: no cover

    async with EventStreamClient(Custom) as client, client.stream("/") as stream:
        ping = await stream.next_event(timeout=2)
        assert (ping.event, ping.json()) == ("heartbeat", {"alive": True})


async def test_view_ping_message_str_sent_as_comment_line() -> None:
    class Custom(EventStreamView):
        ping_interval = 0.05

        def ping_message(self) -> str:
            return "keep-alive"

        async def events(self) -> AsyncIterator[Any]:
            yield Event("x", id="1")
            await anyio.sleep_forever()

    async with EventStreamClient(Custom) as client, client.stream("/") as stream:
        assert (await stream.next_event(timeout=2)).data == "x"
        with anyio.fail_after(2):
            assert await stream.next_comment() == "keep-alive"
            assert await stream.next_comment() == "keep-alive"
        assert stream.raw.startswith(b"id: 1\ndata: x\n\n: keep-alive\n: keep-alive\n")
        with pytest.raises(TimeoutError):
            await stream.next_event(timeout=0.05)


async def test_view_ping_message_wrong_type_ends_stream_with_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Wrong(EventStreamView):
        ping_interval = 0.05

        def ping_message(self) -> Any:
            return 42

        async def events(self) -> AsyncIterator[Any]:
            await anyio.sleep_forever()
            yield  # pragma: no cover

    async with EventStreamClient(Wrong) as client, client.stream("/") as stream:
        with anyio.fail_after(5):
            assert [event async for event in stream] == []
    assert "keep-alive comment must be a str" in caplog.text


async def test_view_retry_sent_before_any_event() -> None:
    class Retrying(EventStreamView):
        retry = 2500

        async def events(self) -> AsyncIterator[Any]:
            yield "first"

    async with EventStreamClient(Retrying) as client, client.stream("/") as stream:
        await stream.wait_ended()
        assert stream.retry == 2500
        first_event = stream.raw.index(b"data: first")
        assert stream.raw.index(b"retry: 2500\n") < first_event
        # Only comments may come before it.
        head = stream.raw[: stream.raw.index(b"retry: 2500\n")]
        assert all(line.startswith(b":") for line in head.split(b"\n") if line)


async def test_view_retry_none_sends_no_retry() -> None:
    class Plain(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield "first"

    async with EventStreamClient(Plain) as client, client.stream("/") as stream:
        await stream.wait_ended()
        assert stream.retry is None
        assert b"retry" not in stream.raw
