"""View settings: documented where the reference shows them, checked at class creation."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import griffe
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from sseviews import Broadcast, EventStreamView, HookNameWarning, SettingNameWarning
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio

TIMEOUT = 5

SETTINGS = [
    "ping_interval",
    "send_timeout",
    "retry",
    "headers",
    "shutdown_grace_period",
    "disconnect_timeout",
    "session_factory",
    "broadcast",
    "groups",
    "max_buffer_events",
    "max_buffer_bytes",
    "max_groups",
    "max_connections",
    "retry_after",
    "metrics",
    "error_retry",
]


# -- the API reference -----------------------------------------------------------------


@pytest.fixture(scope="module")
def view_docs() -> Any:
    """EventStreamView as mkdocstrings sees it: griffe reads the source, not the object."""
    package = griffe.load("sseviews", search_paths=["."], docstring_parser="google")
    return package["EventStreamView"]


@pytest.mark.parametrize("name", SETTINGS)
def test_settings_have_attribute_docstrings(view_docs: Any, name: str) -> None:
    member = view_docs.members[name]
    assert member.is_attribute
    assert member.docstring is not None, f"{name} has no docstring for the API reference"
    assert len(member.docstring.value) > 20


def test_settings_every_public_class_attribute_is_documented(view_docs: Any) -> None:
    # Settings added later get a docstring too (instance attributes such as scope don't).
    undocumented = [
        name
        for name, member in view_docs.members.items()
        if "class-attribute" in member.labels
        and not name.startswith("_")
        and member.docstring is None
    ]
    assert undocumented == []


# -- events() must be an async generator --------------------------------------------------


def test_settings_events_plain_def_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"events\(\) must be an async generator.*a plain def"):

        class Plain(EventStreamView):
            def events(self) -> list[str]:  # type: ignore[override]
                return ["a", "b"]


def test_settings_events_async_def_without_yield_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"got an async def without yield"):

        class NoYield(EventStreamView):
            async def events(self) -> list[str]:  # type: ignore[override]
                return ["a", "b"]


def test_settings_events_sync_generator_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"`async def events\(self\):` with `yield`.*sync gen"):

        class SyncGenerator(EventStreamView):
            def events(self) -> Any:
                yield "a"


def test_settings_events_not_callable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"got \['a'\]"):
        type("Listed", (EventStreamView,), {"events": ["a"]})


def test_settings_events_async_generator_and_decorated_ones_are_accepted() -> None:
    def logged(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(self: Any) -> Any:
            return function(self)

        return wrapper

    class Direct(EventStreamView):
        async def events(self) -> AsyncIterator[str]:
            yield "a"

    class Decorated(EventStreamView):
        @logged
        async def events(self) -> AsyncIterator[str]:
            yield "a"

    class Inherited(Direct):
        ping_interval = 5

    assert Inherited.events is Direct.events
    assert Decorated.__name__ == "Decorated"


# -- misspelt settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attribute", "setting"),
    [
        ("ping_intervall", "ping_interval"),
        ("PING_INTERVAL", "ping_interval"),
        ("send_timout", "send_timeout"),
        ("retyr", "retry"),
        ("header", "headers"),
        ("max_conections", "max_connections"),
        ("shutdown_grace_periods", "shutdown_grace_period"),
    ],
)
def test_settings_misspelt_name_warns_naming_the_setting(attribute: str, setting: str) -> None:
    with pytest.warns(SettingNameWarning) as caught:
        type("Misspelt", (EventStreamView,), {attribute: 5})
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"Misspelt.{attribute} looks like a misspelling of the setting {setting!r}" in message
    assert f"rename it to {setting}" in message


def test_settings_misspelt_warning_points_at_the_class_statement() -> None:
    with pytest.warns(SettingNameWarning, match="ping_interval") as caught:

        class Clock(EventStreamView):
            ping_intervall = 5

            async def events(self) -> AsyncIterator[str]:
                yield "tick"

    assert caught[0].filename == __file__
    assert Clock.ping_interval == 15.0  # the setting kept its default: hence the warning


def test_settings_misspelt_groups_method_warns() -> None:
    with pytest.warns(SettingNameWarning, match="'groups'"):

        class Room(EventStreamView):
            def group(self) -> list[str]:
                return ["room"]


def test_settings_names_of_their_own_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class Own(EventStreamView):
            interval = 1.0
            entry = "x"
            retries = 3
            ping_interval = 5  # a real setting

            def header(self) -> str:  # a helper method, not the `headers` setting
                return "x"

            async def events(self) -> AsyncIterator[str]:
                yield self.header()

    assert Own.ping_interval == 5


def test_settings_misspelling_warns_once_not_again_in_subclasses() -> None:
    with pytest.warns(SettingNameWarning):

        class Base(EventStreamView):
            send_timout = 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class Child(Base):
            pass

    assert Child.send_timout == 1


def test_settings_misspelt_warning_can_be_silenced() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=SettingNameWarning)
        type("Meant", (EventStreamView,), {"retyr": 1})


# -- a broadcast never connected (no lifespan) ---------------------------------------------


def room_view(broadcast: Broadcast) -> type[EventStreamView]:
    return type("Room", (EventStreamView,), {"broadcast": broadcast, "groups": ["room"]})


async def test_settings_unconnected_broadcast_refuses_with_503_and_logs_one_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broadcast = Broadcast("memory://")  # no lifespan: never connected
    app = Starlette(routes=[Route("/room", room_view(broadcast))])
    with caplog.at_level(logging.INFO, logger="sseviews"):
        async with EventStreamClient(app, timeout=TIMEOUT) as client:
            first = await client.get("/room")
            second = await client.get("/room")
    for response in (first, second):
        # Not a 200 that ends at once: browsers would reconnect in a loop for good.
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert "async with broadcast:" in response.text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1  # once per broadcast, not once per request
    assert "never connected" in errors[0].getMessage()
    assert "async with broadcast" in errors[0].getMessage()
    assert broadcast.subscriber_count == 0


async def test_settings_unconnected_broadcast_error_is_logged_per_broadcast(
    caplog: pytest.LogCaptureFixture,
) -> None:
    one, two = Broadcast("memory://"), Broadcast("memory://")
    app = Starlette(routes=[Route("/one", room_view(one)), Route("/two", room_view(two))])
    with caplog.at_level(logging.ERROR, logger="sseviews"):
        async with EventStreamClient(app, timeout=TIMEOUT) as client:
            for path in ("/one", "/two", "/one"):
                assert (await client.get(path)).status_code == 503
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 2


async def test_settings_closed_broadcast_still_ends_at_once_with_200() -> None:
    # After the lifespan closed it (shutdown), EventSource should come back later.
    broadcast = Broadcast("memory://")
    async with broadcast:
        pass
    async with EventStreamClient(room_view(broadcast), timeout=TIMEOUT) as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert response.content == b""


# -- hooks of the wrong kind --------------------------------------------------------------


@pytest.mark.parametrize(
    ("hook", "fix"),
    [
        ("on_connect", "make it `async def on_connect(self)`"),
        ("on_disconnect", "make it `async def on_disconnect(self, reason)`"),
    ],
)
def test_settings_sync_hook_is_a_type_error_naming_the_fix(hook: str, fix: str) -> None:
    def sync(self: Any, *args: Any) -> None:
        return None

    with pytest.raises(TypeError, match=r"Plain\.") as raised:
        type("Plain", (EventStreamView,), {hook: sync})
    assert f"Plain.{hook}() must be an `async def`" in str(raised.value)
    assert fix in str(raised.value)


def test_settings_on_connect_async_generator_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"on_connect\(\) must be an `async def` without `yield`"):

        class Yields(EventStreamView):
            async def on_connect(self) -> AsyncIterator[None]:
                yield None


def test_settings_async_ping_message_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"make it `def ping_message\(self\)`"):

        class Pinging(EventStreamView):
            async def ping_message(self) -> Any:
                return None


@pytest.mark.parametrize("hook", ["groups", "authorize_group", "presence_info"])
def test_settings_async_generator_value_hook_is_a_type_error(hook: str) -> None:
    async def yields(self: Any, *args: Any) -> AsyncIterator[str]:
        yield "room"

    with pytest.raises(TypeError, match=rf"{hook}\(\) must return its value"):
        type("Yielding", (EventStreamView,), {hook: yields})


def test_settings_hooks_of_the_right_kinds_are_accepted() -> None:
    def traced(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)  # the coroutine, awaited by sseviews

        return wrapper

    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class Fine(EventStreamView):
            broadcast = Broadcast("memory://")

            @traced
            async def on_connect(self) -> None:
                return None

            async def on_disconnect(self, reason: Any) -> None:
                return None

            def groups(self) -> list[str]:  # sync or async: both are documented
                return ["room"]

            async def authorize_group(self, group: str) -> bool:
                return True

            def presence_info(self) -> dict[str, Any] | None:
                return None

            def ping_message(self) -> Any:
                return EventStreamView.ping_message(self)

    assert Fine.groups is not EventStreamView.groups


def test_settings_groups_property_is_accepted() -> None:
    class Room(EventStreamView):
        @property
        def groups(self) -> list[str]:  # type: ignore[override]
            return ["room"]

    Room.broadcast = Broadcast("memory://")
    assert isinstance(vars(Room)["groups"], property)


# -- misspelt hooks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "hook"),
    [
        ("event", "events"),
        ("evnets", "events"),
        ("Events", "events"),
        ("on_disconect", "on_disconnect"),
        ("ondisconnect", "on_disconnect"),
        ("on_disconnected", "on_disconnect"),
        ("onconnect", "on_connect"),
        ("onConnect", "on_connect"),
        ("authorise_group", "authorize_group"),
        ("ping_messages", "ping_message"),
        ("presence_infos", "presence_info"),
    ],
)
def test_settings_misspelt_hook_warns_naming_the_hook(method: str, hook: str) -> None:
    async def misspelt(self: Any, *args: Any) -> None:
        return None

    with pytest.warns(HookNameWarning) as caught:
        type("Misspelt", (EventStreamView,), {method: misspelt})
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"Misspelt.{method}() looks like a misspelling of the hook {hook}()" in message
    assert f"rename it to {hook}" in message


def test_settings_misspelt_hook_warning_points_at_the_class_statement() -> None:
    with pytest.warns(HookNameWarning, match=r"event\(\) looks like .* events\(\)") as caught:

        class Clock(EventStreamView):
            async def event(self) -> AsyncIterator[str]:
                yield "tick"

    assert caught[0].filename == __file__
    assert Clock.events is EventStreamView.events  # the hook kept its default: hence the warning


def test_settings_methods_of_their_own_do_not_warn_as_hooks() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class Own(EventStreamView):
            event_name = "tick"  # not a method

            def event(self, n: int) -> dict[str, int]:  # a helper beside events()
                return {"n": n}

            def connect(self) -> None: ...
            def on_message(self) -> None: ...
            def send_event(self) -> None: ...
            def my_events(self) -> None: ...
            def get_events(self) -> None: ...
            def presence(self) -> None: ...
            def authorize(self) -> None: ...
            def _events(self) -> None: ...

            @property
            def events_seen(self) -> int:
                return 0

            async def events(self) -> AsyncIterator[dict[str, int]]:
                yield self.event(1)

        class Child(Own):  # inherits the helper; warned about (or not) once, in Own
            pass

    assert Child.event is Own.event


def test_settings_misspelt_hook_warning_can_be_silenced() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=HookNameWarning)

        async def onconnect(self: Any) -> None:
            return None

        type("Meant", (EventStreamView,), {"onconnect": onconnect})


# -- views that stream nothing -------------------------------------------------------------


def test_settings_base_view_without_events_is_accepted_at_class_creation() -> None:
    # A base class of other views streams nothing of its own: not an error.
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class Authenticated(EventStreamView):
            async def on_connect(self) -> None:
                return None

        class Clock(Authenticated):
            async def events(self) -> AsyncIterator[str]:
                yield "tick"

        class Room(Authenticated):
            groups = ("room",)  # its broadcast is set after the class statement

    Room.broadcast = Broadcast("memory://")
    assert Clock.on_connect is Authenticated.on_connect


# -- class settings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("ping_interval", 0, ValueError),
        ("ping_interval", -1, ValueError),
        ("ping_interval", "15", TypeError),
        ("ping_interval", True, TypeError),
        ("send_timeout", 0, ValueError),
        ("send_timeout", -0.5, ValueError),
        ("send_timeout", "30", TypeError),
        ("shutdown_grace_period", -1, ValueError),
        ("shutdown_grace_period", None, TypeError),
        ("disconnect_timeout", 0, ValueError),
        ("disconnect_timeout", None, TypeError),
        ("retry", -1, ValueError),
        ("retry", 1.5, TypeError),
        ("retry", True, TypeError),
        ("retry", "1000", TypeError),
        ("headers", [("x-a", "1")], TypeError),
        ("headers", "x-a: 1", TypeError),
        ("headers", {"x-a": 1}, TypeError),
        ("headers", {b"x-a": "1"}, TypeError),
    ],
)
def test_view_invalid_class_setting_raises_at_definition(
    name: str, value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match=name):
        type("Bad", (EventStreamView,), {name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ping_interval", None),
        ("ping_interval", 0.5),
        ("send_timeout", None),
        ("shutdown_grace_period", 0),
        ("retry", 0),
        ("retry", None),
        ("headers", {"x-a": "1"}),
    ],
)
def test_view_valid_class_setting_accepted(name: str, value: Any) -> None:
    view = type("Good", (EventStreamView,), {name: value})
    assert getattr(view, name) == value


def test_view_invalid_setting_checked_in_grandchild() -> None:
    class Base(EventStreamView):
        ping_interval = 1

    with pytest.raises(ValueError, match="ping_interval"):

        class Child(Base):
            ping_interval = -1
