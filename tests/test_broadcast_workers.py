"""The multi-worker warning of the in-process broadcast."""

from __future__ import annotations

import logging

import pytest

from sseviews import Broadcast

pytestmark = pytest.mark.anyio


async def test_memory_broadcast_warns_under_several_workers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    with caplog.at_level(logging.WARNING, logger="sseviews"):
        async with Broadcast("memory://"):
            pass
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "4 worker processes" in warnings[0].getMessage()
    assert "redis://" in warnings[0].getMessage()


async def test_memory_broadcast_quiet_with_one_worker(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "1")
    with caplog.at_level(logging.WARNING, logger="sseviews"):
        async with Broadcast("memory://"):
            pass
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
