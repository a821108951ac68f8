"""The warnings of an in-process broadcast that is not alone: several workers, or a
SQLite history shared with another process."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from support.redis import REDIS_URL

from sseviews import Broadcast
from sseviews.stores.sqlalchemy import SQLAlchemyStore

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


def sqlite_history(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/history.db"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_memory_broadcasts_sharing_a_sqlite_history_warn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Two broadcasts on one file, as two processes would be: the second one warns.
    monkeypatch.setenv("WEB_CONCURRENCY", "1")
    with caplog.at_level(logging.WARNING, logger="sseviews"):
        async with Broadcast("memory://", history=sqlite_history(tmp_path)):
            assert warnings_of(caplog) == []
            async with Broadcast("memory://", history=sqlite_history(tmp_path)):
                (warning,) = warnings_of(caplog)
                assert "another process (or broadcast) uses too" in warning
                assert "history.db" in warning
                assert "never live" in warning
                assert "redis://" in warning
        caplog.clear()
        # Both gone: the claim went with them.
        async with Broadcast("memory://", history=sqlite_history(tmp_path)):
            assert warnings_of(caplog) == []


async def test_memory_broadcasts_sharing_a_file_under_other_prefixes_stay_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "1")
    with caplog.at_level(logging.WARNING, logger="sseviews"):
        async with (
            Broadcast("memory://", history=sqlite_history(tmp_path), prefix="one"),
            Broadcast("memory://", history=sqlite_history(tmp_path), prefix="two"),
        ):
            pass
    assert warnings_of(caplog) == []


async def test_redis_broadcasts_sharing_a_sqlite_history_stay_quiet(
    tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    def broadcast() -> Broadcast:
        history = SQLAlchemyStore(sqlite_history(tmp_path))
        return Broadcast(REDIS_URL, history=history, prefix=prefix)

    with caplog.at_level(logging.WARNING, logger="sseviews"):
        async with broadcast(), broadcast():
            pass
    assert warnings_of(caplog) == []
