"""The Last-Event-ID a view reads from the header or the query string."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from support.views import Trace, refusing_view

from sseviews import DisconnectReason, EventStreamView
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio


# -- Last-Event-ID -----------------------------------------------------------------


def last_event_id_view(seen: list[str | None], trace: Trace | None = None) -> Any:
    class Resume(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            seen.append(self.last_event_id)
            if trace is not None:
                trace.step("events")
            yield "x"

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            if trace is not None:
                trace.disconnect(reason)

    return Resume


@pytest.mark.parametrize(
    ("url", "headers", "expected"),
    [
        ("/", {}, None),
        ("/", {"Last-Event-ID": "42"}, "42"),
        ("/?lastEventId=17", {}, "17"),
        ("/?lastEventId=17", {"Last-Event-ID": "42"}, "42"),
        ("/?lastEventId=", {}, None),
        ("/", {"Last-Event-ID": ""}, None),
        ("/?lastEventId=a%20b%C3%A9", {}, "a bé"),
        ("/", {"Last-Event-ID": "é✓"}, "é✓"),
        ("/", {"Last-Event-ID": "x" * 1024}, "x" * 1024),
        ("/?lastEventId=" + "y" * 1024, {}, "y" * 1024),
    ],
)
async def test_view_last_event_id(url: str, headers: dict[str, str], expected: str | None) -> None:
    seen: list[str | None] = []
    async with EventStreamClient(last_event_id_view(seen)) as client:
        async with client.stream(url, headers=headers) as stream:
            assert stream.status_code == 200
            await stream.next_event(timeout=2)
    assert seen == [expected]


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("/", {"Last-Event-ID": "x" * 8193}),
        ("/", {"Last-Event-ID": "é" * 4097}),
        ("/?lastEventId=" + "y" * 8193, {}),
        ("/?lastEventId=" + "%C3%A9" * 4097, {}),
        ("/", {"Last-Event-ID": "a\0b"}),
        ("/?lastEventId=a%00b", {}),
    ],
)
async def test_view_last_event_id_invalid_gets_400(url: str, headers: dict[str, str]) -> None:
    seen: list[str | None] = []
    trace = Trace()
    async with EventStreamClient(last_event_id_view(seen, trace)) as client:
        response = await client.get(url, headers=headers)
    assert response.status_code == 400
    assert seen == []
    assert trace.steps == []
    assert trace.reasons == []


async def test_view_on_connect_refusal_wins_over_bad_last_event_id() -> None:
    async with EventStreamClient(refusing_view(401)) as client:
        response = await client.get("/", headers={"Last-Event-ID": "a\0b"})
    assert response.status_code == 401
