from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from support.postgres import drop_tables
from support.redis import delete_prefix, unique_prefix

# The real Redis topologies (Sentinel, Cluster) and their fixtures.
pytest_plugins = ["support.redis_topology"]

# The core's tests run on both backends anyio supports: a stream must run the same
# way on each. Other modules (servers, databases, browsers) run on asyncio.
BOTH_BACKENDS = {
    "test_broadcast",
    "test_metrics",
    "test_testing",
    "test_views_broadcast",
    "test_views_disconnect",
    "test_views_events",
    "test_views_hooks",
    "test_views_last_event_id",
    "test_views_limits",
    "test_views_pings",
    "test_views_resources",
    "test_views_response",
    "test_views_sessions",
    "test_views_shutdown",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "anyio_backend" not in metafunc.fixturenames:
        return
    if metafunc.module.__name__ not in BOTH_BACKENDS:
        return
    if metafunc.definition.get_closest_marker("asyncio_only") is not None:
        return
    metafunc.parametrize("anyio_backend", ["asyncio", "trio"])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def http(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the servers a test starts. Its timeout is the test module's
    `HTTP_TIMEOUT` (an `httpx.Timeout` or seconds), 5 s if it has none."""
    timeout = getattr(request.module, "HTTP_TIMEOUT", 5.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        yield client


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A Redis key prefix of this test's own; every key under it is deleted afterwards."""
    prefix = unique_prefix()
    yield prefix
    await delete_prefix(prefix)


@pytest.fixture
async def pg_prefix() -> AsyncIterator[str]:
    """A PostgreSQL table and channel prefix of this test's own (the `test` database on
    127.0.0.1); every table under it is dropped afterwards."""
    value = f"t{uuid.uuid4().hex[:12]}"
    yield value
    await drop_tables(value)
