"""sseviews' log lines when the app configured no logging: with their level, once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import logging, sys

    mode = sys.argv[1]
    if mode == "basic_config":
        logging.basicConfig(format="%(levelname)s|%(name)s|%(message)s")
    elif mode == "own_handler":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("OWN %(levelname)s %(message)s"))
        logging.getLogger("sseviews").addHandler(handler)

    import anyio
    from sseviews import EventStreamView
    from sseviews.testing import EventStreamClient

    class Boom(EventStreamView):
        async def events(self):
            yield "x"
            raise LookupError("the database is gone")

    async def main():
        async with EventStreamClient(Boom) as client, client.stream("/") as stream:
            await stream.wait_ended()

    anyio.run(main)
    logging.getLogger("sseviews").info("an info line")
    logging.getLogger("sseviews").warning("a warning line")
    """
)
EVENTS_RAISED = "Boom / (testclient:50000): events() raised; ending the stream"


def run(mode: str) -> str:
    """Run the script in a fresh interpreter; its stderr."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
        check=True,
    )
    return done.stderr


def test_logging_unconfigured_lines_show_level_and_logger() -> None:
    stderr = run("unconfigured")
    assert stderr.count(EVENTS_RAISED) == 1
    assert f"ERROR:sseviews:{EVENTS_RAISED}" in stderr
    assert "LookupError: the database is gone" in stderr  # the traceback, in the log only
    assert "WARNING:sseviews:a warning line" in stderr
    assert "an info line" not in stderr  # WARNING and above, as Python's last resort


@pytest.mark.parametrize(
    ("mode", "line"),
    [
        ("basic_config", f"ERROR|sseviews|{EVENTS_RAISED}"),
        ("own_handler", f"OWN ERROR {EVENTS_RAISED}"),
    ],
)
def test_logging_configured_lines_are_printed_once_by_the_app(mode: str, line: str) -> None:
    stderr = run(mode)
    assert stderr.count(EVENTS_RAISED) == 1
    assert line in stderr
    assert "ERROR:sseviews:" not in stderr
    assert stderr.count("a warning line") == 1
