"""httpx-sse and sseclient-py (over urllib3) against a real uvicorn serving sseviews.

Neither reconnects by itself: each loop below is the reconnect loop their READMEs
leave to the user, resending the last id seen as `Last-Event-ID` after the server's
`retry:` delay.
"""

from __future__ import annotations

import functools
import socket
from pathlib import Path

import httpx
import pytest
import sseclient
import urllib3
from httpx_sse import SSEError, connect_sse
from interop_harness import (
    InteropServer,
    StartClient,
    ThreadRun,
    check_parsing,
    check_pings_dispatch_nothing,
    check_reset_event,
    check_resume,
    events_of,
    wait_for,
)

pytestmark = pytest.mark.slow

READ_TIMEOUT = 10.0  # a blocked read gives up once its server is gone, at the latest


def _httpx_sse(url: str, run: ThreadRun) -> None:
    headers: dict[str, str] = {}
    delay = 1.0
    with httpx.Client(timeout=httpx.Timeout(5.0, read=READ_TIMEOUT)) as client:
        while not run.stopped.is_set():
            try:
                with connect_sse(client, "GET", url, headers=headers) as source:
                    # response.close() would not wake a read blocked in another thread.
                    sock = source.response.extensions["network_stream"].get_extra_info("socket")
                    run.interrupt = functools.partial(sock.shutdown, socket.SHUT_RDWR)
                    status = source.response.status_code
                    run.add({"type": "open", "status": status})
                    for sse in source.iter_sse():
                        run.add(
                            {
                                "type": "event",
                                "event": sse.event,
                                "data": sse.data,
                                "id": sse.id,
                                "retry": sse.retry,
                            }
                        )
                        if sse.id:
                            headers["Last-Event-ID"] = sse.id
                        if sse.retry is not None:
                            delay = sse.retry / 1000
            except SSEError as exc:  # not text/event-stream: a refusal, final
                run.add({"type": "error", "status": status, "error": str(exc)})
                run.add({"type": "closed"})
                return
            except (httpx.TransportError, httpx.StreamClosed) as exc:
                run.add({"type": "error", "status": None, "error": repr(exc)})
            run.stopped.wait(delay)


def _sseclient(url: str, run: ThreadRun) -> None:
    headers: dict[str, str] = {"Accept": "text/event-stream"}
    delay = 1.0
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5.0, read=READ_TIMEOUT))
    while not run.stopped.is_set():
        try:
            response = http.request("GET", url, preload_content=False, headers=headers)
            run.interrupt = response.shutdown  # made to be called from another thread
            run.add({"type": "open", "status": response.status})
            if response.status != 200:  # sseclient-py leaves the status to its user
                run.add({"type": "error", "status": response.status})
                run.add({"type": "closed"})
                return
            for event in sseclient.SSEClient(response).events():
                run.add(
                    {
                        "type": "event",
                        "event": event.event,
                        "data": event.data,
                        "id": event.id,
                        "retry": event.retry,
                    }
                )
                if event.id:
                    headers["Last-Event-ID"] = event.id
                if event.retry:
                    delay = int(event.retry) / 1000
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            run.add({"type": "error", "status": None, "error": repr(exc)})
        run.stopped.wait(delay)
    http.clear()


CLIENTS: dict[str, StartClient] = {
    "httpx-sse": lambda url: ThreadRun(_httpx_sse, url),
    "sseclient-py": lambda url: ThreadRun(_sseclient, url),
}


@pytest.fixture(params=sorted(CLIENTS))
def start(request: pytest.FixtureRequest) -> StartClient:
    return CLIENTS[request.param]


def test_interop_python_client_parses_every_field(
    start: StartClient, server: InteropServer
) -> None:
    check_parsing(start, server, exposes_retry=True)


def test_interop_python_client_sees_no_ping(start: StartClient, server: InteropServer) -> None:
    check_pings_dispatch_nothing(start, server)


def test_interop_python_client_gets_reset_event(start: StartClient, server: InteropServer) -> None:
    check_reset_event(start, server)


@pytest.mark.parametrize("status", [401, 403, 204])
def test_interop_python_client_sees_refusal_status(
    start: StartClient, server: InteropServer, status: int
) -> None:
    run = start(f"{server.base}/refuse/{status}")
    try:
        records = wait_for(run, lambda r: r[-1:] == [{"type": "closed"}], "the refusal")
    finally:
        run.close()
    assert events_of(records) == []
    assert [r["status"] for r in records if r["type"] == "error"] == [status]


def test_interop_python_clients_resume_after_drop_and_restart(tmp_path: Path) -> None:
    check_resume(CLIENTS, tmp_path)
