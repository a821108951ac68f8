"""Judging a failover from the outside: browser-like subscribers that resume with
Last-Event-ID, and the guarantee checked against what publish() returned.

The guarantee (Sentinel and Redis Cluster): every event whose publish() returned an
id reaches each subscriber exactly once, in id order, or that subscriber gets
`sseviews.reset` after its last event before the gap; and no id is ever issued
twice with different data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from sseviews import Event
from sseviews.testing import EventParser

from .servers import ServerProcess

#: Bound on a failover: the sentinels' down-after (1 s), their vote, the promotion;
#: on a cluster, cluster-node-timeout (1 s), the replicas' election, the new slot map.
FAILOVER_TIMEOUT = 25.0


async def poll_until(check: Callable[[], bool], seconds: float = FAILOVER_TIMEOUT) -> None:
    """Wait (at most `seconds`) until `check()` holds."""
    with anyio.fail_after(seconds):
        while True:
            if check():
                return
            await anyio.sleep(0.02)


@dataclass
class Subscriber:
    """A browser-like EventSource on one room of one server: it reconnects with
    Last-Event-ID after every end, until it receives the `done` event."""

    server: ServerProcess
    room: str
    received: list[Event] = field(default_factory=list)
    connects: int = 0
    refused: int = 0
    last_id: str | None = None
    #: Whether a stream is open now, and when it last sent anything (for failures).
    streaming: bool = False
    last_read: float = 0.0
    done: anyio.Event = field(default_factory=anyio.Event)
    subscribed: anyio.Event = field(default_factory=anyio.Event)

    @property
    def name(self) -> str:
        return f"{self.server.name}:{self.room}"

    async def run(self, http: httpx.AsyncClient) -> None:
        url = f"{self.server.base_url}/rooms/{self.room}"
        while True:
            headers = {"Accept": "text/event-stream"}
            if self.last_id:
                headers["Last-Event-ID"] = self.last_id
            try:
                async with http.stream("GET", url, headers=headers) as response:
                    self.connects += 1
                    if response.status_code != 200:
                        self.refused += 1
                        await response.aread()
                    else:
                        self.subscribed.set()
                        self.streaming = True
                        parser = EventParser()
                        async for chunk in response.aiter_raw():
                            self.last_read = time.monotonic()
                            for event in parser.feed(chunk):
                                self.received.append(event)
                                self.last_id = parser.last_event_id or self.last_id
                                if event.event is None and event.json().get("done"):
                                    self.done.set()
                                    return
            except httpx.HTTPError:
                pass
            finally:
                self.streaming = False
            await anyio.sleep(0.1)  # the app's retry: 100 ms


@dataclass
class Published:
    room: str
    id: str
    data: dict[str, Any]


@dataclass
class Outcome:
    """What one subscriber saw, against what was published."""

    name: str
    returned: int = 0
    received: int = 0
    resets: int = 0
    missed_with_reset: int = 0
    missed_silently: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    out_of_order: list[tuple[str, str]] = field(default_factory=list)


def position_of(event_id: str) -> tuple[str, int]:
    epoch, _, seq = event_id.rpartition("-")
    return epoch, int(seq)


def judge(subscriber: Subscriber, published: list[Published]) -> Outcome:
    """Check the failover guarantee for one subscriber (see the module docstring)."""
    mine = [p for p in published if p.room == subscriber.room]
    rank = {p.id: i for i, p in enumerate(mine)}
    outcome = Outcome(subscriber.name, returned=len(mine))
    events = subscriber.received
    ids: set[str] = set()
    # An event counts as received only with its own data: an id reissued for
    # other data is not the event that publish() returned.
    seen: set[tuple[str, str]] = set()
    previous: str | None = None
    for event in events:
        if event.event == "sseviews.reset":
            outcome.resets += 1
            previous = None
            continue
        if event.event is not None or event.id is None or "n" not in event.json():
            continue
        outcome.received += 1
        if event.id in ids:
            outcome.duplicates.append(event.id)
        ids.add(event.id)
        seen.add((event.id, json.dumps(event.json(), sort_keys=True)))
        if previous is not None:
            (e1, s1), (e2, s2) = position_of(previous), position_of(event.id)
            if e1 != e2 or s2 <= s1:
                outcome.out_of_order.append((previous, event.id))
        previous = event.id
    # A returned event missing here must have a reset between the last event
    # received before it and the first received after it.
    positions = {
        e.id: i
        for i, e in enumerate(events)
        if e.event is None
        and e.id in rank
        and e.json() == mine[rank[e.id]].data  # not a reissued id
    }
    for p in mine:
        if (p.id, json.dumps(p.data, sort_keys=True)) in seen:
            continue
        before = [positions[q.id] for q in mine[: rank[p.id]] if q.id in positions]
        after = [positions[q.id] for q in mine[rank[p.id] + 1 :] if q.id in positions]
        start = max(before, default=-1)
        end = min(after, default=len(events))
        if any(e.event == "sseviews.reset" for e in events[start + 1 : end]):
            outcome.missed_with_reset += 1
        else:
            outcome.missed_silently.append(p.id)
    return outcome


def conflicting_ids(published: list[Published], subscribers: list[Subscriber]) -> list[str]:
    """Ids seen with two different data (from publish() results and from streams)."""
    data_of: dict[str, set[str]] = {}
    for p in published:
        data_of.setdefault(p.id, set()).add(json.dumps(p.data, sort_keys=True))
    for subscriber in subscribers:
        for event in subscriber.received:
            if event.event is None and event.id is not None:
                data_of.setdefault(event.id, set()).add(json.dumps(event.json(), sort_keys=True))
    return sorted(event_id for event_id, values in data_of.items() if len(values) > 1)


async def post(http: httpx.AsyncClient, server: ServerProcess, room: str, data: Any) -> str | None:
    """Publish through `server`; the id, or None when the publish failed."""
    try:
        response = await http.post(f"{server.base_url}/rooms/{room}", json=data)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    event_id: str = response.json()["id"]
    return event_id


class FailoverDrill:
    """Two processes, browser-like subscribers on both, and a publisher through one of
    them, around a failover that `run()` is given.

    The publisher posts to `rooms` in turn, through `via` (A until the failover
    hook switches it). `run(fail_over)` opens every subscriber, publishes 100
    events, awaits `fail_over(drill)` (which kills the master, sets `via`, waits
    for the promotion, records `stats`, and sets `killed_at` if it published
    before the kill), then publishes 50 events past `killed_at` and on until
    every subscriber has 10 events published after the failover, and ends each
    one with a `done` marker. The test judges `published` and the subscribers
    after.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        servers: tuple[ServerProcess, ServerProcess],
        rooms: tuple[str, str],
        subscribers: list[Subscriber],
        timeout: float,
    ) -> None:
        self.http = http
        self.servers = servers
        self.rooms = rooms
        self.subscribers = subscribers
        self.timeout = timeout
        self.published: list[Published] = []
        self.failed = 0
        self.via = servers[0]
        self.stats: dict[str, Any] = {}
        #: How many events were published when the master was killed.
        self.killed_at = 0
        self._stop = anyio.Event()
        self._stopped = anyio.Event()

    async def _publish(self) -> None:
        n = 0
        while not self._stop.is_set():
            room = self.rooms[n % 2]
            data = {"n": n}
            event_id = await post(self.http, self.via, room, data)
            if event_id is None:
                self.failed += 1
                await anyio.sleep(0.05)
            else:
                self.published.append(Published(room, event_id, data))
            n += 1
            await anyio.sleep(0.005)
        self._stopped.set()

    def progress(self) -> str:
        now = time.monotonic()
        clients = [
            f"{s.name}: {len(s.received)} events, {s.connects} connects, done={s.done.is_set()}, "
            f"streaming={s.streaming} (read {now - s.last_read:.1f}s ago), last_id={s.last_id}, "
            f"last events {[(e.event, e.id, e.data) for e in s.received[-3:]]}"
            for s in self.subscribers
        ]
        tail = [(p.room, p.id) for p in self.published[-4:]]
        return (
            f"{len(self.published)} published (last {tail}), {self.failed} failed, "
            f"{self.stats}; {clients}"
        )

    @contextmanager
    def within(self, seconds: float, what: str) -> Iterator[None]:
        """Fail with the drill's progress and both servers' logs after `seconds`."""
        try:
            with anyio.fail_after(seconds):
                yield
        except TimeoutError:
            logs = "\n".join(f"--- {s.name}:\n{s.log()[-2000:]}" for s in self.servers)
            raise AssertionError(
                f"{what}: not within {seconds}s; {self.progress()}\n{logs}"
            ) from None

    async def published_at_least(self, count: int) -> None:
        with self.within(FAILOVER_TIMEOUT, f"{count} events published"):
            await poll_until(lambda: len(self.published) >= count)

    async def run(self, fail_over: Callable[[FailoverDrill], Awaitable[None]]) -> None:
        subscribers = self.subscribers
        async with anyio.create_task_group() as tg:
            for subscriber in subscribers:
                tg.start_soon(subscriber.run, self.http)
            with self.within(self.timeout, "every subscriber subscribed"):
                for subscriber in subscribers:
                    await subscriber.subscribed.wait()
            tg.start_soon(self._publish)
            await self.published_at_least(100)
            self.killed_at = len(self.published)
            await fail_over(self)
            await self.published_at_least(self.killed_at + 50)
            # Publishing goes on until every subscriber is live again and has
            # received 10 events published after the failover.
            after = self.published[-1].data["n"]

            def new_events(subscriber: Subscriber) -> int:
                return sum(
                    1
                    for e in subscriber.received
                    if e.event is None and e.id is not None and e.json().get("n", -1) > after
                )

            with self.within(FAILOVER_TIMEOUT, "every subscriber live after the failover"):
                await poll_until(lambda: all(new_events(s) >= 10 for s in subscribers))
            self._stop.set()
            with self.within(self.timeout, "the publisher stopped"):
                await self._stopped.wait()
            # End markers, in each room, through each server in turn, until every
            # subscriber has one: a subscriber that resubscribes after a marker was
            # published gets a reset past it, and needs the next one.
            with self.within(FAILOVER_TIMEOUT, "every subscriber received an end marker"):
                n = 0
                while not all(subscriber.done.is_set() for subscriber in subscribers):
                    room = self.rooms[n % 2]
                    await post(self.http, self.servers[n // 2 % 2], room, {"done": True})
                    n += 1
                    await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
