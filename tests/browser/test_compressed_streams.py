"""Compressed streams end to end, under a real uvicorn: Chromium's `EventSource` and
`sseviews.js` in the browser, and `curl --compressed`. Each reads every event exactly,
across reconnections that resume with Last-Event-ID (the app's streams end every 0.7 s),
and each gets every event of a stream without pings before the next one is sent.

The app is `compress_app.py`.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page
from support.processes import clean_env, free_port, stop_process, wait_until_serving

from sseviews.testing import EventParser

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
ENCODINGS = ["gzip", "br", "zstd"]
TEXT = "the same words again and again, as chat and dashboards repeat them; "


class CompressApp:
    """`uvicorn compress_app:app` in a subprocess."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.log = folder / "server.log"
        command = [sys.executable, "-m", "uvicorn", "compress_app:app", "--app-dir", str(HERE)]
        command += ["--host", HOST, "--port", str(self.port), "--log-level", "warning"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, env=clean_env(), stdout=log, stderr=log)
        wait_until_serving(self.process, self.base + "/stats", self.output)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def publish(self, first: int, last: int) -> None:
        request = urllib.request.Request(
            f"{self.base}/publish?from={first}&to={last}", method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200

    def connections(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.base + "/stats", timeout=5) as response:
            found: list[dict[str, Any]] = json.loads(response.read())["connections"]
            return found


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CompressApp]:
    started = CompressApp(tmp_path_factory.mktemp("compress"))
    yield started
    stop_process(started.process)


def expected(first: int, last: int) -> list[dict[str, Any]]:
    return [{"n": n, "text": TEXT * (1 + n % 3)} for n in range(first, last)]


@contextmanager
def page_accepting(browser: Browser, encoding: str) -> Iterator[Page]:
    """A page whose requests accept only `encoding`, closed with its context."""
    # Chromium asks for br and zstd only over HTTPS: the header makes it ask here too.
    context = browser.new_context(extra_http_headers={"Accept-Encoding": encoding})
    try:
        yield context.new_page()
    finally:
        context.close()


def publish_for(app: CompressApp, seconds: float, first: int = 0) -> int:
    """Publish two events every 0.1 s for `seconds`, pausing 0.2 s (a ping) every
    fifth time; the number of the next event."""
    n = first
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        app.publish(n, n + 2)
        n += 2
        time.sleep(0.2 if n % 10 == 0 else 0.1)
    return n


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_browser_reads_compressed_streams_across_reconnections(
    app: CompressApp, browser: Browser, encoding: str
) -> None:
    with page_accepting(browser, encoding) as page:
        page.goto(f"{app.base}/?encoding={encoding}")
        first = len(app.connections())
        page.wait_for_function("window.native !== undefined")
        time.sleep(0.3)  # both streams open
        total = publish_for(app, 2.5)
        page.wait_for_function(
            f"window.native.length >= {total} && window.helper.length >= {total}", timeout=10_000
        )
        assert page.evaluate("window.native") == expected(0, total)
        assert page.evaluate("window.helper") == expected(0, total)
    mine = [c for c in app.connections()[first:] if c["encoding"] == encoding]
    for client in ("native", "helper"):
        streams = [c for c in mine if c["client"] == client]
        assert all(encoding in c["accept_encoding"] for c in streams), streams
        # Every stream ends after 0.7 s: the later ones resumed with Last-Event-ID.
        resumed = [c for c in streams if c["last_event_id"]]
        assert len(resumed) >= 2, streams


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_curl_compressed_reads_and_resumes(app: CompressApp, encoding: str, tmp_path: Path) -> None:
    before = len(app.connections())
    heads = tmp_path / "heads.txt"

    def curl(last_event_id: str | None) -> subprocess.Popen[bytes]:
        command = ["curl", "--silent", "--show-error", "--no-buffer", "--compressed"]
        command += ["--dump-header", str(heads)]
        command += ["-H", f"Accept-Encoding: {encoding}", "--max-time", "5"]
        if last_event_id is not None:
            command += ["-H", f"Last-Event-ID: {last_event_id}"]
        return subprocess.Popen([*command, f"{app.base}/feed/{encoding}"], stdout=subprocess.PIPE)

    reader = curl(None)
    while len(app.connections()) == before:  # curl's stream is open
        time.sleep(0.02)
    app.publish(1000, 1003)
    time.sleep(0.2)  # a ping
    app.publish(1003, 1006)
    out, _ = reader.communicate(timeout=10)
    assert reader.returncode == 0  # the stream ended cleanly at its max_lifetime
    events = EventParser().feed(out)
    assert [e.json() for e in events] == expected(1000, 1006)
    assert b": ping\n" in out  # pings between events, decoded like them
    assert f"content-encoding: {encoding}" in heads.read_text().lower()
    app.publish(1006, 1010)  # missed while no stream is open
    resumed = curl(events[-1].id)
    out, _ = resumed.communicate(timeout=10)
    assert resumed.returncode == 0
    assert [e.json() for e in EventParser().feed(out)] == expected(1006, 1010)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_browser_gets_each_compressed_event_before_the_next(
    app: CompressApp, browser: Browser, encoding: str
) -> None:
    # The quiet feed sends no pings: only each event's own flushed write can carry it.
    with page_accepting(browser, encoding) as page:
        before = len(app.connections())
        page.goto(f"{app.base}/?encoding={encoding}&feed=quiet")
        deadline = time.monotonic() + 5
        while len(app.connections()) < before + 2:  # both streams are open
            assert time.monotonic() < deadline, app.connections()[before:]
            time.sleep(0.02)
        for n in range(2000, 2008):
            app.publish(n, n + 1)
            count = n - 2000 + 1
            page.wait_for_function(
                f"window.native.length >= {count} && window.helper.length >= {count}",
                timeout=3_000,
            )
        assert page.evaluate("window.native") == expected(2000, 2008)
        assert page.evaluate("window.helper") == expected(2000, 2008)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_curl_compressed_gets_each_event_before_the_next(app: CompressApp, encoding: str) -> None:
    before = len(app.connections())
    command = ["curl", "--silent", "--show-error", "--no-buffer", "--compressed"]
    command += ["-H", f"Accept-Encoding: {encoding}", "--max-time", "10"]
    reader = subprocess.Popen([*command, f"{app.base}/quiet/{encoding}"], stdout=subprocess.PIPE)
    assert reader.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(reader.stdout, selectors.EVENT_READ)
    parser = EventParser()
    events = []
    try:
        deadline = time.monotonic() + 5
        while len(app.connections()) == before:  # curl's stream is open
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for n in range(2000, 2008):
            app.publish(n, n + 1)
            deadline = time.monotonic() + 3
            while len(events) < n - 2000 + 1:
                left = deadline - time.monotonic()
                assert left > 0, f"event {n} held back; decoded so far: {events}"
                if selector.select(left):
                    chunk = os.read(reader.stdout.fileno(), 65536)
                    assert chunk, "curl ended early"
                    events += parser.feed(chunk)
    finally:
        selector.close()
        reader.kill()
        reader.wait()
        reader.stdout.close()
    assert [e.json() for e in events] == expected(2000, 2008)
