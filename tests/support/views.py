"""Views and recorders that the view tests (`tests/test_views_*.py`) share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sseviews import DisconnectReason, EventStreamView

KIB = b"x" * 1024


class Trace:
    """What a view saw: hook calls in order, disconnect reasons, task ids."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.reasons: list[DisconnectReason] = []
        self.tasks: dict[str, int] = {}
        self.sessions: list[Any] = []
        self.disconnected = anyio.Event()

    def step(self, name: str) -> None:
        self.steps.append(name)
        self.tasks[name] = anyio.get_current_task().id

    def disconnect(self, reason: DisconnectReason) -> None:
        self.step("on_disconnect")
        self.reasons.append(reason)
        self.disconnected.set()

    async def wait_disconnected(self) -> None:
        with anyio.fail_after(3):
            await self.disconnected.wait()


def traced_view(trace: Trace, events: Callable[[Any], AsyncIterator[Any]], **settings: Any) -> Any:
    """Build a view whose `events()` is `events(self)` and whose hooks are traced."""

    async def on_connect(self: EventStreamView) -> None:
        trace.step("on_connect")

    async def on_disconnect(self: EventStreamView, reason: DisconnectReason) -> None:
        trace.disconnect(reason)

    namespace = {"on_connect": on_connect, "events": events, "on_disconnect": on_disconnect}
    return type("TracedView", (EventStreamView,), {**namespace, **settings})


def refusing_view(status: int) -> type[EventStreamView]:
    """A view whose `on_connect()` raises `HTTPException(status)`: `events()` never runs."""

    class Guarded(EventStreamView):
        async def on_connect(self) -> None:
            raise HTTPException(status_code=status)

        async def events(self) -> AsyncIterator[Any]:
            yield "x"  # pragma: no cover

    return Guarded


async def end_as(ending: str) -> None:
    """End an `events()` as a test's `ending` says: "error" raises, "completed" returns
    (the stream completes), any other ending waits here until the stream is cancelled."""
    if ending == "error":
        raise RuntimeError("boom")
    if ending != "completed":
        await anyio.sleep_forever()


class SendRecorder:
    """ASGI middleware that records every message the app sends, and overlapping sends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.messages: list[Message] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def recording_send(message: Message) -> None:
            self.messages.append(message)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await send(message)
            finally:
                self.in_flight -= 1

        await self.app(scope, receive, recording_send)

    @property
    def final_chunk_sent(self) -> bool:
        last = self.messages[-1]
        return last["type"] == "http.response.body" and not last.get("more_body", False)
