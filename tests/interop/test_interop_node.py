"""The `eventsource` npm package (v4, and v2, a separate code base still widely used) and
`@microsoft/fetch-event-source` under Node, against a real uvicorn serving sseviews.

Each client runs in a small Node script (`*.mjs` here) that prints what the client
dispatches as JSON lines. The packages are installed by `.ci/run` with npm, from
`package.json`, into the git-ignored `node_modules/` here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from interop_harness import (
    EVENT_NAMES,
    InteropServer,
    NodeRun,
    StartClient,
    check_parsing,
    check_pings_dispatch_nothing,
    check_reset_event,
    check_resume,
    events_of,
    wait_for,
)

pytestmark = pytest.mark.slow

NAMES = ",".join(EVENT_NAMES)
CLIENTS: dict[str, StartClient] = {
    "eventsource-v4": lambda url: NodeRun("eventsource_client.mjs", "v4", url, NAMES),
    "eventsource-v2": lambda url: NodeRun("eventsource_client.mjs", "v2", url, NAMES),
    "fetch-event-source": lambda url: NodeRun("fetch_event_source_client.mjs", url),
}
# The status of a refusal, as each client shows it: EventSource-style clients give up
# for good (readyState CLOSED) on any status but 200; fetch-event-source hands the
# response to onopen.
EXPOSES_RETRY = {"fetch-event-source"}


@pytest.fixture(params=sorted(CLIENTS))
def client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_interop_node_client_parses_every_field(client: str, server: InteropServer) -> None:
    check_parsing(CLIENTS[client], server, exposes_retry=client in EXPOSES_RETRY)


def test_interop_node_client_sees_no_ping(client: str, server: InteropServer) -> None:
    check_pings_dispatch_nothing(CLIENTS[client], server)


def test_interop_node_client_gets_reset_event(client: str, server: InteropServer) -> None:
    check_reset_event(CLIENTS[client], server)


@pytest.mark.parametrize("status", [401, 403, 204])
def test_interop_node_client_sees_refusal_status(
    client: str, server: InteropServer, status: int
) -> None:
    run = CLIENTS[client](f"{server.base}/refuse/{status}")
    try:
        records = wait_for(run, lambda r: r[-1:] == [{"type": "closed"}], "the refusal")
    finally:
        run.close()
    assert events_of(records) == []
    if client == "fetch-event-source":
        assert [r["status"] for r in records if r["type"] == "open"] == [status]
    else:
        # One error, with the status, then CLOSED: the client does not reconnect.
        assert [r["status"] for r in records if r["type"] == "error"] == [status]


def test_interop_node_clients_resume_after_drop_and_restart(tmp_path: Path) -> None:
    check_resume(CLIENTS, tmp_path)
