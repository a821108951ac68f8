"""What the Redis backend and the Redis store share: the client, its errors, its name,
and the names of a group's keys and channel.

Imported only by `sseviews.backends.redis` and `sseviews.stores.redis`, which need
the `redis` extra.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ._exceptions import BackendError

__all__ = ["REDIS_ERRORS", "describe", "group_key", "open_client", "redis_errors"]

logger = logging.getLogger("sseviews.redis")

#: What a lost or failing Redis raises; builtin ConnectionError is an OSError.
REDIS_ERRORS = (RedisError, OSError, TimeoutError)
_URL_SCHEMES = ("redis", "rediss", "unix")
_ESCAPE = str.maketrans({"%": "%25", ":": "%3A", "{": "%7B", "}": "%7D"})


def group_key(prefix: str, kind: str, group: str) -> str:
    """Return the name of one of `group`'s Redis keys or channels:
    `{prefix}:{kind}:{<escaped group>}`.

    The escaped group holds no `:`, `{` or `}`, so the name's last `:` ends the
    prefix and no two (prefix, group) pairs share a name. The braces are a hash
    tag: on Redis Cluster every key and the channel of a group share its slot.
    """
    return f"{prefix}:{kind}:{{{group.translate(_ESCAPE)}}}"


# Returns (client, owned): a client made from a URL is ours to close.
def open_client(url_or_client: str | redis.asyncio.Redis) -> tuple[redis.asyncio.Redis, bool]:
    if isinstance(url_or_client, redis.asyncio.Redis):
        return url_or_client, False
    if not isinstance(url_or_client, str):
        raise TypeError(
            "expected a redis:// URL or a redis.asyncio.Redis client, "
            f"got {type(url_or_client).__name__}"
        )
    if urlsplit(url_or_client).scheme not in _URL_SCHEMES:
        raise ValueError(
            f"expected a Redis URL such as 'redis://127.0.0.1:6379/0', got {url_or_client!r}"
        )
    # No automatic retries: a retried script could append an event twice, and
    # an unreachable Redis must fail fast with BackendError. RESP2, because with
    # RESP3 redis-py 8 enables maintenance notifications and then stops checking
    # pooled connections, so the first command after a Redis restart would fail;
    # with RESP2 the pool replaces connections that the server closed.
    client = redis.asyncio.Redis.from_url(url_or_client, retry=Retry(NoBackoff(), 0), protocol=2)
    return client, True


# Where the client connects, for messages: never the URL, which may hold a password.
def describe(client: redis.asyncio.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"Redis at {kwargs['path']}"
    return f"Redis at {kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


# Turns a Redis failure while doing `what` into a logged BackendError.
@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    try:
        yield
    except REDIS_ERRORS as exc:
        logger.warning("%s failed: %s", what, exc)
        raise BackendError(f"{what} failed: {exc}") from exc
