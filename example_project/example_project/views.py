"""The event streams. Each view is declared once; `create_app` gives it this app's parts.

`broadcast` and `session_factory` are class attributes of a view. Instead of setting
them here from module-level globals, `configure()` makes a subclass per app with
this app's broadcast and database, so two apps (say, two tests) live side by side.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar, TypeVar

import anyio
from sseviews import RESET_EVENT, Event, EventStreamView
from starlette.exceptions import HTTPException

from .chat import PRIVATE_GROUP, check_room, check_token, member_name, room_group
from .events import ChatMessage, Metrics, Outcome, Presence, Progress
from .jobs import job_group
from .metrics import ProcessSampler
from .models import Job

V = TypeVar("V", bound=type[EventStreamView])


def configure(view: V, **settings: Any) -> V:
    """Return a subclass of `view` whose class attributes are `settings`."""
    namespace = {"__module__": view.__module__, "__qualname__": view.__qualname__, **settings}
    return type(view.__name__, (view,), namespace)  # type: ignore[return-value]


class RoomFeed(EventStreamView):
    """A chat room's messages, as unnamed events whose data is the message as JSON.

    `events()` is not overridden: the view streams its group, and a browser that
    reconnects with `Last-Event-ID` first gets every message it missed, then live ones.
    A page opens the stream with `?lastEventId=` set to the id of the newest message
    it rendered, so nothing falls between the page and its stream.

    A stream opened with `?name=` is listed in the room's presence while it is open,
    and its join and leave reach the room as `sseviews.join` and `sseviews.leave`
    events (ephemeral: never replayed, and they do not move `Last-Event-ID`).
    """

    event_types: ClassVar = {
        "message": ChatMessage,
        "sseviews.join": Presence,
        "sseviews.leave": Presence,
    }
    # Browsers reconnect half a second after losing the stream.
    retry = 500
    announce_presence = True
    member: str | None = None

    async def on_connect(self) -> None:
        check_room(self.request.path_params["room"])
        self.member = member_name(self.request)

    def groups(self) -> list[str]:
        return [room_group(self.request.path_params["room"])]

    def presence_info(self) -> Mapping[str, Any] | None:
        return {"name": self.member} if self.member else None


class PrivateRoomFeed(RoomFeed):
    """The private room: `on_connect` refuses a missing (401) or wrong (403) token.

    A browser's `EventSource` does not retry after a refusal: it fires `error` and
    its `readyState` becomes `CLOSED`, which the page shows. It lists no presence.
    """

    async def on_connect(self) -> None:
        check_token(self.request, self.request.app.state.settings.private_token)

    def groups(self) -> list[str]:
        return [PRIVATE_GROUP]


class DashboardFeed(EventStreamView):
    """The server's own metrics, as a `metrics` event every `METRICS_INTERVAL` seconds."""

    event_types: ClassVar = {"metrics": Metrics}
    retry = 500

    async def events(self) -> AsyncIterator[Event]:
        state = self.request.app.state
        sampler = ProcessSampler()
        while True:
            metrics = sampler.sample()
            metrics["streams"] = (
                state.broadcast.subscriber_count + state.jobs_broadcast.subscriber_count
            )
            metrics["uptime_seconds"] = round(anyio.current_time() - state.started, 1)
            yield Event(metrics, event="metrics")
            await anyio.sleep(state.settings.metrics_interval)


class JobFeed(EventStreamView):
    """One job's `progress` events, then a final `done` event, after which it returns.

    It overrides `events()` to send the job's state from the database first (with
    `self.session`, opened by `session_factory` in the stream task), then follows
    the job's group. The group was joined before `events()` started, so no step is
    missed between reading the row and following the group.
    """

    event_types: ClassVar = {"progress": Progress, "done": Outcome}
    retry = 500

    async def on_connect(self) -> None:
        try:
            self.job_id = int(self.request.path_params["job_id"])
        except ValueError:
            raise HTTPException(404, "no such job") from None
        # on_connect runs before the stream exists, so it opens its own short session.
        async with self.session_factory() as session:
            if await session.get(Job, self.job_id) is None:
                raise HTTPException(404, "no such job")

    def groups(self) -> list[str]:
        return [job_group(self.job_id)]

    async def events(self) -> AsyncIterator[Event]:
        if self.last_event_id is None:
            # A new watcher: where the job is now. (A reconnecting one gets a replay.)
            async for event in self.snapshot():
                yield event
                if event.event == "done":
                    return
        async for event in self.subscription:
            if event.event == RESET_EVENT:
                # The history cannot resume this browser (the server restarted with a
                # memory history): send the job's state instead, under the reset's id.
                async for snapshot in self.snapshot(event.id):
                    yield snapshot
                    if snapshot.event == "done":
                        return
                continue
            yield event
            if event.event == "done":
                return

    async def snapshot(self, id: str | None = None) -> AsyncIterator[Event]:
        """The job's state from the database: a `progress` event, and `done` if it ended."""
        # The transaction ends at once: a stream holds no database connection while idle.
        async with self.session.begin():
            job = await self.session.get_one(Job, self.job_id)
        yield Event(job.progress(), event="progress", id=id)
        if job.finished:
            yield Event(job.outcome(), event="done", id=id)
