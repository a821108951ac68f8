from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis_helpers import delete_prefix, unique_prefix


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A Redis key prefix of this test's own; every key under it is deleted afterwards."""
    prefix = unique_prefix()
    yield prefix
    await delete_prefix(prefix)
