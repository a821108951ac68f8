from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("interop_harness")

from interop_harness import InteropServer, running_server  # noqa: E402


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InteropServer]:
    """One server for the interop tests that do not restart it."""
    with running_server(tmp_path_factory.mktemp("interop")) as instance:
        yield instance
