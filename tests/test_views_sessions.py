"""Database sessions (`session_factory`): created on first use, in the stream's task,
closed at its end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from support.views import Trace, end_as

from sseviews import DisconnectReason, EventStreamView
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio


# -- database sessions ----------------------------------------------------------------


class TrackedSession(AsyncSession):
    """An AsyncSession that records where it was created and closed in `info["trace"]`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.info["trace"].step("session created")

    async def close(self) -> None:
        self.info["trace"].step("session closed")
        await super().close()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'sse.db'}")
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"))
    yield engine
    await engine.dispose()


async def notes(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as connection:
        rows = await connection.execute(text("SELECT body FROM notes ORDER BY id"))
        return [row[0] for row in rows]


def session_view(engine: AsyncEngine, trace: Trace, ending: str) -> Any:
    class Stored(EventStreamView):
        session_factory = async_sessionmaker(engine, class_=TrackedSession, info={"trace": trace})

        async def events(self) -> AsyncIterator[Any]:
            trace.step("events")
            session = self.session
            trace.sessions.append(session)
            await session.execute(text("INSERT INTO notes (body) VALUES ('from events')"))
            await session.commit()
            count = (await session.execute(text("SELECT count(*) FROM notes"))).scalar_one()
            yield {"count": count}
            await end_as(ending)

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.sessions.append(self.session)
            await self.session.execute(
                text("INSERT INTO notes (body) VALUES (:body)"), {"body": f"on {reason.value}"}
            )
            await self.session.commit()
            trace.disconnect(reason)

    return Stored


@pytest.mark.asyncio_only
@pytest.mark.parametrize("ending", ["client_closed", "error", "shutdown", "completed"])
async def test_view_session_created_used_and_closed_in_stream_task(
    engine: AsyncEngine, ending: str, caplog: pytest.LogCaptureFixture
) -> None:
    trace = Trace()
    async with EventStreamClient(session_view(engine, trace, ending)) as client:
        async with client.stream("/") as stream:
            assert (await stream.next_event(timeout=2)).json() == {"count": 1}
            if ending == "shutdown":
                await client.shutdown()
            await anyio.sleep(0.01)
        await trace.wait_disconnected()
    assert trace.reasons == [DisconnectReason(ending)]
    assert trace.steps == [
        "events",
        "session created",
        "on_disconnect",
        "session closed",
    ]
    first, second = trace.sessions
    assert first is second
    task = trace.tasks["events"]
    assert trace.tasks["session created"] == task
    assert trace.tasks["on_disconnect"] == task
    assert trace.tasks["session closed"] == task
    assert await notes(engine) == ["from events", f"on {ending}"]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.asyncio_only
async def test_view_session_holds_connection_until_closed(engine: AsyncEngine) -> None:
    trace = Trace()
    async with EventStreamClient(session_view(engine, trace, "client_closed")) as client:
        async with client.stream("/") as stream:
            await stream.next_event(timeout=2)
            # The SELECT after the commit began a transaction: the session holds a connection.
            assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        await trace.wait_disconnected()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.asyncio_only
async def test_view_session_not_created_when_unused(engine: AsyncEngine) -> None:
    trace = Trace()

    class Unused(EventStreamView):
        session_factory = async_sessionmaker(engine, class_=TrackedSession, info={"trace": trace})

        async def events(self) -> AsyncIterator[Any]:
            yield "x"

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.disconnect(reason)

    async with EventStreamClient(Unused) as client, client.stream("/") as stream:
        await stream.wait_ended()
    assert trace.steps == ["on_disconnect"]


@pytest.mark.asyncio_only
async def test_view_session_first_used_in_on_disconnect(engine: AsyncEngine) -> None:
    trace = Trace()

    class Late(EventStreamView):
        session_factory = async_sessionmaker(engine, class_=TrackedSession, info={"trace": trace})

        async def events(self) -> AsyncIterator[Any]:
            trace.step("events")
            yield "x"

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            await self.session.execute(text("INSERT INTO notes (body) VALUES ('late')"))
            await self.session.commit()
            trace.disconnect(reason)

    async with EventStreamClient(Late) as client, client.stream("/") as stream:
        await stream.wait_ended()
    assert trace.steps == ["events", "session created", "on_disconnect", "session closed"]
    assert trace.tasks["session created"] == trace.tasks["events"]
    assert trace.tasks["session closed"] == trace.tasks["events"]
    assert await notes(engine) == ["late"]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.asyncio_only
async def test_view_session_in_on_connect_raises_runtime_error(engine: AsyncEngine) -> None:
    errors: list[str] = []

    class Early(EventStreamView):
        session_factory = async_sessionmaker(engine)

        async def on_connect(self) -> None:
            try:
                self.session  # noqa: B018
            except RuntimeError as exc:
                errors.append(str(exc))

        async def events(self) -> AsyncIterator[Any]:
            yield "x"

    async with EventStreamClient(Early) as client, client.stream("/") as stream:
        assert (await stream.next_event(timeout=2)).data == "x"
    assert len(errors) == 1
    assert "on_connect" in errors[0]


@pytest.mark.asyncio_only
async def test_view_session_from_another_task_raises_runtime_error(engine: AsyncEngine) -> None:
    errors: list[str] = []

    class Spawner(EventStreamView):
        session_factory = async_sessionmaker(engine)

        async def events(self) -> AsyncIterator[Any]:
            mine = self.session

            def touch() -> None:
                try:
                    self.session  # noqa: B018
                except RuntimeError as exc:
                    errors.append(str(exc))

            async def in_child_task() -> None:
                touch()

            async with anyio.create_task_group() as tg:
                tg.start_soon(in_child_task)
            await asyncio.get_running_loop().create_task(in_child_task())
            assert self.session is mine
            yield "x"

    async with EventStreamClient(Spawner) as client, client.stream("/") as stream:
        assert (await stream.next_event(timeout=2)).data == "x"
    assert len(errors) == 2
    assert all("task" in error for error in errors)


async def test_view_session_without_factory_raises_runtime_error() -> None:
    errors: list[str] = []

    class NoFactory(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            try:
                self.session  # noqa: B018
            except RuntimeError as exc:
                errors.append(str(exc))
            yield "x"

    async with EventStreamClient(NoFactory) as client, client.stream("/") as stream:
        await stream.next_event(timeout=2)
    assert len(errors) == 1
    assert "session_factory" in errors[0]


@pytest.mark.asyncio_only
async def test_view_session_closed_when_events_fail_early(engine: AsyncEngine) -> None:
    trace = Trace()

    class Failing(EventStreamView):
        session_factory = async_sessionmaker(engine, class_=TrackedSession, info={"trace": trace})

        async def events(self) -> AsyncIterator[Any]:
            await self.session.execute(text("SELECT 1"))
            raise RuntimeError("before the first event")
            yield  # pragma: no cover

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            trace.disconnect(reason)

    async with EventStreamClient(Failing) as client, client.stream("/") as stream:
        await stream.wait_ended()
    assert trace.steps == ["session created", "on_disconnect", "session closed"]
    assert trace.reasons == [DisconnectReason.ERROR]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
