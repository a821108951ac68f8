"""What events() yields: ordinary values, and values shaped like another SSE
library's events."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support.views import Trace, traced_view

from sseviews import Event, EventShapeWarning, EventStreamView
from sseviews._events import encode_data
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio


# -- what events() yields ------------------------------------------------------------


async def test_view_yielded_values_sent_as_unnamed_events() -> None:
    class Mixed(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield "plain text"
            yield '{"already": "json"}'
            yield {"a": 1, "é": [True, None]}
            yield [1, 2]
            yield 3
            yield "two\nlines"
            yield b"bytes"
            yield Event("named", event="custom", id="7")

    async with EventStreamClient(Mixed) as client, client.stream("/") as stream:
        received = [await stream.next_event(timeout=2) for _ in range(8)]
        await stream.wait_ended()
        raw = stream.raw
    assert [e.data for e in received] == [
        "plain text",
        '{"already": "json"}',
        '{"a":1,"é":[true,null]}',
        "[1,2]",
        "3",
        "two\nlines",
        "bytes",
        "named",
    ]
    assert [e.event for e in received] == [None] * 7 + ["custom"]
    assert [e.id for e in received] == [None] * 7 + ["7"]
    assert raw.startswith(b'data: plain text\n\ndata: {"already": "json"}\n\n')
    assert 'data: {"a":1,"é":[true,null]}\n\n'.encode() in raw


# -- values shaped like another SSE library's events ----------------------------------------


async def stream_once(view: type[EventStreamView]) -> bytes:
    async with EventStreamClient(view) as client, client.stream("/") as stream:
        await stream.wait_ended()
        return stream.raw


async def test_view_sse_starlette_tuple_warns_once_per_class() -> None:
    class Ticks(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield ("tick", {"n": 1})
            yield ("tick", {"n": 2})

    with pytest.warns(EventShapeWarning) as caught:
        raw = await stream_once(Ticks)
    # Still sent as sseviews always sent it: the warning says how to name the event.
    assert raw == b'data: ["tick",{"n":1}]\n\ndata: ["tick",{"n":2}]\n\n'
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "Ticks.events() yielded a ('tick', data) tuple" in message
    assert "yield Event(data, event='tick')" in message
    assert caught[0].filename == __file__  # at the view's events()
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        await stream_once(Ticks)  # once per class: the second stream is quiet
    assert [w for w in again if issubclass(w.category, EventShapeWarning)] == []


@pytest.mark.parametrize(
    ("item", "advice"),
    [
        ({"event": "tick", "data": {"n": 1}}, "Event(data, event=...)"),
        ({"data": "hello", "id": "7"}, "Event(data, id=...)"),
        ({"event": "tick", "data": 1, "retry": 5000}, "Event(data, event=..., retry=...)"),
    ],
)
async def test_view_sse_starlette_dict_warns(item: dict[str, Any], advice: str) -> None:
    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        yield Event("an Event first is not looked at")
        yield item

    with pytest.warns(EventShapeWarning, match="sse-starlette") as caught:
        await stream_once(traced_view(Trace(), events))
    assert advice in str(caught[0].message)


@pytest.mark.parametrize(
    "item",
    [
        {"n": 1},
        {"data": [1, 2]},  # a JSON envelope of its own
        {"event": "signup", "user": "ann"},
        ["tick", {"n": 1}],  # a list is meant as a JSON array
        (1, 2),
        ("a", "b", "c"),
        "tick",
    ],
    ids=repr,
)
async def test_view_ordinary_values_do_not_warn(item: Any) -> None:
    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        yield item

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw = await stream_once(traced_view(Trace(), events))
    assert [w for w in caught if issubclass(w.category, EventShapeWarning)] == []
    assert raw == encode_data(item)
