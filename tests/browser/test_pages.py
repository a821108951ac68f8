"""The example project's pages in headless Chromium, against a real uvicorn.

Run `pytest -m "" tests/browser`; screenshots land in `test-artifacts/`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, Request, expect

pytestmark = pytest.mark.slow

OpenPage = Callable[[str], Page]
# The server fixtures' type (tests/browser/conftest.py); Any keeps this module standalone.
ExampleServer = Any

# Posts messages through the app itself, in-process, in another OS process: with a
# SQL history this is "someone else posted while the server was down".
POST_OFFLINE = """
import sys
import anyio
from sseviews.testing import EventStreamClient
from example_project import create_app

async def main(room, texts):
    async with EventStreamClient(create_app()) as client:
        for text in texts:
            response = await client.post(
                f"/rooms/{room}/messages", json={"author": "offline", "text": text}
            )
            assert response.status_code == 201, response.text
            print(response.json()["event_id"])

anyio.run(main, sys.argv[1], sys.argv[2:])
"""


def texts(page: Page) -> list[str]:
    return page.locator("#messages li .text").all_inner_texts()


def send(page: Page, text: str, author: str = "") -> None:
    if author:
        page.fill("#post input[name=author]", author)
    page.fill("#post input[name=text]", text)
    page.click("#post button")
    expect(page.locator("#post input[name=text]")).to_have_value("")  # posted


def test_chat_message_posted_in_one_browser_appears_in_another(
    server: ExampleServer, open_page: OpenPage
) -> None:
    alice = open_page(server.url("/rooms/lobby"))
    bob = open_page(server.url("/rooms/lobby"))
    for page in (alice, bob):
        expect(page.locator("#status")).to_have_text("live")

    send(alice, "hello from alice", author="alice")
    expect(bob.locator("#messages li .text")).to_have_text(["hello from alice"])
    expect(bob.locator("#messages li .author")).to_have_text(["alice"])
    send(bob, "hi alice", author="bob")
    for page in (alice, bob):
        # Each page shows each message once: the sender's too comes from the stream.
        expect(page.locator("#messages li .text")).to_have_text(["hello from alice", "hi alice"])

    # A third browser opening the room later sees both, rendered by the server.
    carol = open_page(server.url("/rooms/lobby"))
    expect(carol.locator("#status")).to_have_text("live")
    assert texts(carol) == ["hello from alice", "hi alice"]


def test_chat_after_a_server_restart_shows_each_missed_message_once(
    tmp_path: Path, make_server: Callable[..., ExampleServer], open_page: OpenPage
) -> None:
    # The replay history must outlive the server process: a SQLite history file.
    server = make_server(HISTORY_URL=f"sqlite+aiosqlite:///{tmp_path / 'history.db'}")
    server.start()
    page = open_page("about:blank")
    streams: list[Request] = []
    page.on(
        "request",
        lambda request: streams.append(request) if request.resource_type == "eventsource" else None,
    )
    page.goto(server.url("/rooms/restart"))
    expect(page.locator("#status")).to_have_text("live")
    with page.expect_response(lambda response: response.request.method == "POST") as posted:
        send(page, "before the restart", author="ada")
    before_id = posted.value.json()["event_id"]
    expect(page.locator("#messages li .text")).to_have_text(["before the restart"])
    page.evaluate("window.notReloaded = true")

    server.kill()
    expect(page.locator("#status")).to_have_text("reconnecting…")
    missed = ["missed one", "missed two", "missed three"]
    ids = server.run_python(POST_OFFLINE, "restart", *missed).split()
    assert len(ids) == 3
    page.wait_for_timeout(1200)  # the page keeps retrying against the dead port
    assert texts(page) == ["before the restart"]

    server.start()
    expected = ["before the restart", *missed]
    expect(page.locator("#messages li .text")).to_have_text(expected, timeout=15_000)
    expect(page.locator("#status")).to_have_text("live")

    send(page, "after the restart")
    expected.append("after the restart")
    expect(page.locator("#messages li .text")).to_have_text(expected)
    page.wait_for_timeout(1000)  # nothing arrives twice, late
    assert texts(page) == expected
    assert server.output().count("Application startup complete") == 2
    # The same page (never reloaded) resumed its EventSource from the last id it saw.
    assert page.evaluate("window.notReloaded") is True
    # (all_headers(): Chromium adds Last-Event-ID below what `headers` shows. The
    # attempts while the server was down never got that far.)
    first, *retries = streams
    assert first.all_headers().get("last-event-id") is None
    answered = [request for request in retries if request.response() is not None]
    assert answered
    assert {request.all_headers().get("last-event-id") for request in answered} == {before_id}


def test_private_room_shows_the_refusal_and_stops_retrying(
    server: ExampleServer,
    open_page: OpenPage,
    private_token: str,
    screenshot: Callable[[Page, str], Path],
) -> None:
    page = open_page("about:blank")
    streams: list[Request] = []
    page.on(
        "request",
        lambda request: streams.append(request) if request.resource_type == "eventsource" else None,
    )
    page.goto(server.url("/private"))
    status = page.locator("#status")
    expect(status).to_have_text("refused: 401 the private room needs a token")
    assert page.evaluate("window.chatStream.readyState") == 2  # EventSource.CLOSED
    page.wait_for_timeout(1500)  # three retry periods: the browser did not retry
    assert len(streams) == 1
    screenshot(page, "401")

    page.fill("#token input[name=token]", "wrong")
    page.click("#token button")
    expect(status).to_have_text("refused: 403 this token does not open the private room")
    assert page.evaluate("window.chatStream.readyState") == 2
    screenshot(page, "403")

    page.fill("#token input[name=token]", private_token)
    page.click("#token button")
    expect(status).to_have_text("live")
    send(page, "inside the private room")
    expect(page.locator("#messages li .text")).to_have_text(["inside the private room"])
    screenshot(page, "allowed")

    # Forgetting the token: refused again, and the messages are not on the page.
    page.click("#token button:has-text('Forget the token')")
    expect(status).to_have_text("refused: 401 the private room needs a token")
    assert texts(page) == []


def test_job_progress_page_ends_with_done(server: ExampleServer, open_page: OpenPage) -> None:
    page = open_page(server.url("/jobs"))
    page.evaluate(
        """() => {
            window.seen = [];
            const Original = window.EventSource;
            window.EventSource = class extends Original {
                constructor(...args) {
                    super(...args);
                    for (const name of ["progress", "done"]) {
                        this.addEventListener(name, (e) => window.seen.push([name, e.data]));
                    }
                }
            };
        }"""
    )
    page.fill("#start input[name=steps]", "5")
    page.click("#start button")
    expect(page.locator("#status")).to_have_text("done", timeout=15_000)
    expect(page.locator("#percent")).to_have_text("100")
    expect(page.locator("#step")).to_have_text("5")
    expect(page.locator("#result")).to_have_text("checked 5 things, all fine")
    assert page.evaluate("window.jobStream.readyState") == 2  # closed after `done`
    seen = page.evaluate("window.seen")
    assert [name for name, _ in seen][-1] == "done"
    assert {name for name, _ in seen[:-1]} == {"progress"}
    assert len(seen) >= 6  # the state when it opened, then one per step, then done
    assert re.search(r"/jobs\?job=\d+$", page.url)


def test_dashboard_tile_updates_live(server: ExampleServer, open_page: OpenPage) -> None:
    page = open_page(server.url("/dashboard"))
    expect(page.locator("#status")).to_have_text("live")
    expect(page.locator("#samples")).to_have_text(re.compile(r"^([2-9]|\d{2,})$"), timeout=5_000)
    expect(page.locator('[data-metric="rss"]')).to_have_text(re.compile(r"^\d+\.\d MiB$"))
    expect(page.locator('[data-metric="cpu"]')).to_have_text(re.compile(r"^\d+\.\d %$"))
    pid = page.locator('[data-metric="pid"]').inner_text()
    assert pid.isdigit()


# The width each input's placeholder needs, against the width it has (its content box).
PLACEHOLDER_FIT = """() => {
  const canvas = document.createElement("canvas").getContext("2d");
  return [...document.querySelectorAll("input[placeholder]")].map((input) => {
    const style = getComputedStyle(input);
    canvas.font = style.font;
    const padding = parseFloat(style.paddingLeft) + parseFloat(style.paddingRight);
    return {
      name: input.name,
      needs: canvas.measureText(input.placeholder).width,
      has: input.clientWidth - padding,
    };
  });
}"""


@pytest.mark.parametrize("width", [900, 400])
@pytest.mark.parametrize("path", ["/", "/rooms/lobby", "/private", "/htmx", "/htmx4"])
def test_pages_show_whole_placeholders_and_never_overflow(
    server: ExampleServer, open_page: OpenPage, path: str, width: int
) -> None:
    page = open_page(server.url(path))
    page.set_viewport_size({"width": width, "height": 700})
    fits = page.evaluate(PLACEHOLDER_FIT)
    assert fits, f"{path}: no input with a placeholder"
    for fit in fits:
        assert fit["needs"] <= fit["has"], f"{path} at {width}px: {fit['name']} is clipped: {fit}"
    # Nothing wider than the window: no sideways scrolling on a phone.
    assert page.evaluate("document.documentElement.scrollWidth") <= width
