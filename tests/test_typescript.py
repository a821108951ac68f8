"""`sseviews typescript`: TypeScript declarations of a stream's events and the typed
`sseviews.js` wrapper.

The unit tests read the generated source; the `tsc` tests compile it under
`--strict`, with code that uses the types right (it must compile) and wrong (it
must not). `tests/browser/test_typescript_client.py` runs the result in Chromium.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NotRequired, TypedDict

import pytest
from fastapi import Depends, FastAPI, Query
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.routing import Mount, Route
from support.typescript import tsc

from sseviews import Broadcast, EventStreamView, StreamRouter
from sseviews._cli import main
from sseviews._typescript import typescript
from sseviews.fastapi import StreamRouter as APIStreamRouter

REPO = Path(__file__).resolve().parent.parent


class Shade(enum.Enum):
    light = "light"
    dark = "dark"


class Author(BaseModel):
    """Who wrote it."""

    name: str


class Note(BaseModel):
    text: str
    author: Author
    shade: Shade = Shade.light
    pair: tuple[int, str] | None = None


class Thread(BaseModel):
    title: str
    replies: list[Thread] = []


@dataclasses.dataclass
class Chat:
    text: str
    user: str | None = None


# The functional form: a key that is not an identifier.
Presence = TypedDict("Presence", {"user": str, "online": NotRequired[bool], "two words": int})


class Room(EventStreamView):
    """A room's events."""

    event_types: ClassVar[dict[str, Any]] = {
        "message": str,
        "note": Note,
        "thread": Thread,
        "chat": Chat,
        "presence": Presence,
        "state": Literal["open", "closed"],
        "count": int,
        "ratio": float | None,
        "flags": dict[str, list[bool]],
        "typing/started": Any,
    }

    async def events(self) -> AsyncIterator[str]:
        yield "welcome"


class Legacy(EventStreamView):
    async def events(self) -> AsyncIterator[str]:
        yield "hi"


class Grouped(EventStreamView):
    event_types: ClassVar[dict[str, Any]] = {"chat": Chat}
    broadcast = Broadcast("memory://")
    groups = ("room",)


def starlette_app() -> Starlette:
    router = StreamRouter()
    router.add_stream("/rooms/{room:int}", Room, name="room")
    router.add_stream("/grouped", Grouped)
    return Starlette(routes=[Mount("/events", router), Route("/legacy", Legacy)])


def block(source: str, header: str) -> str:
    """The text of the declaration that starts with `header`, to its closing brace."""
    start = source.index(header)
    return source[start : source.index("\n}", start) + 2]


def test_typescript_declares_each_stream_s_events_with_payload_types() -> None:
    source = typescript(starlette_app())
    assert block(source, "export interface RoomEvents {") == (
        "export interface RoomEvents {\n"
        "  message: string;\n"
        "  note: Note;\n"
        "  thread: Thread;\n"
        "  chat: Chat;\n"
        "  presence: Presence;\n"
        '  state: "open" | "closed";\n'
        "  count: number;\n"
        "  ratio: number | null;\n"
        "  flags: Record<string, boolean[]>;\n"
        '  "typing/started": unknown;\n'
        '  "sseviews.error": ErrorData;\n'
        "}"
    )
    assert "The events of Room (GET /events/rooms/{room}).\n *\n * A room's events." in source


def test_typescript_named_payload_types_become_interfaces() -> None:
    source = typescript(starlette_app())
    # pydantic models, in serialization mode: fields with defaults may be omitted.
    assert block(source, "export interface Note {") == (
        "export interface Note {\n"
        "  text: string;\n"
        "  author: Author;\n"
        "  shade?: Shade;\n"
        "  pair?: [number, string] | null;\n"
        "}"
    )
    assert "/** Who wrote it. */\nexport interface Author {\n  name: string;\n}" in source
    assert 'export type Shade = "light" | "dark";' in source
    assert "  replies?: Thread[];\n" in block(source, "export interface Thread {")  # recursive
    # A dataclass and a TypedDict, without pydantic.
    assert block(source, "export interface Chat {") == (
        "export interface Chat {\n  text: string;\n  user?: string | null;\n}"
    )
    assert block(source, "export interface Presence {") == (
        "export interface Presence {\n"
        "  user: string;\n"
        "  online?: boolean;\n"
        '  "two words": number;\n'
        "}"
    )


def test_typescript_maps_paths_to_streams_with_params_and_text_events() -> None:
    source = typescript(starlette_app())
    assert block(source, "export interface Streams {") == (
        "export interface Streams {\n"
        '  "/events/rooms/{room}": RoomEvents;\n'
        '  "/events/grouped": GroupedEvents;\n'
        '  "/legacy": LegacyEvents;\n'
        "}"
    )
    assert '  "/events/rooms/{room}": { room: string | number };\n' in source
    assert '  "/legacy": {};\n' in block(source, "export interface StreamParams {")
    # str and Literal-of-str payloads are sent as text: the wrapper hands them over as is.
    assert '  "/events/rooms/{room}": ["message", "state"],\n' in source


def test_typescript_view_without_event_types_takes_any_event() -> None:
    source = typescript(starlette_app())
    assert "export type LegacyEvents = Record<string, unknown>;" in source


def test_typescript_broadcast_view_lists_the_reset_and_error_events() -> None:
    source = typescript(starlette_app())
    assert block(source, "export interface GroupedEvents {") == (
        "export interface GroupedEvents {\n"
        "  chat: Chat;\n"
        '  "sseviews.reset": ResetData;\n'
        '  "sseviews.error": ErrorData;\n'
        "}"
    )


async def require_token(token: Annotated[str, Query()]) -> str:
    return token


class Shaded(EventStreamView):
    event_types: ClassVar[dict[str, Any]] = {"tick": int}
    shade: Annotated[Shade, Query()] = Shade.light

    async def events(self) -> AsyncIterator[int]:
        yield 1


def test_typescript_fastapi_query_parameters_of_dependencies_are_typed() -> None:
    router = APIStreamRouter()
    router.add_stream("/shaded", Shaded)
    app = FastAPI()
    app.include_router(router, prefix="/events", dependencies=[Depends(require_token)])
    source = typescript(app)
    assert block(source, "export interface StreamQuery {").endswith(
        '  "/events/shaded": { shade?: Shade; token?: string };\n}'
    )


def test_typescript_names_that_clash_are_made_unique() -> None:
    @dataclasses.dataclass
    class Streams:  # the module's own Streams interface has this name
        n: int

    class Clash(EventStreamView):
        event_types: ClassVar[dict[str, Any]] = {"a": Streams}

        async def events(self) -> AsyncIterator[Streams]:
            yield Streams(1)

    source = typescript(Starlette(routes=[Route("/clash", Clash)]))
    assert "export interface Streams2 {\n  n: number;\n}" in source
    assert "  a: Streams2;\n" in source
    assert len(re.findall(r"^export interface Streams \{", source, re.MULTILINE)) == 1


def test_typescript_one_view_at_two_paths_gets_an_interface_per_path() -> None:
    app = Starlette(routes=[Route("/a", Room), Route("/b/{b}", Room)])
    source = typescript(app)
    assert block(source, "export interface Streams {") == (
        'export interface Streams {\n  "/a": RoomEvents;\n  "/b/{b}": RoomEvents2;\n}'
    )


def test_typescript_rejects_what_is_not_an_app() -> None:
    with pytest.raises(TypeError, match=r"typescript\(\) expects a Starlette or FastAPI app"):
        typescript(Room)


def test_typescript_cli_prints_the_module(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "streams_app.py"
    module.write_text(
        "from starlette.applications import Starlette\n"
        "from starlette.routing import Route\n"
        "from sseviews import EventStreamView\n\n"
        "class Clock(EventStreamView):\n"
        "    event_types = {'tick': int}\n\n"
        "app = Starlette(routes=[Route('/clock', Clock)])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["typescript", f"{module}:app"]) == 0
    source = capsys.readouterr().out
    assert source.startswith(f"// Generated by `sseviews typescript {module}:app`")
    assert "export interface ClockEvents {\n  tick: number;\n" in source
    assert "export function connect<P extends StreamPath>(" in source


def test_typescript_cli_reports_a_bad_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = tmp_path / "not_an_app.py"
    module.write_text("app = 42\n")
    assert main(["typescript", f"{module}:app"]) == 1
    error = capsys.readouterr().err
    assert "sseviews typescript: error:" in error
    assert "expects a Starlette or FastAPI app" in error


# -- compiled by tsc --------------------------------------------------------------------

USE_RIGHT = """\
import { connect, streamUrl } from "./streams.js";

const room = connect("/events/rooms/{room}", { params: { room: 5 }, tokenUrl: "/token" });
room
  .on("message", (text) => console.log(text.toUpperCase()))
  .on("note", (note) => console.log(note.author.name, note.shade === "dark", note.pair?.[1]))
  .on("thread", (thread) => console.log(thread.replies?.[0]?.title))
  .on("presence", (presence) => console.log(presence["two words"] + 1, presence.online))
  .on("state", (state) => console.log(state === "open"))
  .on("flags", (flags) => console.log(flags["a"]?.[0] === true))
  .on("typing/started", (anything) => console.log(anything));
room.onreset = (reset) => console.log(reset.reason, reset.head);
connect("/legacy").on("whatever", (data) => console.log(data));
connect("/events/grouped").on("sseviews.reset", (reset) => console.log(reset.reason === "ahead"));
room.on("sseviews.error", (error) => console.log(error.reason === "error"));
console.log(streamUrl("/events/rooms/{room}", { room: "a b" }), room.lastEventId);
"""

# Each line is one mistake that tsc must report.
USE_WRONG = [
    'connect("/events/rooms/{room}");',  # the path parameter is missing
    'connect("/nowhere");',  # not a stream
    'connect("/events/rooms/{room}", { params: { hall: 1 } });',  # no such parameter
    'connect("/legacy").on("x", (data) => data.length);',  # undeclared: unknown
    'connect("/events/grouped").on("typo", () => 0);',  # not a declared event
    'connect("/events/grouped").on("chat", (chat) => chat.text.toFixed());',  # a string
    'connect("/events/rooms/{room}", { params: { room: 1 } }).on("count", (n) => n.trim());',
    'const s: "open" = connect("/events/grouped").lastEventId;',
    'connect("/events/grouped").on("sseviews.reset", (reset) => reset.epoch);',  # no epoch
]


@pytest.mark.slow
def test_typescript_output_compiles_strictly_with_code_that_uses_it(tmp_path: Path) -> None:
    (tmp_path / "streams.ts").write_text(typescript(starlette_app()))
    (tmp_path / "use.ts").write_text(USE_RIGHT)
    result = tsc(tmp_path, "--outDir", "out", "streams.ts", "use.ts")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "export function connect(path, ...args)" in (tmp_path / "out" / "streams.js").read_text()


@pytest.mark.slow
def test_typescript_output_refuses_code_that_breaks_the_types(tmp_path: Path) -> None:
    (tmp_path / "streams.ts").write_text(typescript(starlette_app()))
    source = 'import { connect } from "./streams.js";\n' + "\n".join(USE_WRONG) + "\n"
    (tmp_path / "wrong.ts").write_text(source)
    result = tsc(tmp_path, "--noEmit", "streams.ts", "wrong.ts")
    errors = {int(line) for line in re.findall(r"^wrong\.ts\((\d+),", result.stdout, re.MULTILINE)}
    # One error (at least) on every line after the import, and none in streams.ts.
    assert errors == set(range(2, 2 + len(USE_WRONG))), result.stdout
    assert "streams.ts(" not in result.stdout


@pytest.mark.slow
def test_typescript_of_the_example_project_compiles(tmp_path: Path) -> None:
    from example_project import app

    (tmp_path / "streams.ts").write_text(typescript(app, target="example_project:app"))
    result = tsc(tmp_path, "--noEmit", "streams.ts")
    assert result.returncode == 0, result.stdout + result.stderr
