"""The chat room's member list (presence) in headless Chromium, against a real uvicorn.

Run `pytest -m "" tests/browser`; screenshots land in `test-artifacts/`.
"""

from __future__ import annotations

import json
import time
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
# the stream leaves the room's presence and a `sseviews.leave` reaches the others
# (tens of ms measured; see docs/presence.md).
LEAVE_BOUND_MS = 1_000
# Reloads in a row that must each meet the bound: some reloads (1 to 4 of 50 measured)
# used to leave a stream of the unloading page listed for 5 s; one reload missed it.
RELOADS = 20


def members(page: Page) -> list[str]:
    return page.locator("#members .member").all_inner_texts()


def listed(server: ExampleServer, room: str) -> list[tuple[str, str]]:
    """The room's presence as the server lists it: (connection id, name), oldest first."""
    with urllib.request.urlopen(server.url(f"/rooms/{room}/members"), timeout=10) as response:
        return [(entry["id"], entry["info"]["name"]) for entry in json.load(response)]


def wait_until_listed_alone(server: ExampleServer, room: str, name: str) -> str:
    """Wait at most LEAVE_BOUND_MS until the room lists exactly one entry, `name`; its id."""
    deadline = time.monotonic() + LEAVE_BOUND_MS / 1000
    while True:
        entries = listed(server, room)
        if len(entries) == 1 and entries[0][1] == name:
            return entries[0][0]
        assert time.monotonic() < deadline, f"{room} still lists {entries}"
        time.sleep(0.02)


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
        expect(page.locator("#members .member")).to_have_text(
            ["alice", "bob"], timeout=LEAVE_BOUND_MS
        )

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
    # Each reload: once the new page is live the old one is gone, and within the
    # bound the room lists the new page's stream alone, the server and the page alike.
    # (The unloading page's EventSource fails CLOSED; the page must not open another
    # stream then to ask why, or that stream stays listed while Chromium drains it.)
    previous = wait_until_listed_alone(server, "nameless", "anonymous")
    for _ in range(RELOADS):
        page.reload()
        expect(page.locator("#status")).to_have_text("live")
        current = wait_until_listed_alone(server, "nameless", "carol")
        assert current != previous
        expect(page.locator("#members .member")).to_have_text(["carol"], timeout=LEAVE_BOUND_MS)
        assert page.locator("#members .member").get_attribute("data-id") == current
        previous = current
    # Nothing the last unloaded page left behind joins late.
    page.wait_for_timeout(LEAVE_BOUND_MS)
    assert listed(server, "nameless") == [(previous, "carol")]


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
