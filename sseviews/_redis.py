"""What the Redis backend and the Redis store share: the client, its errors, its name,
the names of a group's keys, and the contract of a group's live channel.

The live channel contract: each group has one channel, `live_channel(prefix,
group)`, and each message on it is `live_message(seq, wire)`, published from
Python (the backend's `deliver`) or from a Lua script (a `RedisStore` with
`publish=True`, presence announcements), which gets the same contract from
`LUA_LIVE`.

Imported only by `sseviews.backends.redis` and `sseviews.stores.redis`, which need
the `redis` extra.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

import redis.asyncio
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from ._exceptions import BackendError
from ._reserved import JOIN_EVENT, LEAVE_EVENT

__all__ = [
    "CLUSTER_SCHEMES",
    "LUA_LIVE",
    "REDIS_ERRORS",
    "REDIS_SCHEMES",
    "ClusterScript",
    "ClusterURL",
    "SentinelURL",
    "check_cluster",
    "check_not_cluster",
    "close_client",
    "cluster_node_error",
    "cluster_pool_size",
    "describe",
    "group_key",
    "live_channel",
    "live_channel_base",
    "live_message",
    "open_client",
    "open_cluster_client",
    "parse_cluster_url",
    "parse_live_message",
    "parse_sentinel_url",
    "redis_errors",
]

logger = logging.getLogger("sseviews.redis")

#: What a lost or failing Redis raises; builtin ConnectionError is an OSError.
#: RedisClusterException (no RedisError) is what a cluster client raises when no
#: node answers or the slot map does not cover a slot (a failover in progress).
REDIS_ERRORS = (RedisError, OSError, TimeoutError, RedisClusterException)
_URL_SCHEMES = ("redis", "rediss", "unix")
_Client = TypeVar("_Client", redis.asyncio.Redis, redis.asyncio.RedisCluster)
_ESCAPE = str.maketrans({"%": "%25", ":": "%3A", "{": "%7B", "}": "%7D"})


def group_key(prefix: str, kind: str, group: str) -> str:
    """Return the name of one of `group`'s Redis keys or channels:
    `{prefix}:{kind}:{<escaped group>}`.

    The escaped group holds no `:`, `{` or `}`, so the name's last `:` ends the
    prefix and no two (prefix, group) pairs share a name. The braces are a hash
    tag: on Redis Cluster every key and the channel of a group share its slot.
    """
    return f"{prefix}:{kind}:{{{group.translate(_ESCAPE)}}}"


def live_channel(prefix: str, group: str) -> str:
    """Return the name of `group`'s live channel, in the slot of the group's keys."""
    return group_key(prefix, "live", group)


def live_channel_base(prefix: str) -> str:
    """Return what `LUA_LIVE`'s `live_channel` puts before a group's escaped name."""
    return f"{prefix}:live:"


def live_message(seq: int, wire: bytes) -> bytes:
    """Return the message that carries event `seq` (0: ephemeral) on a live channel."""
    return b"%d\0%s" % (seq, wire)


def parse_live_message(body: bytes) -> tuple[int, bytes]:
    """Split a live channel's message into its seq and wire.

    Raises:
        ValueError: The message does not start with a seq.
    """
    seq, _, wire = body.partition(b"\0")
    return int(seq), wire


def _lua_string(text: str) -> str:
    if "'" in text or "\\" in text:
        raise ValueError(f"cannot quote {text!r} as a plain Lua string")
    return f"'{text}'"


#: The live channel contract in Lua, to prepend to a script that publishes on it:
#: `live_channel(base, group)` with `base` from `live_channel_base(prefix)`,
#: `live_message(seq, wire)`, and `live_event(name, data)` for an
#: ephemeral event, with `JOIN_EVENT` and `LEAVE_EVENT` as `_reserved` names them.
LUA_LIVE = (
    f"local JOIN_EVENT, LEAVE_EVENT = {_lua_string(JOIN_EVENT)}, {_lua_string(LEAVE_EVENT)}\n"
    + r"""
local function live_channel(base, group)
  local escaped = string.gsub(group, '[%%:{}]',
    {['%'] = '%25', [':'] = '%3A', ['{'] = '%7B', ['}'] = '%7D'})
  return base .. '{' .. escaped .. '}'
end

local function live_message(seq, wire)
  return seq .. '\0' .. wire
end

local function live_event(event, data)
  return live_message('0', 'event: ' .. event .. '\ndata: ' .. data .. '\n\n')
end
"""
)


_SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: The URL schemes of a Redis Cluster (`open_cluster_client`).
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
#: Every URL scheme `open_client` and `open_cluster_client` accept.
REDIS_SCHEMES = (*_URL_SCHEMES, *_SENTINEL_SCHEMES, *CLUSTER_SCHEMES)
_SENTINEL_EXAMPLE = "'redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/0'"
_SENTINEL_PORT = 26379
# Query parameters of a Sentinel URL: name -> how to read the value.
_FLOAT_OPTIONS = ("socket_timeout", "socket_connect_timeout")
_STR_OPTIONS = ("sentinel_username", "sentinel_password", "ssl_ca_certs", "ssl_cert_reqs")


@dataclass
class SentinelURL:
    """A parsed `redis+sentinel://` URL."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse `redis[s]+sentinel://[user:password@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB]`.

    The user and password are the Redis servers'; give the sentinels' as the
    `sentinel_username` and `sentinel_password` query parameters. A port left out
    is 26379. Other query parameters: `socket_timeout`, `socket_connect_timeout`
    (seconds), and with `rediss+sentinel://` `ssl_ca_certs` and `ssl_cert_reqs`.

    Raises:
        ValueError: The URL is malformed; the message says which part.
    """
    parts, username, password, bad = _split_url(
        url, _SENTINEL_SCHEMES, "Sentinel", _SENTINEL_EXAMPLE
    )
    hostlist = parts.netloc.rpartition("@")[2]
    sentinels = [_sentinel_address(host, bad) for host in hostlist.split(",")]
    path = [unquote(segment) for segment in parts.path.split("/")[1:]]
    if path and path[-1] == "":
        path.pop()  # a trailing slash
    if not path or not path[0]:
        raise bad("no service name")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise bad("a path other than /SERVICE_NAME or /SERVICE_NAME/DB")
    tls, options = _url_options(parts, "rediss+sentinel", _FLOAT_OPTIONS, _STR_OPTIONS, bad)
    db = int(path[1]) if len(path) == 2 else 0
    return SentinelURL(sentinels, path[0], db, tls, username, password, options)


_CLUSTER_EXAMPLE = "'redis+cluster://10.0.0.1:6379,10.0.0.2:6379/'"
_CLUSTER_FLOAT_OPTIONS = ("socket_timeout", "socket_connect_timeout")
_CLUSTER_STR_OPTIONS = ("ssl_ca_certs", "ssl_cert_reqs")


@dataclass
class ClusterURL:
    """A parsed `redis+cluster://` URL."""

    nodes: list[tuple[str, int]]
    tls: bool = False
    username: str | None = None
    password: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def parse_cluster_url(url: str) -> ClusterURL:
    """Parse `redis[s]+cluster://[user:password@]HOST[:PORT][,HOST[:PORT]...][/]`.

    The nodes are where the client first asks for the cluster's slot map: list a
    few, any of them will do. A port left out is 6379. A cluster has only
    database 0, so the path is empty or `/`. Query parameters: `socket_timeout`,
    `socket_connect_timeout` (seconds), and with `rediss+cluster://`
    `ssl_ca_certs` and `ssl_cert_reqs`.

    Raises:
        ValueError: The URL is malformed; the message says which part.
    """
    parts, username, password, bad = _split_url(
        url, CLUSTER_SCHEMES, "Redis Cluster", _CLUSTER_EXAMPLE
    )
    hostlist = parts.netloc.rpartition("@")[2]
    nodes = [_address(host, bad, 6379, "node") for host in hostlist.split(",")]
    if parts.path not in ("", "/"):
        raise bad("a path (a cluster has only database 0: end the URL with / or nothing)")
    tls, options = _url_options(
        parts, "rediss+cluster", _CLUSTER_FLOAT_OPTIONS, _CLUSTER_STR_OPTIONS, bad
    )
    return ClusterURL(nodes, tls, username, password, options)


def open_cluster_client(
    url_or_client: str | redis.asyncio.RedisCluster,
) -> tuple[redis.asyncio.RedisCluster, bool]:
    """Return (client, owned) for a `redis+cluster://` URL or a ready cluster client.

    The client never retries a command that failed with a connection error or a
    timeout: a script that appended an event may have run before the connection
    broke, and running it again would append the event twice. A MOVED or ASK
    redirection is still followed: the node refused the command, so it did not run.

    Raises:
        ValueError: A malformed URL.
        TypeError: Neither a str nor a `redis.asyncio.RedisCluster`.
    """
    given = _ready_client(url_or_client, redis.asyncio.RedisCluster, "redis+cluster://")
    if given is not None:
        return given, False
    assert isinstance(url_or_client, str)
    parsed = parse_cluster_url(url_or_client)
    options: dict[str, Any] = dict(parsed.options)
    if parsed.tls:
        options["ssl"] = True
    client = redis.asyncio.RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
        username=parsed.username,
        password=parsed.password,
        retry=Retry(NoBackoff(), 0),
        protocol=2,
        max_connections=MAX_CONNECTIONS,
        **options,
    )
    return client, True


def _split_url(
    url: str, schemes: Sequence[str], kind: str, example: str
) -> tuple[SplitResult, str | None, str | None, Callable[[str], ValueError]]:
    """Check a Sentinel or Cluster URL's scheme and split it.

    Returns the split URL, the user and password, and a
    function that makes the ValueError for a bad part (with the password hidden).
    """
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme not in schemes:
        raise ValueError(f"expected a {kind} URL such as {example}")
    userinfo, at, _ = rest.split("/", 1)[0].rpartition("@")
    shown = url.replace(userinfo + at, "***@", 1) if at else url

    def bad(what: str) -> ValueError:
        return ValueError(f"{what} in {kind} URL {shown!r}: expected {example}")

    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unbalanced [ or ]
        raise bad(f"a malformed IPv6 address ({exc})") from None
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    return parts, username, password, bad


def _url_options(
    parts: SplitResult,
    tls_scheme: str,
    float_options: Sequence[str],
    str_options: Sequence[str],
    bad: Callable[[str], ValueError],
) -> tuple[bool, dict[str, Any]]:
    """Whether the URL asks for TLS, and its query parameters.

    `float_options` take seconds > 0, `str_options` text; the TLS options need
    `tls_scheme`. A #fragment is refused.
    """
    if parts.fragment:
        raise bad("a #fragment")
    options: dict[str, Any] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in float_options:
            try:
                seconds = float(value)
            except ValueError:
                seconds = 0.0
            if not seconds > 0:
                raise bad(f"{name}={value!r} (not a number of seconds > 0)")
            options[name] = seconds
        elif name in str_options:
            options[name] = value
        else:
            known = ", ".join((*float_options, *str_options))
            raise bad(f"an unknown query parameter {name!r} (known: {known})")
    tls = parts.scheme == tls_scheme
    if not tls and ("ssl_ca_certs" in options or "ssl_cert_reqs" in options):
        raise bad(f"ssl_ca_certs or ssl_cert_reqs without {tls_scheme}://")
    if options.get("ssl_cert_reqs", "required") not in ("none", "optional", "required"):
        raise bad("ssl_cert_reqs other than none, optional or required")
    return tls, options


def _sentinel_address(host: str, bad: Any) -> tuple[str, int]:
    return _address(host, bad, _SENTINEL_PORT, "sentinel")


def _address(host: str, bad: Any, default_port: int, what: str) -> tuple[str, int]:
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise bad(f"a malformed IPv6 address {host!r}")
        port_text = rest[1:]
    else:
        name, _, port_text = host.partition(":")
    if not name:
        raise bad(f"an empty {what} host")
    if not port_text:
        return name, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise bad(f"a bad port in {host!r}")
    return name, int(port_text)


def _sentinel_client(url: str) -> redis.asyncio.Redis:
    parsed = parse_sentinel_url(url)
    options = dict(parsed.options)
    sentinel_auth = {
        "username": options.pop("sentinel_username", None),
        "password": options.pop("sentinel_password", None),
    }
    common: dict[str, Any] = {**options, "protocol": 2}
    if parsed.tls:
        common["ssl"] = True
    sentinel = Sentinel(
        parsed.sentinels,
        sentinel_kwargs={**common, **sentinel_auth, "retry": Retry(NoBackoff(), 0)},
    )
    # The master's pool asks the sentinels for the master's address on every
    # new connection, so connections made after a failover reach the new master.
    client: redis.asyncio.Redis = sentinel.master_for(
        parsed.service,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        retry=Retry(NoBackoff(), 0),
        **common,
    )
    return client


#: Most connections that a client made from a URL opens; more concurrent
#: commands wait for one (`?max_connections=N` in the URL changes it).
MAX_CONNECTIONS = 64
#: Seconds a command waits for a free connection before it fails (BackendError).
POOL_TIMEOUT = 10.0


def _ready_client(
    url_or_client: object, client_class: type[_Client], scheme: str
) -> _Client | None:
    """The ready client given, or None for a URL (a str).

    Raises:
        TypeError: Neither a str nor a `client_class`.
    """
    if isinstance(url_or_client, client_class):
        return url_or_client
    if not isinstance(url_or_client, str):
        raise TypeError(
            f"expected a {scheme} URL or a redis.asyncio.{client_class.__name__} client, "
            f"got {type(url_or_client).__name__}"
        )
    return None


# Returns (client, owned): a client made from a URL is ours to close.
def open_client(url_or_client: str | redis.asyncio.Redis) -> tuple[redis.asyncio.Redis, bool]:
    given = _ready_client(url_or_client, redis.asyncio.Redis, "redis://")
    if given is not None:
        return given, False
    assert isinstance(url_or_client, str)
    scheme = url_or_client.partition("://")[0].lower()
    if scheme in CLUSTER_SCHEMES:
        raise ValueError(
            f"a {scheme}:// URL names a Redis Cluster: give it to Broadcast(), or use "
            "RedisClusterBackend (sseviews.backends.redis_cluster) for the live layer"
        )
    if scheme in _SENTINEL_SCHEMES:
        return _sentinel_client(url_or_client), True
    if urlsplit(url_or_client).scheme not in _URL_SCHEMES:
        raise ValueError(
            "expected a Redis URL such as 'redis://127.0.0.1:6379/0' or "
            f"{_SENTINEL_EXAMPLE}, got {url_or_client!r}"
        )
    # No automatic retries: a retried script could append an event twice, and
    # an unreachable Redis must fail fast with BackendError. RESP2, because with
    # RESP3 redis-py 8 enables maintenance notifications and then stops checking
    # pooled connections, so the first command after a Redis restart would fail;
    # with RESP2 the pool replaces connections that the server closed.
    # A bounded pool that makes a command wait for a free connection: redis-py's
    # default pool refuses the 101st concurrent command ("Too many connections"),
    # so a burst of publishes would fail. `?max_connections=` in the URL overrides.
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url_or_client,
        retry=Retry(NoBackoff(), 0),
        protocol=2,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_TIMEOUT,
    )
    client = redis.asyncio.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client, True


async def close_client(client: redis.asyncio.Redis | redis.asyncio.RedisCluster) -> None:
    """Close a client made by `open_client` (and its sentinels' clients if it has any)
    or by `open_cluster_client`."""
    await client.aclose()
    if isinstance(client, redis.asyncio.RedisCluster):
        return
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        await pool.sentinel_manager.aclose()


async def check_not_cluster(client: redis.asyncio.Redis, where: str) -> None:
    """Refuse a Redis Cluster node: a plain client reaches only the keys of its own slots.

    Raises:
        BackendError: `client` is connected to a node with cluster mode enabled.
    """
    try:
        info = await client.info("cluster")
    except ResponseError:  # INFO refused (a restricted managed Redis): nothing to tell
        return
    if str(info.get("cluster_enabled", "0")) == "1":
        raise cluster_node_error(where)


def cluster_node_error(where: str) -> BackendError:
    """The error for a plain Redis URL or client that reaches a Redis Cluster node."""
    return BackendError(
        f"{where} is a Redis Cluster node: connect to the cluster with a "
        "redis+cluster://host:port[,host:port...]/ URL (rediss+cluster:// for TLS), "
        "not redis://"
    )


def cluster_pool_size(client: redis.asyncio.RedisCluster) -> int:
    """How many commands may run at once on `client` without one failing for want of
    a connection: redis-py's cluster pools refuse a command beyond their size
    (`MaxConnectionsError`) instead of making it wait, so callers hold a semaphore
    of this size around each command."""
    sizes = [
        size
        for node in client.get_nodes()
        if isinstance(size := getattr(node, "max_connections", None), int) and size > 0
    ]
    return min(sizes, default=MAX_CONNECTIONS)


class ClusterScript:
    """A Lua script run on the master of its keys' slot only.

    redis-py's `Script` loads a missing script on every master (`SCRIPT LOAD`), so
    one master down (a failover) would fail the scripts of every group. This one
    runs `EVALSHA` on the keys' master and, when that master does not know the
    script (`NOSCRIPT`: it did not run), `EVAL` there, which caches it.

    Args:
        client: The cluster client.
        source: The script.
        limiter: Held around each call, if given (see `cluster_pool_size`).
    """

    def __init__(self, client: Any, source: str, limiter: asyncio.Semaphore | None = None) -> None:
        self._client = client
        self._source = source
        self._sha = hashlib.sha1(source.encode()).hexdigest()
        self._limiter = limiter

    async def __call__(self, *, keys: list[str], args: list[Any]) -> Any:
        if self._limiter is None:
            return await self._run(keys, args)
        async with self._limiter:
            return await self._run(keys, args)

    async def _run(self, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._client.evalsha(self._sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self._client.eval(self._source, len(keys), *keys, *args)

    async def pipelined(self, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run the script once per `(keys, args)` call, in one cluster pipeline (each
        master's share in one round trip), and return the replies in order: a call
        that failed has its exception as its reply.

        The calls a master refused with `NOSCRIPT` run again with `EVAL`, each on its
        own master, so a master down fails its own calls only.
        """
        replies = await self._pipeline(calls, self._sha)
        refused = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if refused:
            again = await self._pipeline([calls[i] for i in refused], None)
            for i, reply in zip(refused, again, strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(
        self, calls: Sequence[tuple[list[str], list[Any]]], sha: str | None
    ) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for keys, args in calls:
            if sha is None:
                pipe.eval(self._source, len(keys), *keys, *args)
            else:
                pipe.evalsha(sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies


async def check_cluster(client: redis.asyncio.RedisCluster, where: str) -> None:
    """Load the cluster's slot map, refusing a server that is no cluster node.

    Raises:
        BackendError: The nodes cannot be reached, or are not in cluster mode.
    """
    try:
        await client.initialize()
    except RedisClusterException as exc:
        if "not enabled" in str(exc).lower():
            raise BackendError(
                f"{where}: the server is not a Redis Cluster node (cluster mode is not "
                "enabled); use a redis://host:port/db URL for a single Redis"
            ) from exc
        raise BackendError(f"connecting to {where} failed: {exc}") from exc
    except REDIS_ERRORS as exc:
        raise BackendError(f"connecting to {where} failed: {exc}") from exc


# Where the client connects, for messages: never the URL, which may hold a password.
def describe(client: redis.asyncio.Redis | redis.asyncio.RedisCluster) -> str:
    if isinstance(client, redis.asyncio.RedisCluster):
        hosts = ",".join(f"{node.host}:{node.port}" for node in client.get_nodes())
        return f"Redis Cluster (nodes {hosts})"
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        hosts = ",".join(
            "{host}:{port}".format(**sentinel.connection_pool.connection_kwargs)
            for sentinel in pool.sentinel_manager.sentinels
        )
        return f"Redis Sentinel service {pool.service_name!r} (sentinels {hosts})"
    kwargs = pool.connection_kwargs
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
