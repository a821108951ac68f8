"""Declared events (`event_types`): the class-creation check, the per-event check in
tests and in production, and their JSON Schemas."""

from __future__ import annotations

import dataclasses
import enum
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal, NotRequired, TypedDict

import anyio
import pytest
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from support.apps import app_for

from sseviews import Broadcast, Event, EventStreamView
from sseviews._eventtypes import EventTypes
from sseviews._reserved import EVENT_CHECKS_KEY
from sseviews._schema import content_type, event_schemas
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio

TIMEOUT = 3.0


class Tick(BaseModel):
    n: int


@dataclasses.dataclass
class Chat:
    text: str
    user: str | None = None


class Presence(TypedDict):
    user: str
    online: bool
    since: NotRequired[float]


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class Node:
    name: str
    children: list[Node] = dataclasses.field(default_factory=list)


def stream_app(items: list[Any], **declared: Any) -> Starlette:
    class Declared(EventStreamView):
        event_types: ClassVar[Any] = declared

        async def events(self) -> AsyncIterator[Any]:
            for item in items:
                yield item

    return Starlette(routes=[Route("/s", Declared)])


async def read_all(app: ASGIApp) -> list[Event]:
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/s") as stream:
            return [event async for event in stream]


def without_test_checks(app: ASGIApp) -> ASGIApp:
    """The app as a server runs it: no test client to report mismatches to."""

    async def production(scope: Scope, receive: Receive, send: Send) -> None:
        scope["extensions"] = {
            key: value for key, value in scope["extensions"].items() if key != EVENT_CHECKS_KEY
        }
        await app(scope, receive, send)

    return production


# -- declaring ------------------------------------------------------------------------


def test_event_types_default_declares_nothing() -> None:
    class Plain(EventStreamView):
        pass

    assert Plain.event_types is None
    assert Plain._event_types is None
    assert event_schemas(Plain) == {}


def test_event_types_must_be_a_mapping() -> None:
    with pytest.raises(TypeError, match=r"Bad.event_types must be a mapping of event names"):

        class Bad(EventStreamView):
            event_types: ClassVar[Any] = [("tick", Tick)]


def test_event_types_names_must_be_str() -> None:
    with pytest.raises(TypeError, match=r"keys must be event names \(str; \"message\" for"):

        class Bad(EventStreamView):
            event_types: ClassVar[Any] = {None: Tick}


@pytest.mark.parametrize("name", ["", "a\nb", "a\rb"])
def test_event_types_names_must_be_one_line(name: str) -> None:
    with pytest.raises(ValueError, match=r"Bad.event_types has"):

        class Bad(EventStreamView):
            event_types: ClassVar[Any] = {name: Tick}


def test_event_types_rejects_a_string_annotation() -> None:
    with pytest.raises(TypeError, match=r"event_types\['tick'\] must be a type, got the string"):

        class Bad(EventStreamView):
            event_types: ClassVar[Any] = {"tick": "Tick"}


def test_event_types_rejects_a_type_nothing_can_check() -> None:
    class Opaque:
        pass

    with pytest.raises(TypeError, match=r"Bad.event_types: pydantic cannot check payloads"):

        class Bad(EventStreamView):
            event_types: ClassVar[Any] = {"tick": Opaque}


def test_event_types_are_inherited_and_checked_per_view() -> None:
    class Parent(EventStreamView):
        event_types: ClassVar[Any] = {"tick": Tick}

    class Child(Parent):
        pass

    assert Child.event_types == {"tick": Tick}
    assert isinstance(Child._event_types, EventTypes)
    assert Child._event_types is not Parent._event_types


# -- checking values ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tp", "value"),
    [
        (Tick, Tick(n=1)),
        (Tick, {"n": 1}),
        (Tick, '{"n": 1}'),
        (Tick, b'{"n": 1}'),
        (Chat, Chat("hi")),
        (Chat, {"text": "hi", "extra": 1}),
        (Chat, '{"text": "hi", "user": null}'),
        (Presence, {"user": "ann", "online": True}),
        (Presence, {"user": "ann", "online": False, "since": 3}),
        (Color, Color.RED),
        (Color, "blue"),
        (Literal["on", "off"], "on"),
        (int, 3),
        (int, "3"),
        (float, 2),
        (str, "any text"),
        (bool, False),
        (None, None),
        (int | None, None),
        (list[int], [1, 2]),
        (tuple[int, str], [1, "a"]),
        (dict[str, list[Tick]], {"a": [{"n": 1}]}),
        (Node, Node("a", [Node("b")])),
        (Any, {"whatever": [1]}),
    ],
)
def test_event_types_accepts_matching_payloads(tp: Any, value: Any) -> None:
    assert EventTypes({"e": tp}).problem("e", value) is None


@pytest.mark.parametrize(
    ("tp", "value", "expected"),
    [
        (Tick, {"n": "one"}, "valid integer at n"),
        (Tick, "not json", "Invalid JSON"),
        (Chat, {"user": "ann"}, "Chat is missing 'text'"),
        (Chat, Chat(5), "expected str, got int 5 at text"),  # type: ignore[arg-type]
        (Presence, {"user": "ann", "online": "yes"}, "expected bool, got str 'yes' at online"),
        (Color, "green", "expected a value of Color"),
        (Literal["on", "off"], "dim", "expected one of ['on', 'off']"),
        (int, True, "expected int, got bool True"),
        (int, 1.5, "expected int, got float 1.5"),
        (str, {"a": 1}, "expected str, got dict"),
        (list[int], [1, "2"], "expected int, got str '2' at [1]"),
        (tuple[int, str], [1], "expected a list of 2 items"),
        (dict[str, int], {"a": None}, "expected int, got NoneType None at a"),
        (Node, {"name": "a", "children": [{"name": 3}]}, "expected str, got int 3 at children"),
        (int | None, "x", "expected int | None"),
        (float, float("nan"), "expected a finite number"),
    ],
)
def test_event_types_describes_mismatches(tp: Any, value: Any, expected: str) -> None:
    problem = EventTypes({"e": tp}).problem("e", value)
    assert problem is not None
    assert expected in problem


def test_event_types_unnamed_events_are_message() -> None:
    types = EventTypes({"message": int})
    assert types.problem(None, 1) is None
    assert types.problem("message", 1) is None
    assert types.problem("tick", 1) == "the event name is not declared (declared: 'message')"


# -- EventStreamClient fails the test ------------------------------------------------


async def test_event_types_client_accepts_matching_events() -> None:
    app = stream_app(
        [
            Event(Tick(n=1), event="tick", id=1),
            Chat("hi"),
            {"text": "raw dict"},
            Event(comment="not dispatched: not checked"),
            Event(retry=100),
            Event({"user": "ann", "online": True}, event="presence"),
        ],
        tick=Tick,
        message=Chat,
        presence=Presence,
    )
    with anyio.fail_after(TIMEOUT):
        events = await read_all(app)
    assert [event.event for event in events] == ["tick", None, None, "presence"]
    assert events[0].json() == {"n": 1}


async def test_event_types_client_fails_a_mismatch_with_view_name_and_expected() -> None:
    app = stream_app([Event({"n": "one"}, event="tick"), Event(Tick(n=2), event="tick")], tick=Tick)
    with anyio.fail_after(TIMEOUT), pytest.raises(AssertionError) as caught:
        await read_all(app)
    message = str(caught.value)
    assert "Declared sent event 'tick'" in message
    assert "(expected Tick)" in message
    assert "Input should be a valid integer at n" in message
    assert "sent dict {'n': 'one'}" in message


async def test_event_types_client_fails_an_undeclared_event_name() -> None:
    app = stream_app([Event("x", event="typo")], tick=Tick)
    with anyio.fail_after(TIMEOUT), pytest.raises(AssertionError, match="an undeclared event"):
        await read_all(app)


async def test_event_types_client_fails_when_the_test_never_reads() -> None:
    app = stream_app(["not an int"], message=int)
    with anyio.fail_after(TIMEOUT), pytest.raises(AssertionError, match="expected int"):
        async with EventStreamClient(app, timeout=TIMEOUT) as client:
            async with client.stream("/s") as stream:
                await stream.wait_ended()


async def test_event_types_client_checks_relayed_group_events() -> None:
    broadcast = Broadcast("memory://")

    class Room(EventStreamView):
        event_types: ClassVar[Any] = {"chat": Chat}
        groups = ("room",)

    Room.broadcast = broadcast

    app = app_for(broadcast, Route("/room", Room))
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/room") as stream:
            await broadcast.publish("room", Event(Chat("hi"), event="chat"))
            assert (await stream.next_event()).json() == {"text": "hi", "user": None}
            await broadcast.publish("room", Event({"text": 5}, event="chat"))
            with anyio.fail_after(TIMEOUT), pytest.raises(AssertionError, match="at text"):
                while True:
                    await stream.next_event()


# -- production: logged once, not sent ------------------------------------------------


async def test_event_types_production_drops_and_logs_once_per_event_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    items = [
        Event({"n": "bad"}, event="tick", id=1),
        Event(Tick(n=2), event="tick", id=2),
        Event({"n": "bad again"}, event="tick", id=3),
        Event("?", event="typo", id=4),
        Event("?", event="typo", id=5),
        Event(Tick(n=6), event="tick", id=6),
    ]
    app = without_test_checks(stream_app(items, tick=Tick))
    with caplog.at_level(logging.ERROR, logger="sseviews"), anyio.fail_after(TIMEOUT):
        events = await read_all(app)
    assert [event.id for event in events] == ["2", "6"]
    logged = [record.getMessage() for record in caplog.records if record.name == "sseviews"]
    assert len(logged) == 2
    assert "Declared sent event 'tick'" in logged[0]
    assert "the event was not sent" in logged[0]
    assert "Declared sent event 'typo'" in logged[1]
    with caplog.at_level(logging.ERROR, logger="sseviews"), anyio.fail_after(TIMEOUT):
        caplog.clear()
        assert [event.id for event in await read_all(app)] == ["2", "6"]
    assert caplog.records == []  # once per view and event name, not per stream


async def test_event_types_production_closes_events_on_disconnect() -> None:
    closed = anyio.Event()

    class Endless(EventStreamView):
        event_types: ClassVar[Any] = {"message": int}

        async def events(self) -> AsyncIterator[int]:
            try:
                n = 0
                while True:
                    yield n
                    n += 1
                    await anyio.sleep(0.01)
            finally:
                closed.set()

    app = Starlette(routes=[Route("/s", Endless)])
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/s") as stream:
            assert (await stream.next_event()).data == "0"
    with anyio.fail_after(TIMEOUT):
        await closed.wait()


# -- JSON Schema --------------------------------------------------------------------


def test_event_schemas_standalone_with_defs() -> None:
    class View(EventStreamView):
        event_types: ClassVar[Any] = {
            "tick": Tick,
            "message": Chat,
            "tree": Node,
            "color": Color,
            "text": str,
        }

    schemas = event_schemas(View)
    assert schemas["tick"]["properties"]["n"]["type"] == "integer"
    assert schemas["message"]["required"] == ["text"]
    assert schemas["tree"]["$ref"] == "#/$defs/Node"  # recursive: stays a reference
    assert schemas["tree"]["$defs"]["Node"]["properties"]["children"]["items"] == {
        "$ref": "#/$defs/Node"
    }
    assert schemas["color"]["enum"] == ["red", "blue"]
    assert schemas["text"] == {"type": "string"}


def test_event_schemas_into_shared_defs() -> None:
    class View(EventStreamView):
        event_types: ClassVar[Any] = {"tick": Tick, "message": list[Chat]}

    defs: dict[str, Any] = {}
    schemas = event_schemas(View, ref_template="#/components/schemas/{model}", defs=defs)
    assert schemas == {
        "tick": {"$ref": "#/components/schemas/Tick"},
        "message": {"type": "array", "items": {"$ref": "#/components/schemas/Chat"}},
    }
    assert set(defs) == {"Tick", "Chat"}
    with pytest.raises(ValueError, match="needs a defs dict"):
        event_schemas(View, ref_template="#/components/schemas/{model}")


def test_event_schemas_content_type() -> None:
    assert content_type(str) == "text/plain"
    assert content_type(Literal["a", "b"]) == "text/plain"
    assert content_type(Literal[1]) == "application/json"
    assert content_type(Tick) == "application/json"


def test_event_schemas_and_checks_need_no_pydantic() -> None:
    code = """
import dataclasses, sys
from typing import Any, ClassVar, TypedDict
from sseviews import EventStreamView
from sseviews._schema import event_schemas

@dataclasses.dataclass
class Chat:
    text: str

class Presence(TypedDict):
    user: str

class View(EventStreamView):
    event_types: ClassVar[Any] = {"message": Chat, "presence": Presence, "count": int}

assert View._event_types.problem(None, {"text": 1}) is not None
assert View._event_types.problem("count", 3) is None
print(sorted(event_schemas(View)))
assert "pydantic" not in sys.modules, "pydantic was imported"
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['count', 'message', 'presence']"
