"""The example project's htmx page in headless Chromium: htmx's SSE extension swaps in
HTML fragments that the server rendered once and published.

htmx and its SSE extension come from the npm registry (`.ci/run` installs them into
`example_project/node_modules/`); without them these tests are skipped.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page

pytestmark = pytest.mark.slow

ExampleServer = Any  # tests/browser/conftest.py: the example project under uvicorn
OpenPage = Callable[[str], Page]
MakeServer = Callable[..., ExampleServer]
VENDOR = Path(__file__).resolve().parents[2] / "example_project" / "node_modules"
CONNECTED = """() => {
  const element = document.querySelector("[sse-connect]");
  const data = element && element["htmx-internal-data"];
  return !!(data && data.sseEventSource && data.sseEventSource.readyState === 1);
}"""


@pytest.fixture(autouse=True)
def _needs_htmx() -> None:
    if not (VENDOR / "htmx.org").is_dir() or not (VENDOR / "htmx-ext-sse").is_dir():
        message = "htmx is not installed: .ci/run installs it from the npm registry"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: a skip there would hide a broken setup
        pytest.skip(message)


def test_htmx_fragment_posted_in_one_browser_appears_in_another(
    server: ExampleServer, open_page: OpenPage
) -> None:
    writer = open_page(server.url("/htmx"))
    reader = open_page(server.url("/htmx"))
    writer.wait_for_function(CONNECTED)
    reader.wait_for_function(CONNECTED)
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


def test_htmx_fragments_arrive_in_order(server: ExampleServer, open_page: OpenPage) -> None:
    reader = open_page(server.url("/htmx"))
    reader.wait_for_function(CONNECTED)
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


def test_htmx_page_says_what_to_run_until_htmx_is_installed(
    make_server: MakeServer, open_page: OpenPage, tmp_path: Path
) -> None:
    """Right after the README's run command there is no node_modules: the page says so."""
    node_modules = tmp_path / "npm" / "node_modules"
    server = make_server(NODE_MODULES=str(node_modules))
    server.start()
    failed: list[str] = []
    page = open_page(server.url("/htmx"))
    page.on("console", lambda message: message.type == "error" and failed.append(message.text))
    page.on("response", lambda response: response.status >= 400 and failed.append(response.url))
    page.reload()
    notice = page.locator("#htmx-missing")
    assert "htmx is not installed yet" in notice.inner_text()
    assert f"cd {node_modules.parent} && npm install" in notice.locator("pre").inner_text()
    # Nothing can be typed, so nothing typed is lost.
    assert page.locator("input[name=text]").is_disabled()
    assert page.locator("form button").is_disabled()
    assert failed == []
    assert "Traceback" not in server.output()
    # The command the page gives, run while the server keeps running, then a reload.
    shutil.copytree(VENDOR, node_modules)
    page.reload()
    page.wait_for_function(CONNECTED)
    assert page.locator("#htmx-missing").count() == 0
    page.fill("input[name=text]", "after npm install")
    page.click("form button")
    page.locator("#feed li.feed-item .text", has_text="after npm install").wait_for()
    assert failed == []
