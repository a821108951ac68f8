"""Chromium's own `EventSource` (Debian's chromium, driven by Playwright), against a real
uvicorn serving sseviews. Each run opens a page on the server's origin and records
what its `EventSource` dispatches in `window.records`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from interop_harness import (
    EVENT_NAMES,
    InteropServer,
    Record,
    StartClient,
    check_parsing,
    check_pings_dispatch_nothing,
    check_reset_event,
    check_resume,
    events_of,
    wait_for,
)
from playwright.sync_api import Browser, BrowserContext, sync_playwright

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
OPEN = """({url, names}) => {
  window.records = [];
  const print = (record) => window.records.push(record);
  const source = new EventSource(url);
  source.onopen = () => print({type: "open"});
  source.onerror = () => {
    print({type: "error", status: null, state: source.readyState});
    if (source.readyState === EventSource.CLOSED) print({type: "closed"});
  };
  const record = (m) => print({type: "event", event: m.type, data: m.data, id: m.lastEventId});
  source.onmessage = record;
  for (const name of names) source.addEventListener(name, record);
}"""


class ChromiumRun:
    """An `EventSource` in a page of its own browser context."""

    def __init__(self, browser: Browser, url: str) -> None:
        parts = urlsplit(url)
        self.context: BrowserContext = browser.new_context()
        self.page = self.context.new_page()
        # A page of the stream's origin: EventSource then needs no CORS.
        self.page.goto(f"{parts.scheme}://{parts.netloc}/health")
        self.page.evaluate(OPEN, {"url": url, "names": EVENT_NAMES})

    def records(self) -> list[Record]:
        records: Any = self.page.evaluate("window.records")
        return list(records)

    def close(self) -> None:
        self.context.close()


# Module scope: sync Playwright keeps its own event loop current while it runs.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def start(browser: Browser) -> StartClient:
    return lambda url: ChromiumRun(browser, url)


def test_interop_chromium_parses_every_field(start: StartClient, server: InteropServer) -> None:
    check_parsing(start, server, exposes_retry=False)


def test_interop_chromium_sees_no_ping(start: StartClient, server: InteropServer) -> None:
    check_pings_dispatch_nothing(start, server)


def test_interop_chromium_gets_reset_event(start: StartClient, server: InteropServer) -> None:
    check_reset_event(start, server)


@pytest.mark.parametrize("status", [401, 403, 204])
def test_interop_chromium_closes_on_refusal(
    start: StartClient, server: InteropServer, status: int
) -> None:
    run = start(f"{server.base}/refuse/{status}")
    try:
        records = wait_for(run, lambda r: r[-1:] == [{"type": "closed"}], "the refusal")
    finally:
        run.close()
    # EventSource shows no status: one error, already CLOSED (2), and no reconnect.
    assert events_of(records) == []
    assert [r["state"] for r in records if r["type"] == "error"] == [2]


def test_interop_chromium_resumes_after_drop_and_restart(
    start: StartClient, tmp_path: Path
) -> None:
    check_resume({"chromium": start}, tmp_path)
