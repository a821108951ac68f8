"""Fixtures for the browser tests: the example project under a real uvicorn, and Chromium.

The browser is Debian's `chromium` package, driven by Playwright for Python; no
browser is ever downloaded. Each test saves a screenshot of its page(s) in
`test-artifacts/`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright
from support.processes import clean_env, free_port, stop_process, wait_until_serving

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HOST = "127.0.0.1"
TOKEN = "browser-token"
STARTUP_SECONDS = 20.0


class ExampleServer:
    """`python -m example_project` in a subprocess, on a fixed loopback port.

    `kill()` and `start()` again restart it on the same port with the same
    database (and history, when `HISTORY_URL` is set).
    """

    def __init__(self, folder: Path, **env: str) -> None:
        self.folder = folder
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.env = clean_env()
        pythonpath = [str(REPO / "example_project"), self.env.get("PYTHONPATH", "")]
        self.env.update(
            {
                "PYTHONPATH": os.pathsep.join(filter(None, pythonpath)),
                "DATABASE_URL": f"sqlite+aiosqlite:///{folder / 'example.db'}",
                "PRIVATE_TOKEN": TOKEN,
                "JOB_STEP_SECONDS": "0.2",
            }
        )
        self.env.update(env)
        self.log = folder / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, path: str) -> str:
        return self.base + path

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "example_project",
            "--host",
            HOST,
            "--port",
            str(self.port),
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.folder, env=self.env, stdout=log, stderr=log
            )
        wait_until_serving(self.process, self.url("/"), self.output, STARTUP_SECONDS)

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, the open streams just break."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        stop_process(process)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def run_python(self, code: str, *args: str) -> str:
        """Run `code` in another process with the server's settings; return its stdout."""
        result = subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExampleServer]:
    """One running server for a module's tests that do not restart it."""
    instance = ExampleServer(tmp_path_factory.mktemp("example"))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ExampleServer]]:
    """Make a server of this test's own (not started), with extra environment variables."""
    made: list[ExampleServer] = []

    def make(**env: str) -> ExampleServer:
        instance = ExampleServer(tmp_path, **env)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.stop()


@pytest.fixture
def private_token() -> str:
    return TOKEN


# Module scope, not session: sync Playwright keeps its own event loop current while it
# runs, and the async tests that come after the browser tests need theirs.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package (.ci/run does)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@pytest.fixture
def screenshot(request: pytest.FixtureRequest) -> Callable[[Page, str], Path]:
    """Save `page` now as `test-artifacts/<test>-<label>.png` (a step on the way)."""

    def save(page: Page, label: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{request.node.name}-{label}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return save


@pytest.fixture
def open_page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Callable[[str], Page]]:
    """Open a URL in a new browser context (its own cookies); screenshot every page at the end.

    The first page is saved as `test-artifacts/<test>.png`, the others as
    `<test>-2.png`, ...; on failure too, as evidence.
    """
    contexts: list[BrowserContext] = []
    pages: list[Page] = []

    def open_(url: str) -> Page:
        context = browser.new_context(viewport={"width": 900, "height": 700})
        context.set_default_timeout(10_000)
        contexts.append(context)
        page = context.new_page()
        page.goto(url)
        pages.append(page)
        return page

    yield open_
    ARTIFACTS.mkdir(exist_ok=True)
    for number, page in enumerate(pages, start=1):
        suffix = "" if number == 1 else f"-{number}"
        try:
            page.screenshot(
                path=str(ARTIFACTS / f"{request.node.name}{suffix}.png"), full_page=True
            )
        except Exception as exc:  # a crashed page must not hide the test's own failure
            print(f"no screenshot of page {number}: {exc}")
    for context in contexts:
        context.close()
