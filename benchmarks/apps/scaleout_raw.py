"""Per-user channels in raw ASGI and redis-py: the floor of ``bench_scaleout.py``, case (a).

The least code that does the job of ``scaleout_sseviews.py`` over one plain
Redis, with the same routes and the same events on the wire:

* ``GET /user?u=N`` -- streams the events of user N. While user N has a stream
  in this process, the process is subscribed to the user's channel
  ``<prefix>:raw:u:N`` on its one pub/sub connection (``SUBSCRIBE`` when the
  user's first stream opens, ``UNSUBSCRIBE`` when the last one closes). The
  response head is sent once Redis has confirmed the subscription, so a client
  that has its head receives every event published after it; ``/stats``
  counts only such streams.
* ``GET /start?n=5000&interval=0.001`` -- publishes ``n`` events on a fixed
  schedule (``fanout_common.publish_paced``), each to a user drawn at random
  from ``0..SCALEOUT_USERS-1`` by a generator seeded with ``SCALEOUT_SEED``
  (the draw of ``scaleout_sseviews.py``), data ``{"t": ..., "i": n, "u": user}``.
  One script call per event (:data:`PUBLISH_SCRIPT`) increments the user's id
  key and publishes the whole SSE message, ``id: <id>\\ndata: <json>\\n\\n``, on
  the user's channel; being one script, the ids of a user reach its channel in
  increasing order whichever process publishes.
* ``GET /stats`` -- as in the other fan-out apps (``fanout_common.py``).

A subscribing process adds nothing to a message: one reader task reads the
pub/sub connection and puts the message's bytes, as one ASGI body message, into
the queue of every stream of its channel; each stream is
:func:`benchmarks.apps.common.queue_stream`, as in ``fanout_raw.py``. The reader
reads replies with the connection's ``read_response``, not redis-py's
``PubSub.get_message``, which builds a dict and records metrics per message:
the floor must not pay for what sseviews' own reader (which also reads the
connection) does not. No ping, no send timeout, no history, no reconnection:
if the pub/sub connection fails, every stream ends, which the benchmark counts
as lost events.

Environment: ``FANOUT_BROADCAST_URL`` (a ``redis://`` URL, default
``redis://127.0.0.1:6379/0``), ``FANOUT_PREFIX`` (default ``sseviews-bench``),
``SCALEOUT_USERS`` (default 4000) and ``SCALEOUT_SEED`` (default 17), as for
``scaleout_sseviews.py``.

Run with ``python -m uvicorn benchmarks.apps.scaleout_raw:app`` from the repo
root.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
from collections import deque

import redis.asyncio
from redis.asyncio.connection import AbstractConnection

from benchmarks.apps.common import (
    Message,
    Receive,
    Scope,
    Send,
    asgi_app,
    query,
    queue_stream,
    send_json,
)
from benchmarks.apps.fanout_common import Publisher, dumps, payload, start_publishing, stats

logger = logging.getLogger(__name__)

USERS = int(os.environ.get("SCALEOUT_USERS", "4000"))
_draw = random.Random(int(os.environ.get("SCALEOUT_SEED", "17")))

#: KEYS[1]: the user's id counter; ARGV[1]: the user's channel; ARGV[2]: the JSON data.
PUBLISH_SCRIPT = """
local id = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], 'id: ' .. id .. '\\ndata: ' .. ARGV[2] .. '\\n\\n')
return id
"""


class UserChannels:
    """One process's pub/sub connection and the streams of each subscribed channel."""

    def __init__(self, url: str, prefix: str) -> None:
        if not url.startswith(("redis://", "rediss://")):
            raise ValueError(f"scaleout_raw serves a plain Redis only, got {url!r}")
        self.prefix = prefix
        self._client = redis.asyncio.Redis.from_url(url)
        self._publish = self._client.register_script(PUBLISH_SCRIPT)
        self._conn: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        # Commands leave in the order they were asked for: an UNSUBSCRIBE and the
        # SUBSCRIBE of the same channel that follows it must not swap.
        self._send_lock = asyncio.Lock()
        self._streams: dict[bytes, set[asyncio.Queue[Message | None]]] = {}
        # One future per SUBSCRIBE in flight, per channel, resolved by its confirmation.
        self._pending: dict[bytes, deque[asyncio.Future[None]]] = {}
        self.subscribers = 0  # streams whose subscription is confirmed

    def channel(self, user: int) -> bytes:
        return f"{self.prefix}:raw:u:{user}".encode()

    async def publish(self, user: int, data: str) -> None:
        await self._publish(keys=[f"{self.prefix}:raw:id:{user}"], args=[self.channel(user), data])

    async def _send(self, *command: bytes | str) -> None:
        async with self._send_lock:
            if self._conn is None:
                self._conn = await self._client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
                self._reader = asyncio.get_running_loop().create_task(self._read(self._conn))
            await self._conn.send_command(*command, check_health=False)

    async def add(self, channel: bytes, queue: asyncio.Queue[Message | None]) -> None:
        """Register ``queue`` for ``channel``; return once the process is subscribed."""
        streams = self._streams.get(channel)
        if streams is None:
            streams = self._streams[channel] = set()
            confirmed = asyncio.get_running_loop().create_future()
            pending = self._pending.setdefault(channel, deque())
            pending.append(confirmed)
            streams.add(queue)
            try:
                await self._send("SUBSCRIBE", channel)
            except Exception:
                pending.remove(confirmed)  # never sent: no confirmation will come
                raise
        else:
            streams.add(queue)
            in_flight = self._pending.get(channel)
            if not in_flight:
                self.subscribers += 1
                return
            confirmed = in_flight[-1]
        await asyncio.shield(confirmed)
        self.subscribers += 1

    async def remove(
        self, channel: bytes, queue: asyncio.Queue[Message | None], live: bool
    ) -> None:
        """Forget ``queue`` (``live``: counted in ``subscribers``); unsubscribe after the last."""
        if live:
            self.subscribers -= 1
        streams = self._streams.get(channel)
        if streams is None:
            return
        streams.discard(queue)
        if not streams:
            del self._streams[channel]
            if self._conn is not None:
                await self._send("UNSUBSCRIBE", channel)

    async def _read(self, conn: AbstractConnection) -> None:
        try:
            while True:
                # math.inf: block without the client's socket_timeout, as PubSub does.
                reply = await conn.read_response(
                    disable_decoding=True, timeout=math.inf, push_request=True
                )
                if not isinstance(reply, list) or len(reply) != 3:
                    continue
                kind, channel, body = reply
                if kind == b"message":
                    streams = self._streams.get(channel)
                    if streams:
                        message: Message = {
                            "type": "http.response.body",
                            "body": body,
                            "more_body": True,
                        }
                        for queue in streams:
                            queue.put_nowait(message)
                elif kind == b"subscribe":
                    pending = self._pending.get(channel)
                    if pending:
                        pending.popleft().set_result(None)
                        if not pending:
                            del self._pending[channel]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("the pub/sub connection failed; ending every stream")
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        self._conn = None
        for pending in self._pending.values():
            for confirmed in pending:
                if not confirmed.done():
                    confirmed.set_exception(ConnectionError(f"pub/sub connection lost: {exc}"))
        self._pending.clear()
        self.end_streams()

    def end_streams(self) -> None:
        for streams in self._streams.values():
            for queue in streams:
                queue.put_nowait(None)

    def shutdown(self) -> None:
        self.end_streams()
        if self._reader is not None:
            self._reader.cancel()


channels = UserChannels(
    os.environ.get("FANOUT_BROADCAST_URL", "redis://127.0.0.1:6379/0"),
    os.environ.get("FANOUT_PREFIX", "sseviews-bench"),
)


async def publish_to_random_user(index: int) -> None:
    user = _draw.randrange(USERS)
    await channels.publish(user, dumps({**payload(index), "u": user}))


publisher = Publisher(publish_to_random_user)


async def user_stream(scope: Scope, receive: Receive, send: Send) -> None:
    user = query(scope).get("u", [""])[0]
    if not user.isdigit():
        await send_json(send, {"error": "expected ?u=<user number>"}, 400)
        return
    channel = channels.channel(int(user))
    queue: asyncio.Queue[Message | None] = asyncio.Queue()
    live = False
    try:
        await channels.add(channel, queue)
        live = True
        await queue_stream(receive, send, queue)
    finally:
        await channels.remove(channel, queue, live)


async def start_route(scope: Scope, receive: Receive, send: Send) -> None:
    status, body = start_publishing(publisher, channels.subscribers, query(scope))
    await send_json(send, body, status)


async def stats_route(scope: Scope, receive: Receive, send: Send) -> None:
    await send_json(send, stats(channels.subscribers, publisher, query(scope)))


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    await send_json(send, {"error": "not found"}, 404)


app = asgi_app(
    {"/user": user_stream, "/start": start_route, "/stats": stats_route},
    _not_found,
    channels.shutdown,
)
