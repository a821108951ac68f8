"""The payload of every event the example's streams send, declared as `event_types`.

Each stream view maps its event names to these types. sseviews then checks what
the view sends (a test fails on a mismatch; in production a bad event is dropped
and logged), and `sseviews asyncapi example_project.app:app` describes each
stream's events with their JSON Schemas.

They are `TypedDict`s, not pydantic models, so the example needs nothing beyond
its own dependencies: the payloads are the plain dicts the app already builds.
"""

from __future__ import annotations

from typing import Literal, TypedDict


class ChatMessage(TypedDict):
    """A message posted to a room: the data of a room stream's unnamed events."""

    id: int
    room: str
    author: str
    text: str
    #: When it was posted, ISO 8601 in UTC.
    created_at: str


class MemberInfo(TypedDict):
    """What a room stream lists about its reader: the `?name=` it was opened with."""

    name: str


class Presence(TypedDict):
    """A reader who opened (`sseviews.join`) or closed (`sseviews.leave`) a room stream."""

    id: str
    info: MemberInfo
    #: When the stream joined, in seconds since the epoch.
    joined_at: float


class Metrics(TypedDict):
    """One sample of the server process, sent as a `metrics` event."""

    pid: int
    rss_bytes: int
    cpu_percent: float
    #: None where the platform does not say (no /proc).
    open_files: int | None
    threads: int | None
    #: Open streams on the broadcast's groups, in this process.
    streams: int
    uptime_seconds: float


class Progress(TypedDict):
    """How far a job got: a `progress` event."""

    job: int
    step: int
    steps: int
    percent: int


class Outcome(TypedDict):
    """How a job ended: the final `done` event."""

    job: int
    status: Literal["done", "interrupted"]
    result: str | None
