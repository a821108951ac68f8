"""Helpers for the tests that run servers in subprocesses: a free loopback port, the
environment to give them, waiting until they serve, and stopping them."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable

import pytest


def free_port() -> int:
    """A loopback port with nothing listening on it (at the time of the call)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without what the outer pytest (and pytest-cov) put in it."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTEST_", "COV_CORE_", "COVERAGE_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def wait_until_serving(
    process: subprocess.Popen[bytes], url: str, output: Callable[[], str], seconds: float = 20.0
) -> None:
    """Poll `url` until it answers 200; fail the test, with the server's `output()`, if
    `process` exits first or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited ({process.returncode}):\n{output()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # URLError and HTTPError included
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not answer in {seconds}s:\n{output()}")
        time.sleep(0.1)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Terminate `process`; kill it if it has not exited 10 s later."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
