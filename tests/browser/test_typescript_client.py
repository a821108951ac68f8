"""`sseviews typescript`'s module compiled by `tsc` and used by a page in headless
Chromium, against a real uvicorn serving typed streams (`typed_app.py`).

The page (`typed_page.ts`) is compiled together with the generated module under
`--strict`, so it compiles only if every handler's data has its declared type;
in the browser, each handler then uses its data as that type.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page
from support.processes import clean_env, free_port, stop_process, wait_until_serving
from support.typescript import tsc

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# The server fixture's type (tests/browser/conftest.py); Any keeps this module standalone.
ExampleServer = Any
HOST = "127.0.0.1"
CLI = "import sys; from sseviews._cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture
def compiled(tmp_path: Path) -> Path:
    """The generated module and the page, compiled to JavaScript: their folder."""
    source = tmp_path / "src"
    source.mkdir()
    generated = subprocess.run(
        [sys.executable, "-c", CLI, "typescript", "typed_app:app"],
        cwd=HERE,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert generated.returncode == 0, generated.stderr
    (source / "streams.ts").write_text(generated.stdout)
    shutil.copy(HERE / "typed_page.ts", source / "typed_page.ts")
    out = tmp_path / "js"
    result = tsc(source, "--outDir", str(out), "streams.ts", "typed_page.ts")
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture
def typed_server(compiled: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "uvicorn", "typed_app:app", "--app-dir", str(HERE)]
    command += ["--host", HOST, "--port", str(port), "--log-level", "warning"]
    with log.open("ab") as output:
        process = subprocess.Popen(
            command, env=clean_env(TS_DIR=str(compiled)), stdout=output, stderr=output
        )
    base = f"http://{HOST}:{port}"
    try:
        wait_until_serving(process, base + "/", lambda: log.read_text(errors="replace"))
        yield base
    finally:
        stop_process(process)


def test_typescript_client_compiles_and_receives_typed_events(
    typed_server: str, open_page: Callable[[str], Page]
) -> None:
    page = open_page(typed_server + "/")
    page.wait_for_function("window.seen && window.seen.length >= 6", timeout=15_000)
    seen = page.evaluate("window.seen")
    assert seen == [
        # "42" parses as JSON, but the view declared text: the handler gets the string.
        {"name": "message", "value": "0042", "type": "string"},
        {"name": "tick", "value": "lobby:2", "type": "string"},
        {"name": "note", "value": "HELLO", "type": "string"},
        {"name": "presence", "value": "ann", "type": "string"},
        {"name": "state", "value": "is open", "type": "string"},
        {"name": "count", "value": 14, "type": "number"},
    ]
    assert page.locator("#log li").count() == 6


def test_typescript_client_receives_the_example_dashboard_metrics(
    server: ExampleServer, open_page: Callable[[str], Page], tmp_path: Path
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    generated = subprocess.run(
        [sys.executable, "-c", CLI, "typescript", "example_project:app"],
        cwd=REPO / "example_project",
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert generated.returncode == 0, generated.stderr
    (source / "streams.ts").write_text(generated.stdout)
    shutil.copy(HERE / "typed_dashboard.ts", source / "typed_dashboard.ts")
    out = tmp_path / "js"
    result = tsc(source, "--outDir", str(out), "streams.ts", "typed_dashboard.ts")
    assert result.returncode == 0, result.stdout + result.stderr

    page = open_page(server.url("/dashboard"))
    # The example serves neither sseviews.js nor the compiled module: the test does.
    page.route(
        "**/typed/*.js",
        lambda route: route.fulfill(
            path=str(out / route.request.url.rsplit("/", 1)[1]), content_type="text/javascript"
        ),
    )
    page.add_script_tag(path=str(REPO / "sseviews" / "static" / "sseviews.js"))
    page.add_script_tag(url=server.url("/typed/typed_dashboard.js"), type="module")
    page.wait_for_function("window.samples && window.samples.length >= 2", timeout=15_000)
    samples = page.evaluate("window.samples")
    for sample in samples:
        assert sample["pid"] > 0
        assert sample["rss"] > 0
        assert float(sample["cpu"]) >= 0
        assert sample["streams"] >= 0
