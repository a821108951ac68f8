"""Redis URLs and topologies at connect (`sseviews/_redis.py`): `redis+sentinel://`
URLs are parsed where they enter, and a plain `redis://` URL that reaches a Redis
Cluster node is refused with an error naming `redis+cluster://`."""

from __future__ import annotations

import anyio
import pytest
from redis.asyncio.sentinel import (
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from support.redis_topology import RedisCluster

from sseviews import BackendError, Broadcast
from sseviews._redis import SentinelURL, open_client, parse_sentinel_url
from sseviews.backends.redis import RedisBackend
from sseviews.stores.redis import RedisStore

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://10.0.0.1:26379,10.0.0.2:26380/mymaster/2",
            SentinelURL([("10.0.0.1", 26379), ("10.0.0.2", 26380)], "mymaster", 2),
        ),
        (
            "redis+sentinel://sentinel/mymaster",
            SentinelURL([("sentinel", 26379)], "mymaster", 0),
        ),
        (
            "redis+sentinel://[::1]:5000,[::1]/my%20master/",
            SentinelURL([("::1", 5000), ("::1", 26379)], "my master", 0),
        ),
        (
            "rediss+sentinel://app:s%40cret@h:1/m?socket_timeout=2.5&ssl_cert_reqs=none"
            "&sentinel_password=x",
            SentinelURL(
                [("h", 1)],
                "m",
                0,
                tls=True,
                username="app",
                password="s@cret",
                options={"socket_timeout": 2.5, "ssl_cert_reqs": "none", "sentinel_password": "x"},
            ),
        ),
        (
            "redis+sentinel://:pw@h:1/m/0",
            SentinelURL([("h", 1)], "m", 0, password="pw"),
        ),
    ],
)
def test_redis_sentinel_url_parses(url: str, expected: SentinelURL) -> None:
    assert parse_sentinel_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h:1", "no service name"),
        ("redis+sentinel://h:1/", "no service name"),
        ("redis+sentinel://h:1/m/x", "a path other than"),
        ("redis+sentinel://h:1/m/0/extra", "a path other than"),
        ("redis+sentinel://h:1,,h:2/m", "an empty sentinel host"),
        ("redis+sentinel://h:port/m", "a bad port"),
        ("redis+sentinel://h:70000/m", "a bad port"),
        ("redis+sentinel://[::1/m", "a malformed IPv6 address"),
        ("redis+sentinel://h/m?socket_timeout=soon", "socket_timeout='soon'"),
        ("redis+sentinel://h/m?socket_timeout=0", "socket_timeout='0'"),
        ("redis+sentinel://h/m?retries=3", "unknown query parameter 'retries'"),
        ("redis+sentinel://h/m?ssl_ca_certs=/ca.pem", "without rediss+sentinel"),
        ("rediss+sentinel://h/m?ssl_cert_reqs=maybe", "ssl_cert_reqs other than"),
        ("redis+sentinel://h/m#frag", "a #fragment"),
    ],
)
def test_redis_sentinel_url_malformed_raises_value_error(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="expected 'redis\\+sentinel://") as info:
        parse_sentinel_url(url)
    assert message in str(info.value)


def test_redis_sentinel_url_error_hides_the_password() -> None:
    with pytest.raises(ValueError) as info:
        Broadcast("redis+sentinel://user:hunter2@h:1/")
    assert "hunter2" not in str(info.value)
    assert "***@h:1" in str(info.value)


def test_redis_sentinel_url_enters_through_broadcast() -> None:
    broadcast = Broadcast("redis+sentinel://127.0.0.1:1,127.0.0.1:2/svc/3", prefix="p")
    assert isinstance(broadcast.live, RedisBackend)
    assert isinstance(broadcast.store, RedisStore)
    # Redis live and Redis history: one atomic script stores and publishes.
    assert broadcast.store.publish
    for where in (broadcast.live._where, broadcast.store._where):
        assert where == "Redis Sentinel service 'svc' (sentinels 127.0.0.1:1,127.0.0.1:2)"
    with pytest.raises(ValueError, match="no service name"):
        Broadcast("redis+sentinel://127.0.0.1:1")
    with pytest.raises(ValueError, match="no service name"):
        Broadcast("memory://", history="redis+sentinel://127.0.0.1:1")


def test_redis_sentinel_client_follows_the_master_without_retries() -> None:
    client, owned = open_client("rediss+sentinel://u:p@127.0.0.1:1/svc/4?socket_timeout=3")
    assert owned
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "svc" and pool.is_master
    assert pool.connection_class is SentinelManagedSSLConnection
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (4, "u", "p")
    assert kwargs["socket_timeout"] == 3.0 and kwargs["protocol"] == 2
    # No retries: a retried script could append an event twice.
    assert kwargs["retry"].get_retries() == 0
    (sentinel,) = pool.sentinel_manager.sentinels
    assert sentinel.connection_pool.connection_kwargs["password"] is None
    plain, _ = open_client("redis+sentinel://127.0.0.1:1/svc")
    assert plain.connection_pool.connection_class is SentinelManagedConnection


async def test_redis_sentinel_unreachable_raises_backend_error() -> None:
    store = RedisStore("redis+sentinel://127.0.0.1:1/svc", prefix="p")
    with anyio.fail_after(5), pytest.raises(BackendError, match="Redis Sentinel service 'svc'"):
        await store.connect()


@pytest.mark.slow
async def test_redis_url_of_a_cluster_node_is_refused_naming_redis_cluster(
    redis_cluster: RedisCluster,
) -> None:
    url = f"redis://127.0.0.1:{redis_cluster.nodes[0].port}/0"
    with anyio.fail_after(10):
        with pytest.raises(BackendError, match=r"redis\+cluster://") as info:
            async with Broadcast(url, prefix="refused"):
                pass
        assert "is a Redis Cluster node" in str(info.value)
        # The live backend alone (history elsewhere) refuses it too.
        backend = RedisBackend(url, prefix="refused")
        with pytest.raises(BackendError, match=r"redis\+cluster://"):
            await backend.connect(lambda group, seq, wire: None, lambda error: None)
        assert not backend.healthy


async def test_redis_url_client_waits_for_a_free_connection_under_a_burst() -> None:
    # redis-py's default pool refuses the 101st concurrent command; a burst of
    # publishes must wait for a connection instead, within a bounded pool.
    from support.redis import REDIS_URL, delete_prefix, unique_prefix

    prefix = unique_prefix()
    broadcast = Broadcast(REDIS_URL, prefix=prefix)
    try:
        with anyio.fail_after(30):
            async with broadcast:
                ids: list[str] = []

                async def publish(n: int) -> None:
                    ids.append(await broadcast.publish("burst", {"n": n}))

                async with anyio.create_task_group() as tg:
                    for n in range(300):
                        tg.start_soon(publish, n)
                assert len(set(ids)) == 300
                pool = broadcast.store._client.connection_pool  # type: ignore[attr-defined]
                assert pool.max_connections == 64
    finally:
        await delete_prefix(prefix)


def test_redis_url_max_connections_can_be_set_in_the_url() -> None:
    client, owned = open_client("redis://127.0.0.1:6379/0?max_connections=200")
    assert owned
    assert client.connection_pool.max_connections == 200


def test_redis_history_named_like_the_live_url_is_fused_with_it() -> None:
    # The same Redis given twice publishes from the append script, as the default
    # does (ids reach every process in order); another Redis does not.
    url = "redis://127.0.0.1:6379/0"
    assert Broadcast(url, history=url, retention=50).store.publish
    store = Broadcast(url, history="redis://127.0.0.1:6379/1").store
    assert isinstance(store, RedisStore)
    assert not store.publish
