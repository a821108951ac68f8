"""A live backend on Redis pub/sub: every process subscribes to `{prefix}:live`.

Each message is `group \\0 seq \\0 wire`. A `RedisStore` created with
`publish=True` publishes it from the script that assigns the seq, so every
process receives events in id order; `deliver` publishes it for stores that
assign ids elsewhere (SQL).

A backend holds one pub/sub connection of its own and one reader task, which
parses each message and calls `dispatch` in order. When the connection is lost it
calls `on_failure`, then reconnects with backoff and subscribes again.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import anyio
import redis.asyncio
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .._exceptions import BackendError
from .._redis import REDIS_ERRORS, describe, open_client, redis_errors
from .base import Dispatch, LiveBackend, OnFailure

__all__ = ["RedisBackend"]

logger = logging.getLogger("sseviews.redis")


class RedisBackend(LiveBackend):
    """Carries events between processes with Redis pub/sub.

    Args:
        url_or_client: A `redis://host:port/db` URL, or a ready
            `redis.asyncio.Redis` client (which the backend does not close).
        prefix: Prefix of the pub/sub channel; use the prefix of the `RedisStore`.

    Raises:
        ValueError: A bad URL or prefix.
        TypeError: `url_or_client` is neither a str nor a Redis client.
    """

    #: First pause before reconnecting after the connection was lost, in seconds.
    first_retry_delay = 0.1
    #: Longest pause between two reconnection attempts, in seconds.
    max_retry_delay = 2.0
    #: Bound on one reconnection attempt (connect and subscribe), in seconds.
    attempt_timeout = 5.0

    def __init__(
        self, url_or_client: str | redis.asyncio.Redis, *, prefix: str = "sseviews"
    ) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty str, got {prefix!r}")
        self._client, self._owned = open_client(url_or_client)
        self.prefix = prefix
        self._channel = f"{prefix}:live".encode()
        self._where = describe(self._client)
        self._task: asyncio.Task[None] | None = None
        self._conn: AbstractConnection | None = None
        self._healthy = False

    @property
    def healthy(self) -> bool:
        """False before `connect`, after `disconnect`, and while reconnecting."""
        return self._healthy

    async def connect(self, dispatch: Dispatch, on_failure: OnFailure) -> None:
        """Subscribe, and start calling `dispatch` for every event published.

        Raises:
            BackendError: Redis cannot be reached.
            RuntimeError: The backend is already connected.
        """
        if self._task is not None:
            raise RuntimeError("this RedisBackend is already connected")
        try:
            with redis_errors(f"subscribing to {self._where}"):
                conn = await self._subscribe()
        except BaseException:
            if self._owned:
                with anyio.move_on_after(1, shield=True):
                    await self._client.aclose()
            raise
        self._conn = conn
        self._healthy = True
        self._task = asyncio.get_running_loop().create_task(
            self._run(conn, dispatch, on_failure), name=f"sseviews redis reader {self.prefix}"
        )

    async def disconnect(self) -> None:
        """Stop the reader, unsubscribe, and close the client if made from a URL."""
        task, self._task = self._task, None
        self._healthy = False
        # Runs even if the caller is cancelled, and ends within a second.
        with anyio.move_on_after(1, shield=True):
            if task is not None:
                task.cancel()
                await asyncio.wait({task})
            conn, self._conn = self._conn, None
            if conn is not None:
                await conn.disconnect(nowait=True)
            if self._owned:
                await self._client.aclose()

    async def deliver(self, group: str, seq: int, wire: bytes) -> None:
        """Publish one stored event to every process.

        Raises:
            BackendError: Redis cannot be reached.
        """
        payload = b"%s\0%d\0%s" % (group.encode(), seq, wire)
        with redis_errors(f"publishing to {self._where}"):
            await self._client.publish(self._channel, payload)

    # -- the pub/sub connection ------------------------------------------------------

    def _new_connection(self) -> AbstractConnection:
        pool = self._client.connection_pool
        kwargs: dict[str, Any] = {
            **pool.connection_kwargs,
            # A silent reconnect would resubscribe over a gap: this backend
            # reconnects itself, after telling the broadcast with on_failure.
            "retry": Retry(NoBackoff(), 0),
            "retry_on_error": [],
            "retry_on_timeout": False,
            "health_check_interval": 0,
            "decode_responses": False,
        }
        if issubclass(pool.connection_class, Connection):
            # Notice a peer that vanished without closing the socket.
            kwargs["socket_keepalive"] = True
        conn: AbstractConnection = pool.connection_class(**kwargs)
        return conn

    # Returns a new connection once Redis has confirmed the subscription, so
    # that any event published from then on reaches it.
    async def _subscribe(self) -> AbstractConnection:
        conn = self._new_connection()
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
            await conn.send_command("SUBSCRIBE", self._channel, check_health=False)
            while True:
                reply = await conn.read_response(disable_decoding=True, push_request=True)
                if isinstance(reply, list) and reply[:2] == [b"subscribe", self._channel]:
                    return conn
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.disconnect(nowait=True)
            raise

    async def _run(
        self, conn: AbstractConnection, dispatch: Dispatch, on_failure: OnFailure
    ) -> None:
        try:
            while True:
                try:
                    await self._read(conn, dispatch)
                except REDIS_ERRORS as exc:
                    error: Exception = exc
                except Exception as exc:
                    logger.exception("unexpected error reading from %s", self._where)
                    error = exc
                self._healthy = False
                self._conn = None
                await conn.disconnect(nowait=True)
                logger.warning(
                    "lost the subscription to %s (%s); ending live subscribers and reconnecting",
                    self._where,
                    error,
                )
                failure = BackendError(f"lost the connection to {self._where}: {error}")
                failure.__cause__ = error
                try:
                    on_failure(failure)
                except Exception:
                    logger.exception("on_failure callback failed")
                conn = await self._reconnect()
                self._conn = conn
                self._healthy = True
                logger.info("subscribed again to %s", self._where)
        finally:
            with anyio.CancelScope(shield=True):
                await conn.disconnect(nowait=True)

    async def _read(self, conn: AbstractConnection, dispatch: Dispatch) -> None:
        channel = self._channel
        while True:
            # math.inf: block without the client's socket_timeout, as PubSub does.
            reply = await conn.read_response(
                disable_decoding=True, timeout=math.inf, push_request=True
            )
            if (
                isinstance(reply, list)
                and len(reply) == 3
                and reply[0] == b"message"
                and reply[1] == channel
            ):
                try:
                    group, seq, wire = reply[2].split(b"\0", 2)
                    group_name = group.decode()
                    seq_number = int(seq)
                except ValueError:
                    logger.warning("ignoring a malformed message on %r", channel.decode())
                    continue
                try:
                    dispatch(group_name, seq_number, wire)
                except Exception:
                    logger.exception("dispatching event %d of %r failed", seq_number, group_name)

    async def _reconnect(self) -> AbstractConnection:
        delay = self.first_retry_delay
        while True:
            await anyio.sleep(delay)
            try:
                with anyio.fail_after(self.attempt_timeout):
                    return await self._subscribe()
            except REDIS_ERRORS as exc:
                logger.debug("reconnecting to %s failed: %s", self._where, exc)
            except Exception:
                # Keep trying: giving up would leave the backend unhealthy for good.
                logger.exception("unexpected error reconnecting to %s", self._where)
            delay = min(delay * 2, self.max_retry_delay)
