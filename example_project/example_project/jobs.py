"""Long tasks that report their progress: each job publishes to its own group.

Each step updates the job's row and publishes its events in one transaction
(`publish(..., session=session)`): the broadcast that `create_app()` gives the
runner keeps its history in the app's own database.
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sseviews import Broadcast, Event

from .models import Job

logger = logging.getLogger("example_project")

# Seconds the job's last words (status and `done` event) may take when the server
# stops it; cleanup after a cancellation is shielded, so it needs its own bound.
CLEANUP_SECONDS = 2.0


def job_group(job_id: int) -> str:
    return f"job:{job_id}"


class JobRunner:
    """Starts jobs in the app's task group (opened in its lifespan)."""

    def __init__(
        self,
        task_group: anyio.abc.TaskGroup,
        sessions: async_sessionmaker[AsyncSession],
        broadcast: Broadcast,
        *,
        step_seconds: float,
    ) -> None:
        self.task_group = task_group
        self.sessions = sessions
        self.broadcast = broadcast
        self.step_seconds = step_seconds

    async def start(self, steps: int) -> Job:
        """Store a new job and start running it; return it at once."""
        async with self.sessions.begin() as session:
            job = Job(steps=steps)
            session.add(job)
        self.task_group.start_soon(self._run, job.id, steps, name=f"job {job.id}")
        return job

    async def _run(self, job_id: int, steps: int) -> None:
        group = job_group(job_id)
        publish = self.broadcast.publish
        try:
            for step in range(1, steps + 1):
                await anyio.sleep(self.step_seconds)  # the "work"
                # One short transaction per step (no connection is held while working):
                # the row and the step's events commit together, and are delivered
                # after the commit, so a watcher never sees a step the row lacks.
                async with self.sessions.begin() as session:
                    job = await session.get_one(Job, job_id)
                    job.step = step
                    if step == steps:
                        job.status = "done"
                        job.result = f"checked {steps} things, all fine"
                    await publish(group, Event(job.progress(), event="progress"), session=session)
                    if job.finished:
                        await publish(group, Event(job.outcome(), event="done"), session=session)
        except anyio.get_cancelled_exc_class():
            # The server is stopping: say so to whoever watches, then let go.
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_SECONDS):
                await self._interrupted(job_id)
            raise
        except Exception:
            logger.exception("job %s failed", job_id)
            with anyio.move_on_after(CLEANUP_SECONDS):
                await self._interrupted(job_id)

    async def _interrupted(self, job_id: int) -> None:
        try:
            async with self.sessions.begin() as session:
                job = await session.get_one(Job, job_id)
                if job.finished:
                    return  # its `done` was committed with its last step
                job.status = "interrupted"
                job.result = f"stopped at step {job.step} of {job.steps}"
                await self.broadcast.publish(
                    job_group(job_id), Event(job.outcome(), event="done"), session=session
                )
        except Exception:
            logger.exception("could not record that job %s was interrupted", job_id)
