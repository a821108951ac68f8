"""Cross-check the event encoder against a real client: headless Chromium's `EventSource`.

A corpus of tricky events (`corpus_app.py`: unicode, emoji, lone CR, CRLF, empty and
newline-only data, field look-alikes, 100 KB lines, JSON, bytes, odd event names and
ids, comment-only and retry-only messages) is served by a real uvicorn. Three views of
what a client receives must agree exactly, event by event (type, data, lastEventId):

- the expectation computed here from the corpus items, by the WHATWG rules (data
  lines joined by LF, CRLF and CR read as LF, lastEventId carried across events,
  no dispatch without data);
- `sseviews.testing.EventParser` fed the exact bytes the server sent;
- what Chromium's `EventSource` dispatched to the page.

Run `pytest -m "" tests/browser/test_encoder_corpus.py`; screenshots land in `test-artifacts/`.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from corpus_app import CORPORA, END
from playwright.sync_api import Page, Request
from support.processes import clean_env, free_port, stop_process, wait_until_serving

from sseviews import Event
from sseviews._events import encode_data
from sseviews.testing import EventParser

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
STARTUP_SECONDS = 20.0
#: Bound on the whole corpus reaching the page.
RECEIVE_MS = 20_000
#: How long the page must stay quiet after `end` to show nothing else (no reconnect) came.
QUIET_MS = 600

OpenPage = Callable[[str], Page]
Received = dict[str, str]  # {"type", "data", "lastEventId"}


# -- the server ------------------------------------------------------------------------


class CorpusServer:
    """`uvicorn corpus_app:app` in a subprocess, on a loopback port."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.log = folder / "uvicorn.log"
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "corpus_app:app",
            "--app-dir",
            str(HERE),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--timeout-graceful-shutdown",
            "5",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=HERE,
                env=clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def url(self, path: str) -> str:
        return self.base + path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stream_requests(self, corpus: str) -> int:
        """How many `GET /stream/<corpus>` the access log shows."""
        return self.output().count(f'"GET /stream/{corpus} HTTP/1.1"')


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorpusServer]:
    server = CorpusServer(tmp_path_factory.mktemp("corpus"))
    try:
        wait_until_serving(server.process, server.url("/"), server.output, STARTUP_SECONDS)
        yield server
    finally:
        if server.process.poll() is None:
            stop_process(server.process)


# -- the three views of the stream -------------------------------------------------------


def payload_text(value: Any) -> str:
    """The text an item's data carries, by the documented rules (docs/events.md)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8")
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def is_json_payload(item: Any) -> bool:
    value = item.data if isinstance(item, Event) else item
    if isinstance(item, Event) and value is None:
        return False  # Event(data=None) has no data at all
    return not isinstance(value, str | bytes | bytearray | memoryview)


def expected_events(items: list[Any]) -> tuple[list[Received], list[Any]]:
    """What a WHATWG client dispatches for `items`, and the item behind each event.

    Computed from the items' fields, not from their encoding.
    """
    received: list[Received] = []
    sources: list[Any] = []
    last_event_id = ""
    for item in items:
        if isinstance(item, Event):
            data, name, event_id = item.data, item.event, item.id
            if event_id is not None:  # also on a message that is not dispatched
                last_event_id = event_id
            if data is None:  # comment-only, retry-only, id-only: no dispatch
                continue
        else:
            data, name = item, None  # a bare value: unnamed, no id
        text = re.sub(r"\r\n?", "\n", payload_text(data))
        received.append({"type": name or "message", "data": text, "lastEventId": last_event_id})
        sources.append(item)
    return received, sources


def wire(items: list[Any]) -> bytes:
    """The bytes the encoder makes of `items`, as the view sends them."""
    return b"".join(
        item.encode() if isinstance(item, Event) else encode_data(item) for item in items
    )


def parse_by_lines(body: bytes) -> list[Received]:
    """`EventParser` fed one line at a time, reading its last event id at each dispatch."""
    parser = EventParser()
    received: list[Received] = []
    for line in body.splitlines(keepends=True):  # bytes: splits on CRLF, CR, LF only
        events = parser.feed(line)
        assert len(events) <= 1
        for event in events:
            received.append(
                {
                    "type": event.event or "message",
                    "data": event.data,
                    "lastEventId": parser.last_event_id,
                }
            )
    return received


def parse_in_chunks(body: bytes, sizes: Iterator[int]) -> list[tuple[str, str, str | None]]:
    """`EventParser` fed `body` cut at arbitrary points (mid-UTF-8 sequence included)."""
    parser = EventParser()
    events: list[Event] = []
    position = 0
    while position < len(body):
        size = next(sizes)
        events.extend(parser.feed(body[position : position + size]))
        position += size
    return [(event.event or "message", event.data, event.id) for event in events]


def fetch_body(server: CorpusServer, corpus: str) -> bytes:
    with urllib.request.urlopen(server.url(f"/stream/{corpus}"), timeout=10) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        body: bytes = response.read()
        return body


def receive_in_browser(
    server: CorpusServer, open_page: OpenPage, corpus: str
) -> tuple[Page, list[dict[str, Any]]]:
    """Open the corpus page; wait (bounded) for `end`; return what the page received."""
    page = open_page("about:blank")
    streams: list[Request] = []
    page.on(
        "request",
        lambda request: streams.append(request) if request.resource_type == "eventsource" else None,
    )
    before = server.stream_requests(corpus)
    page.goto(server.url(f"/page/{corpus}"))
    page.wait_for_function("() => window.done === true", timeout=RECEIVE_MS)
    count = page.evaluate("window.received.length")
    page.wait_for_timeout(QUIET_MS)
    assert page.evaluate("window.received.length") == count, "events arrived after `end`"
    assert page.evaluate("window.es.readyState") == 2  # CLOSED: it will not reconnect
    assert page.evaluate("window.opens") == 1
    assert page.evaluate("window.errors") == []
    assert len(streams) == 1
    assert server.stream_requests(corpus) - before == 1, server.output()
    return page, page.evaluate("window.received")


# -- comparing ---------------------------------------------------------------------------


def _short(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars of repr)"


def differences(label: str, actual: list[Received], expected: list[Received]) -> list[str]:
    """A readable list of where `actual` departs from `expected`, empty when equal."""
    if actual == expected:
        return []
    lines = [f"{label}: {len(actual)} events, expected {len(expected)}"]
    for index in range(max(len(actual), len(expected))):
        got = actual[index] if index < len(actual) else None
        want = expected[index] if index < len(expected) else None
        if got == want:
            continue
        if got is None or want is None:
            lines.append(f"  [{index}] got {_short(got)}, expected {_short(want)}")
            continue
        for key in ("type", "data", "lastEventId"):
            if got[key] != want[key]:
                lines.append(
                    f"  [{index}] {key}: got {_short(got[key])}, expected {_short(want[key])}"
                )
    return lines


def js_shape(value: Any) -> Any:
    """A JSON value in a form where True != 1 and 1 == 1.0, as JavaScript sees them."""
    if value is None or isinstance(value, bool | str):
        return (type(value).__name__, value)
    if isinstance(value, int | float):
        return ("number", float(value))
    if isinstance(value, list | tuple):
        return ("array", [js_shape(item) for item in value])
    if isinstance(value, dict):
        return ("object", {key: js_shape(item) for key, item in value.items()})
    raise TypeError(f"not a JSON value: {value!r}")


# -- the tests ---------------------------------------------------------------------------


def test_corpus_is_large_and_tricky_enough() -> None:
    items = CORPORA["main"]
    expected, _ = expected_events(items)
    assert len(expected) >= 30
    assert items[-1] is END
    dispatched = {event["type"] for event in expected}
    assert {"message", "cjk", "🎉 emoji", "json", "事件", "end"} <= dispatched
    assert any(not isinstance(item, Event) for item in items)  # bare values too
    assert any(isinstance(i, Event) and i.data is None and i.comment for i in items)
    assert any(isinstance(i, Event) and i.data is None and i.retry for i in items)
    assert max(len(event["data"]) for event in expected) >= 100_000


def test_chromium_eventsource_receives_the_corpus_exactly(
    corpus_server: CorpusServer,
    open_page: OpenPage,
    screenshot: Callable[[Page, str], Path],
) -> None:
    items = CORPORA["main"]
    expected, sources = expected_events(items)

    # The server sends exactly the encoder's bytes, nothing more (no pings, no retry).
    body = fetch_body(corpus_server, "main")
    assert body == wire(items)

    parsed = parse_by_lines(body)
    # Cutting the body anywhere (inside UTF-8 sequences too) changes nothing.
    cuts = random.Random(5)
    chunked = parse_in_chunks(body, iter(lambda: cuts.randint(1, 4096), None))
    assert chunked == parse_in_chunks(body, iter(lambda: len(body), None))
    assert [(e["type"], e["data"]) for e in parsed] == [(t, d) for t, d, _ in chunked]

    page, in_browser = receive_in_browser(corpus_server, open_page, "main")
    screenshot(page, "received")
    browser = [{key: event[key] for key in ("type", "data", "lastEventId")} for event in in_browser]

    problems = [
        *differences("EventParser vs expected", parsed, expected),
        *differences("Chromium vs expected", browser, expected),
        *differences("Chromium vs EventParser", browser, parsed),
    ]
    # JSON payloads: JSON.parse in the browser gives back the value that was sent.
    for index, (item, event) in enumerate(zip(sources, in_browser, strict=False)):
        if not is_json_payload(item):
            continue
        value = item.data if isinstance(item, Event) else item
        got = event["json"]
        if not got["ok"]:
            problems.append(f"  [{index}] JSON.parse failed: {got['error']} on {event['data']!r}")
        elif js_shape(got["value"]) != js_shape(value):
            problems.append(f"  [{index}] JSON.parse gave {_short(got['value'])}, sent {value!r}")
    assert not problems, "\n".join(problems)
    assert browser == expected
    assert browser == parsed
