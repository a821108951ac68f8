"""`sseviews.js` in headless Chromium against a real uvicorn: token expiry and refresh,
a refused token, `max_lifetime`, a server restart, and a reset.

The app is `client_app.py`; every check reads what the page's callbacks recorded.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page
from support.processes import clean_env, free_port, stop_process, wait_until_serving

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
OpenPage = Callable[[str], Page]


class ClientAppServer:
    """`uvicorn client_app:app` in a subprocess; restartable on the same port."""

    def __init__(self, folder: Path, **env: str) -> None:
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.env = clean_env(**env)
        self.log = folder / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "uvicorn", "client_app:app", "--app-dir", str(HERE)]
        command += ["--host", HOST, "--port", str(self.port), "--log-level", "warning"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=log)
        wait_until_serving(self.process, self.base + "/stats", self.output)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_process(self.process)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def publish(self, first: int, last: int) -> None:
        request = urllib.request.Request(
            f"{self.base}/publish?from={first}&to={last}", method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200

    def publish_offline(self, first: int, last: int) -> None:
        """Publish into the history while the server is down (SQLite history only)."""
        subprocess.run(
            [sys.executable, str(HERE / "client_app.py"), "publish", str(first), str(last)],
            env=self.env,
            check=True,
            timeout=60,
        )

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.base + "/stats", timeout=5) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ClientAppServer]]:
    made: list[ClientAppServer] = []

    def make(**env: str) -> ClientAppServer:
        server = ClientAppServer(tmp_path, **env)
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.stop()


def wait_received(page: Page, count: int, timeout: float = 15_000) -> list[int]:
    page.wait_for_function(f"window.received.length >= {count}", timeout=timeout)
    received: list[int] = page.evaluate("window.received")
    return received


def test_client_js_keeps_streaming_across_token_expiries(
    make_server: Callable[..., ClientAppServer], open_page: OpenPage
) -> None:
    # A 1 s token lives 1 to 2 s (its expiry is rounded up to whole seconds).
    server = make_server(TOKEN_TTL="1")
    page = open_page(server.base + "/")
    page.wait_for_function("window.opens >= 1")
    # Publish steadily for longer than two token lifetimes.
    total = 0
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        server.publish(total, total + 2)
        total += 2
        time.sleep(0.1)
    received = wait_received(page, total)
    assert received == list(range(total))  # nothing lost, nothing twice, in order
    stats = server.stats()
    assert stats["reasons"].get("expired", 0) >= 2, stats
    assert stats["issued"] >= 3, stats
    assert page.evaluate("window.resets") == []


def test_client_js_refused_token_is_refreshed_after_401(
    make_server: Callable[..., ClientAppServer], open_page: OpenPage
) -> None:
    server = make_server()
    page = open_page(server.base + "/?token=not-a-valid-token")
    page.wait_for_function("window.opens >= 1")
    server.publish(0, 3)
    assert wait_received(page, 3) == [0, 1, 2]
    assert server.stats()["issued"] == 1  # fetched because the given token was refused


def test_client_js_max_lifetime_rotates_streams_with_nothing_lost(
    make_server: Callable[..., ClientAppServer], open_page: OpenPage
) -> None:
    server = make_server(MAX_LIFETIME="1")
    page = open_page(server.base + "/")
    page.wait_for_function("window.opens >= 1")
    total = 0
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        server.publish(total, total + 2)
        total += 2
        time.sleep(0.1)
    assert wait_received(page, total) == list(range(total))
    assert server.stats()["reasons"].get("lifetime", 0) >= 2
    assert page.evaluate("window.opens") >= 3


def test_client_js_server_restart_loses_nothing(
    make_server: Callable[..., ClientAppServer], open_page: OpenPage, tmp_path: Path
) -> None:
    server = make_server(HISTORY_URL=f"sqlite+aiosqlite:///{tmp_path / 'history.db'}")
    page = open_page(server.base + "/")
    page.wait_for_function("window.opens >= 1")
    server.publish(0, 3)
    assert wait_received(page, 3) == [0, 1, 2]
    server.kill()
    server.publish_offline(3, 6)  # missed while the server is down
    server.start()
    server.publish(6, 8)
    assert wait_received(page, 8) == list(range(8))
    assert page.evaluate("window.resets") == []


def test_client_js_reset_calls_onreset(
    make_server: Callable[..., ClientAppServer], open_page: OpenPage
) -> None:
    server = make_server()  # history in memory: a restart starts a new epoch
    page = open_page(server.base + "/")
    page.wait_for_function("window.opens >= 1")
    server.publish(0, 2)
    assert wait_received(page, 2) == [0, 1]
    server.kill()
    server.start()
    page.wait_for_function("window.resets.length >= 1", timeout=15_000)
    assert page.evaluate("window.resets") == ["unknown_epoch"]
    server.publish(2, 3)
    assert wait_received(page, 3) == [0, 1, 2]


def test_client_js_backs_off_with_jitter_after_sseviews_error(
    make_server: Callable[..., ClientAppServer], open_page: OpenPage
) -> None:
    # /failing raises in events() on its first 4 streams, each sending sseviews.error
    # with `retry:` of 30-90 s; sseviews.js reconnects itself after 0.5x to 1.5x of
    # 200, 400, 800, 1600 ms, then streams.
    server = make_server(FAILURES="4")
    page = open_page(server.base + "/failing-page")
    page.wait_for_function("window.oks >= 1", timeout=20_000)
    assert page.evaluate("window.errors") == 4
    with urllib.request.urlopen(server.base + "/failing-stats", timeout=5) as response:
        connects = json.loads(response.read())["connects"]
    assert len(connects) == 5
    gaps = [later - earlier for earlier, later in itertools.pairwise(connects)]
    for count, gap in enumerate(gaps):
        delay = min(1.6, 0.2 * 2**count)
        # At least half the doubled delay; far below the browser's own retry (30 s+).
        assert 0.5 * delay - 0.05 <= gap <= 1.5 * delay + 1.0, (count, gaps)
    assert gaps[3] > gaps[0]
