"""Which channels one pub/sub connection is subscribed to, kept in step with the
groups the streams of this process use.

A `Channels` holds what every subscribe-per-group backend needs, whatever the
server: the wanted groups, the linger before a group no longer used is
unsubscribed (a browser that reconnects at once costs no round trip), one writer
that sends what was asked while its previous batch was in flight as one batch,
the callers waiting for their groups' confirmation, and a full resubscription
when the connection is replaced. The backend owns the connection: it gives
`attach()` a function that sends "subscribe these channels, unsubscribe those",
runs `run()` (the writer) next to its own reader, and tells the `Channels` what
its reader saw: `confirmed_by_server()` for a (un)subscribe confirmation,
`refused()` for an error reply to one; `group_of()` and `carries()` say whose a
message's channel is.

`RedisBackend` and `PostgresBackend` hold one `Channels`; `RedisClusterBackend`
holds one per shard connection and moves a group whose slot moved to another
with `release()` and `want()`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from .._exceptions import BackendError

__all__ = ["Channels", "Rerouted", "Send"]

#: Sends one batch: `send(subscribe, unsubscribe)`, each a list of channel names.
#: It returns once the commands are written (or ran); the confirmations come
#: through `Channels.confirmed_by_server()` (or `refused()`), one per channel.
Send = Callable[[list[Any], list[Any]], Awaitable[None]]

#: A channel name: bytes (Redis) or str (PostgreSQL).
C = TypeVar("C", bytes, str)


class Rerouted(Exception):
    """Raised to a caller waiting for a group that `release()` took away from this
    connection (its channel now belongs to another one): ask the other one."""


class Channels(Generic[C]):
    """The channels of one pub/sub connection (see the module docstring).

    Two groups may share a channel (PostgreSQL's names are hashed when long): the
    channel is unsubscribed once neither uses it, and a message on it is for
    whichever of its groups it names.

    Args:
        channel_of: The channel name of a group.
        linger: Seconds a group stays subscribed after its last user left.
        attempt_timeout: Bound, in seconds, on the server confirming one batch.
        where: What the connection reaches, for error messages.
    """

    def __init__(
        self,
        channel_of: Callable[[str], C],
        *,
        linger: float,
        attempt_timeout: float,
        where: str,
    ) -> None:
        self._channel_of: Callable[[str], C] = channel_of
        self.linger = linger
        self.attempt_timeout = attempt_timeout
        self.where = where
        self._open = False
        # The groups some subscription of this process uses.
        self.wanted: set[str] = set()
        # Groups no longer used but still subscribed: group -> when to unsubscribe
        # (time.monotonic()). Every entry gets the same linger, so the dict's order
        # is the deadlines' order.
        self._lingering: dict[str, float] = {}
        # Groups whose subscription may differ from what they need: the writer's work.
        self._dirty: set[str] = set()
        # Callers waiting for a group's confirmation wait on its event, set when the
        # group is confirmed, dropped, released, or the connection is lost.
        self._confirming: dict[str, asyncio.Event] = {}
        # Released groups that a caller still waits for (it gets Rerouted).
        self._released: set[str] = set()
        self._wake: asyncio.Event | None = None
        # -- the current connection (reset by attach() and detach())
        self._send: Send | None = None
        self._on_synced: Callable[[], None] | None = None
        # group -> channel, for every group subscribed and not unsubscribed since.
        self.sent: dict[str, C] = {}
        # Those of them that the server confirmed.
        self.confirmed: set[str] = set()
        # channel -> groups, for every channel whose messages may still arrive.
        self._groups: dict[C, set[str]] = {}
        # Confirmations still to come for the batch sent; `_settled` is set at 0.
        self._outstanding = 0
        self._settled = asyncio.Event()
        self._settled.set()

    # -- lifecycle (the backend's) ------------------------------------------------

    def open(self) -> None:
        """Accept subscriptions from now on (in the serving event loop)."""
        self._open = True
        self._wake = asyncio.Event()

    def close(self) -> None:
        """Refuse subscriptions, drop the connection's state and every wanted group."""
        self._open = False
        self.detach()
        self.wanted.clear()

    @property
    def linked(self) -> bool:
        """Whether a connection is attached."""
        return self._send is not None

    def attach(self, send: Send, on_synced: Callable[[], None] | None = None) -> None:
        """Use a new connection: every wanted group is subscribed on it by `run()`,
        which then calls `on_synced` once."""
        self._send = send
        self._on_synced = on_synced
        self.sent = {}
        self.confirmed = set()
        self._groups = {}
        self._outstanding = 0
        self._settled = asyncio.Event()
        self._settled.set()
        self._dirty = set(self.wanted)
        if self._wake is not None:
            self._wake.set()

    def detach(self) -> None:
        """The connection is gone: forget what it was subscribed to, and wake every
        caller waiting for a confirmation (they get BackendError)."""
        self._send = None
        self._on_synced = None
        self.sent = {}
        self.confirmed = set()
        self._groups = {}
        self._outstanding = 0
        self._settled.set()
        self._lingering.clear()
        self._dirty.clear()
        confirming, self._confirming = self._confirming, {}
        for event in confirming.values():
            event.set()

    # -- what the streams of this process use ---------------------------------------

    async def subscribe(self, groups: Sequence[str]) -> None:
        """Want `groups`; return once the server confirmed each of them.

        Raises:
            BackendError: Not open, or the connection was lost before the server
                confirmed (the groups stay wanted).
            Rerouted: A group was released to another connection meanwhile.
        """
        wanted = self.wanted
        confirmed = self.confirmed
        for group in groups:
            if group not in confirmed or group not in wanted:
                break
        else:
            return  # the common case: every group in use already
        wake = self._wake
        if not self._open or wake is None:
            raise BackendError(f"the backend is not connected to {self.where}")
        waiting = []
        for group in groups:
            if group not in wanted:
                wanted.add(group)
                lingered = self._lingering.pop(group, None) is not None
                if not (lingered and group in self.sent):
                    self._dirty.add(group)
                    wake.set()
            if group not in self.confirmed:
                waiting.append(group)
        for group in waiting:
            await self._confirmation(group)

    def want(self, groups: Sequence[str]) -> None:
        """Want `groups` without waiting for the server (a group moved here from
        another connection)."""
        wake = self._wake
        for group in groups:
            if group not in self.wanted:
                self.wanted.add(group)
                lingered = self._lingering.pop(group, None) is not None
                if not (lingered and group in self.sent):
                    self._dirty.add(group)
        if wake is not None:
            wake.set()

    def unsubscribe(self, groups: Sequence[str]) -> None:
        """Unsubscribe from `groups` after `linger` seconds, unless wanted again."""
        wake = self._wake
        deadline = time.monotonic() + self.linger
        for group in groups:
            if group not in self.wanted:
                continue
            self.wanted.discard(group)
            if group in self.sent:
                self._lingering[group] = deadline
            else:
                self._dirty.add(group)  # not sent yet: the writer drops it
            if wake is not None:
                wake.set()

    def release(self, groups: Sequence[str]) -> list[str]:
        """Take `groups` away from this connection, as if never asked: the server no
        longer delivers their channels here (their slot moved). Return those that
        were wanted; their waiting callers get `Rerouted`."""
        moved = []
        for group in groups:
            if group in self.wanted:
                moved.append(group)
                self.wanted.discard(group)
            self._lingering.pop(group, None)
            self._dirty.discard(group)
            self.confirmed.discard(group)
            channel = self.sent.pop(group, None)
            if channel is not None:
                self._drop_group(channel, group)
            event = self._confirming.pop(group, None)
            if event is not None:
                self._released.add(group)
                event.set()
        return moved

    async def _confirmation(self, group: str) -> None:
        while True:
            if group in self._released:
                self._released.discard(group)
                raise Rerouted(group)
            if self._send is None:
                raise BackendError(f"lost the connection to {self.where}")
            if group in self.confirmed:
                return
            if group not in self.wanted and group not in self.sent:
                raise BackendError(f"group {group!r} was unsubscribed before it was confirmed")
            event = self._confirming.get(group)
            if event is None:
                event = self._confirming[group] = asyncio.Event()
            await event.wait()

    # -- what the backend's reader saw -------------------------------------------------

    def group_of(self, channel: C) -> str | None:
        """The group of a channel whose messages are expected, or None (for a
        channel of one group, as Redis's are)."""
        groups = self._groups.get(channel)
        if not groups:
            return None
        for group in groups:
            return group
        return None

    def carries(self, channel: C, group: str) -> bool:
        """Whether a message for `group` on `channel` is expected."""
        groups = self._groups.get(channel)
        return groups is not None and group in groups

    def confirmed_by_server(self, subscribed: bool, channel: C) -> None:
        """The server confirmed a subscribe (`subscribed`) or an unsubscribe of `channel`."""
        groups = self._groups.get(channel)
        if groups is not None:
            if subscribed:
                for group in groups:
                    if group in self.sent:
                        self.confirmed.add(group)
                    event = self._confirming.pop(group, None)
                    if event is not None:
                        event.set()
            else:
                for group in [group for group in groups if group not in self.sent]:
                    groups.discard(group)
                if not groups:
                    del self._groups[channel]
        self._answered()

    def _drop_group(self, channel: C, group: str) -> None:
        groups = self._groups.get(channel)
        if groups is not None:
            groups.discard(group)
            if not groups:
                del self._groups[channel]

    def refused(self) -> None:
        """The server answered one (un)subscribe of the batch with an error."""
        self._answered()

    def _answered(self) -> None:
        self._outstanding -= 1
        if self._outstanding <= 0:
            self._outstanding = 0
            self._settled.set()

    # -- the writer -------------------------------------------------------------------

    async def run(
        self, heartbeat: tuple[float, Callable[[], Awaitable[None]]] | None = None
    ) -> None:
        """Send what the wanted groups need, until cancelled or the connection fails.

        Args:
            heartbeat: `(interval, check)`: await `check()` (which raises if the
                connection is dead) when `interval` seconds passed without one.

        Raises:
            Exception: What the send function raised, or TimeoutError when the
                server did not confirm a batch within `attempt_timeout`.
        """
        wake = self._wake
        assert wake is not None, "open() first"
        checked = time.monotonic()
        while True:
            wake.clear()
            delay = self._expire()
            if self._dirty:
                await self._send_batch()
                continue
            on_synced, self._on_synced = self._on_synced, None
            if on_synced is not None:
                # Every group in use is subscribed on this connection.
                on_synced()
            if heartbeat is not None:
                interval, check = heartbeat
                now = time.monotonic()
                if now - checked >= interval:
                    checked = now
                    async with asyncio.timeout(self.attempt_timeout):
                        await check()
                    continue
                until_check = checked + interval - now
                delay = until_check if delay is None else min(delay, until_check)
            if delay is None:
                await wake.wait()
                continue
            try:
                async with asyncio.timeout(delay):
                    await wake.wait()
            except TimeoutError:
                pass

    def _expire(self) -> float | None:
        """Mark the lingering groups whose time is up; return the seconds until the
        next one's, or None."""
        lingering = self._lingering
        if not lingering:
            return None
        now = time.monotonic()
        expired = []
        for group, deadline in lingering.items():
            if deadline > now:
                break
            expired.append(group)
        for group in expired:
            del lingering[group]
            self._dirty.add(group)
        if not lingering:
            return None
        return next(iter(lingering.values())) - now

    async def _send_batch(self) -> None:
        """Send what the dirty groups need as one batch, and wait for the server."""
        send = self._send
        if send is None:
            raise ConnectionError(f"the connection to {self.where} was closed")
        dirty, self._dirty = self._dirty, set()
        wanted, lingering = self.wanted, self._lingering
        subscribe: list[C] = []
        unsubscribe: list[C] = []
        for group in dirty:
            if group in wanted or group in lingering:
                if group not in self.sent:
                    channel = self._channel_of(group)
                    self.sent[group] = channel
                    # Known before it is sent: a message may come with the reply.
                    self._groups.setdefault(channel, set()).add(group)
                    subscribe.append(channel)
            elif group in self.sent:
                channel = self.sent.pop(group)
                self.confirmed.discard(group)
                sharing = self._groups.get(channel, ())
                if any(other in self.sent for other in sharing):
                    # Another group still uses the channel: keep it.
                    self._drop_group(channel, group)
                else:
                    unsubscribe.append(channel)
            else:
                # Given up before it was sent: wake whoever still waits for it.
                event = self._confirming.pop(group, None)
                if event is not None:
                    event.set()
        if not subscribe and not unsubscribe:
            return
        self._outstanding += len(subscribe) + len(unsubscribe)
        self._settled.clear()
        settled = self._settled
        await send(subscribe, unsubscribe)
        # One batch in flight at a time: what is asked meanwhile goes in the next one.
        async with asyncio.timeout(self.attempt_timeout):
            await settled.wait()
