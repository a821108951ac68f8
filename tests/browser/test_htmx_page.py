"""The example project's htmx pages in headless Chromium: htmx swaps in HTML fragments
that the server rendered once and published.

Each test runs with htmx 2 and its SSE extension (`/htmx`) and with htmx 4 and the
`hx-sse` extension it ships (`/htmx4`). Both come from the npm registry (`.ci/run`
installs them into `example_project/node_modules/`, htmx 4 under the alias `htmx4`);
without them these tests are skipped.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, Request, expect

pytestmark = pytest.mark.slow

ExampleServer = Any  # tests/browser/conftest.py: the example project under uvicorn
OpenPage = Callable[[str], Page]
MakeServer = Callable[..., ExampleServer]
VENDOR = Path(__file__).resolve().parents[2] / "example_project" / "node_modules"

# Posts to the feed through the app itself, in another OS process: with a SQL history
# this is "someone else posted while the server was down".
POST_OFFLINE = """
import sys
import anyio
from sseviews.testing import EventStreamClient
from example_project import create_app

async def main(texts):
    async with EventStreamClient(create_app()) as client:
        for text in texts:
            response = await client.post(
                "/htmx/messages",
                content=f"author=offline&text={text}".encode(),
                headers={
                    "content-type": "application/x-www-form-urlencoded",
                    "hx-request": "true",
                },
            )
            assert response.status_code == 204, response.text

anyio.run(main, sys.argv[1:])
"""


@dataclass(frozen=True)
class Htmx:
    """One htmx version's page, and how to tell that its stream is open."""

    version: str
    path: str
    packages: tuple[str, ...]
    connected: str
    missing: str  # what the page says until it is installed


HTMX2 = Htmx(
    "2",
    "/htmx",
    ("htmx.org", "htmx-ext-sse"),
    """() => {
      const element = document.querySelector("[sse-connect]");
      const data = element && element["htmx-internal-data"];
      return !!(data && data.sseEventSource && data.sseEventSource.readyState === 1);
    }""",
    "htmx is not installed yet",
)
# htmx 4 streams with fetch(): `element._htmx.sse` is the connection, `reader` its body.
HTMX4 = Htmx(
    "4",
    "/htmx4",
    ("htmx4",),
    """() => {
      const element = document.querySelector("#feed");
      const sse = element && element._htmx && element._htmx.sse;
      return !!(sse && sse.status === 200 && sse.reader);
    }""",
    "htmx 4 is not installed yet",
)


@pytest.fixture(params=[HTMX2, HTMX4], ids=["htmx2", "htmx4"])
def htmx(request: pytest.FixtureRequest) -> Htmx:
    chosen: Htmx = request.param
    if not all((VENDOR / package).is_dir() for package in chosen.packages):
        message = f"htmx {chosen.version} is not installed: .ci/run installs it from npm"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: a skip there would hide a broken setup
        pytest.skip(message)
    return chosen


def test_htmx_fragment_posted_in_one_browser_appears_in_another(
    server: ExampleServer, open_page: OpenPage, htmx: Htmx
) -> None:
    writer = open_page(server.url(htmx.path))
    reader = open_page(server.url(htmx.path))
    writer.wait_for_function(htmx.connected)
    reader.wait_for_function(htmx.connected)
    writer.fill("input[name=author]", "ada")
    writer.fill("input[name=text]", "<b>not bold</b> & more")
    writer.click("form button")
    item = reader.locator("#feed li.feed-item").last
    item.wait_for()
    assert item.locator(".author").inner_text() == "ada"
    # Escaped on the server: the markup is shown as text, not interpreted.
    assert item.locator(".text").inner_text() == "<b>not bold</b> & more"
    assert reader.locator("#feed b").count() == 0
    assert writer.locator("#feed li.feed-item .text").last.inner_text() == "<b>not bold</b> & more"
    assert writer.input_value("input[name=text]") == ""  # the form was reset after posting


def test_htmx_fragments_arrive_in_order(
    server: ExampleServer, open_page: OpenPage, htmx: Htmx
) -> None:
    reader = open_page(server.url(htmx.path))
    reader.wait_for_function(htmx.connected)
    before = reader.locator("#feed li").count()
    for n in range(5):
        server.run_python(
            "import sys, urllib.request; urllib.request.urlopen(urllib.request.Request("
            "sys.argv[1], data=sys.argv[2].encode(), method='POST'), timeout=5)",
            server.url("/htmx/messages"),
            f"author=bot&text=line+{n}",
        )
    reader.wait_for_function(f"document.querySelectorAll('#feed li').length >= {before + 5}")
    texts = reader.locator("#feed li .text").all_inner_texts()[before:]
    assert texts == [f"line {n}" for n in range(5)]


def test_htmx_2_and_4_pages_read_the_same_feed(server: ExampleServer, open_page: OpenPage) -> None:
    for version in (HTMX2, HTMX4):
        if not all((VENDOR / package).is_dir() for package in version.packages):
            pytest.skip(f"htmx {version.version} is not installed: .ci/run installs it from npm")
    two = open_page(server.url(HTMX2.path))
    four = open_page(server.url(HTMX4.path))
    two.wait_for_function(HTMX2.connected)
    four.wait_for_function(HTMX4.connected)
    four.fill("input[name=text]", "from htmx 4")
    four.click("form button")
    two.fill("input[name=text]", "from htmx 2")
    expect(two.locator("#feed li .text").last).to_have_text("from htmx 4")
    two.click("form button")
    for page in (two, four):
        expect(page.locator("#feed li .text").last).to_have_text("from htmx 2")
        assert page.locator("#feed li .text").all_inner_texts()[-2:] == [
            "from htmx 4",
            "from htmx 2",
        ]


def test_htmx_after_a_server_restart_replays_missed_fragments_once(
    tmp_path: Path, make_server: Callable[..., ExampleServer], open_page: OpenPage, htmx: Htmx
) -> None:
    # The replay history must outlive the server process: a SQLite history file.
    server = make_server(HISTORY_URL=f"sqlite+aiosqlite:///{tmp_path / 'history.db'}")
    server.start()
    page = open_page("about:blank")
    streams: list[Request] = []
    page.on("request", lambda r: streams.append(r) if r.url.endswith("/htmx/events") else None)
    page.goto(server.url(htmx.path))
    page.wait_for_function(htmx.connected)
    page.fill("input[name=text]", "before")
    page.click("form button")
    feed = page.locator("#feed li .text")
    expect(feed).to_have_text(["before"])

    server.kill()
    missed = ["missed one", "missed two"]
    server.run_python(POST_OFFLINE, *missed)
    server.start()
    # htmx 2: the browser's EventSource reconnects and sends Last-Event-ID itself.
    # htmx 4: its fetch() loop reconnects with backoff and sends the id it kept.
    expect(feed).to_have_text(["before", *missed], timeout=20_000)
    page.wait_for_function(htmx.connected)
    page.fill("input[name=text]", "after")
    page.click("form button")
    expect(feed).to_have_text(["before", *missed, "after"])
    page.wait_for_timeout(1000)  # nothing arrives twice, late
    assert feed.all_inner_texts() == ["before", *missed, "after"]
    answered = [request for request in streams[1:] if request.response() is not None]
    assert answered
    assert all(request.all_headers().get("last-event-id") for request in answered)


def test_htmx_page_says_what_to_run_until_htmx_is_installed(
    make_server: MakeServer, open_page: OpenPage, tmp_path: Path, htmx: Htmx
) -> None:
    """Right after the README's run command there is no node_modules: the page says so."""
    node_modules = tmp_path / "npm" / "node_modules"
    server = make_server(NODE_MODULES=str(node_modules))
    server.start()
    failed: list[str] = []
    page = open_page(server.url(htmx.path))
    page.on("console", lambda message: message.type == "error" and failed.append(message.text))
    page.on("response", lambda response: response.status >= 400 and failed.append(response.url))
    page.reload()
    notice = page.locator("#htmx-missing")
    assert htmx.missing in notice.inner_text()
    command = notice.locator("pre").inner_text()
    assert f"cd {node_modules.parent} && npm install" in command
    # Every package in one command: `npm install --no-save` removes those it is not given.
    assert command.endswith("htmx.org@2 htmx-ext-sse@2 htmx4@npm:htmx.org@4")
    # Nothing can be typed, so nothing typed is lost.
    assert page.locator("input[name=text]").is_disabled()
    assert page.locator("form button").is_disabled()
    assert failed == []
    assert "Traceback" not in server.output()
    # The command the page gives, run while the server keeps running, then a reload.
    shutil.copytree(VENDOR, node_modules)
    page.reload()
    page.wait_for_function(htmx.connected)
    assert page.locator("#htmx-missing").count() == 0
    page.fill("input[name=text]", "after npm install")
    page.click("form button")
    page.locator("#feed li.feed-item .text", has_text="after npm install").wait_for()
    assert failed == []
