"""The database tables: chat messages and jobs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat(moment: datetime) -> str:
    # SQLite hands datetimes back without their zone; they were stored in UTC.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat()


class Base(DeclarativeBase):
    pass


class Message(Base):
    """One chat message, and the id of the event that announced it."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    room: Mapped[str] = mapped_column(String(40), index=True)
    author: Mapped[str] = mapped_column(String(40))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The broadcast's id for this message: a page rendered with the room's latest
    # messages resumes its stream right after the last one it shows.
    event_id: Mapped[str | None] = mapped_column(String(40), default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "room": self.room,
            "author": self.author,
            "text": self.text,
            "created_at": isoformat(self.created_at),
        }


class Job(Base):
    """A long task: how far it got, and how it ended."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # "running", then "done" or "interrupted" (the server stopped during the job).
    status: Mapped[str] = mapped_column(String(20), default="running")
    step: Mapped[int] = mapped_column(Integer, default=0)
    steps: Mapped[int] = mapped_column(Integer)
    result: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    @property
    def finished(self) -> bool:
        return self.status != "running"

    def progress(self) -> dict[str, Any]:
        """The data of a `progress` event."""
        return {
            "job": self.id,
            "step": self.step,
            "steps": self.steps,
            "percent": round(100 * self.step / self.steps),
        }

    def outcome(self) -> dict[str, Any]:
        """The data of the final `done` event."""
        return {"job": self.id, "status": self.status, "result": self.result}
