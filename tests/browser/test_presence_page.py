"""The chat room's member list (presence) in headless Chromium, against a real uvicorn.

Run `pytest tests/browser`; screenshots land in `test-artifacts/`.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

pytestmark = pytest.mark.slow

OpenPage = Callable[[str], Page]
# The server fixture's type (tests/browser/conftest.py); Any keeps this module standalone.
ExampleServer = Any

# How long a closed page may stay listed: the server sees the closed connection,
# the stream leaves the room's presence and a `sseviews.leave` reaches the others.
LEAVE_BOUND_MS = 5_000


def members(page: Page) -> list[str]:
    return page.locator("#members .member").all_inner_texts()


def test_chat_room_lists_who_is_in_it_and_who_leaves(
    server: ExampleServer, open_page: OpenPage, screenshot: Callable[[Page, str], Path]
) -> None:
    alice = open_page(server.url("/rooms/presence?name=alice"))
    expect(alice.locator("#status")).to_have_text("live")
    expect(alice.locator("#members .member")).to_have_text(["alice"])
    expect(alice.locator("#member-count")).to_have_text("1")

    # Bob loads the list (alice in it); alice gets bob's join event. Oldest first.
    bob = open_page(server.url("/rooms/presence?name=bob"))
    expect(bob.locator("#status")).to_have_text("live")
    for page in (alice, bob):
        expect(page.locator("#members .member")).to_have_text(["alice", "bob"])
        expect(page.locator("#member-count")).to_have_text("2")
    screenshot(alice, "both")

    # Two tabs of one user are two entries (keyed by connection id, not by name).
    alice_again = alice.context.new_page()
    alice_again.goto(server.url("/rooms/presence?name=alice"))
    for page in (alice, bob, alice_again):
        expect(page.locator("#members .member")).to_have_text(["alice", "bob", "alice"])
    ids = bob.locator("#members .member").evaluate_all("items => items.map(i => i.dataset.id)")
    assert len(set(ids)) == 3
    alice_again.close()
    for page in (alice, bob):
        expect(page.locator("#members .member")).to_have_text(["alice", "bob"])

    # Bob closes his page: alice sees him leave within the bound, without a reload.
    alice.evaluate("window.notReloaded = true")
    bob.close()
    expect(alice.locator("#members .member")).to_have_text(["alice"], timeout=LEAVE_BOUND_MS)
    expect(alice.locator("#member-count")).to_have_text("1")
    assert alice.evaluate("window.notReloaded") is True
    screenshot(alice, "bob-left")

    # The member list route agrees with the page.
    listed = alice.evaluate("fetch('/rooms/presence/members').then(r => r.json())")
    assert [entry["info"] for entry in listed] == [{"name": "alice"}]


def test_chat_room_without_a_name_lists_the_author_or_anonymous(
    server: ExampleServer, open_page: OpenPage
) -> None:
    page = open_page(server.url("/rooms/nameless"))
    expect(page.locator("#members .member")).to_have_text(["anonymous"])
    # The name typed for posting is remembered, and the next visit is listed under it.
    page.fill("#post input[name=author]", "carol")
    page.fill("#post input[name=text]", "hello")
    page.click("#post button")
    expect(page.locator("#messages li .author")).to_have_text(["carol"])
    page.reload()
    expect(page.locator("#members .member")).to_have_text(["carol"])


def test_chat_room_refuses_a_too_long_name_and_a_bad_room(server: ExampleServer) -> None:
    for path, status in [
        ("/rooms/lobby/events?name=" + "x" * 41, 422),
        ("/rooms/Lobby/members", 404),
    ]:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server.url(path), timeout=10)
        with refused.value as response:
            assert response.code == status
            assert "Traceback" not in response.read().decode()
