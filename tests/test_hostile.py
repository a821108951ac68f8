"""Hostile and bad input against a real uvicorn (httptools), in a subprocess, on loopback.

The app under test is `tests/apps/hostile_app.py`. Every case sends what a hostile
or broken client would, over a raw socket, and checks three things: the answer
(a clear status, or a closed connection for bytes that are not HTTP), the server's
log, and that the server is still healthy: after each case a new client streams
`/ticks` normally.

What the layers do, measured (uvicorn 0.54, httptools 0.9):

- httptools refuses malformed requests itself (garbage, a bad request line, NUL or
  a lone CR in a header value, a raw non-ASCII byte in the target, a target longer
  than 64 KiB): uvicorn answers `400 Invalid HTTP request received.`, logs that line
  and closes the connection.
- httptools has no limit on header size: a 1 MB header line reaches the app. The
  view refuses a long `Last-Event-ID` itself; other large headers are served.
- Everything that parses as HTTP reaches sseviews, which answers 400 for a
  `Last-Event-ID` that is too long, not UTF-8 or holds NUL, for an id it did not
  issue, for invalid group names and for too many groups.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import httpx
import pytest
from support.processes import clean_env
from support.raw import LenientConnection
from support.servers import ServerProcess, start_server, uvicorn

from sseviews import RESET_EVENT, Event
from sseviews.testing import EventParser

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

REPO = Path(__file__).resolve().parent.parent
APP = "tests.apps.hostile_app:app"
UVICORN = uvicorn(APP, "--http", "httptools")
HOST = "127.0.0.1"
#: Bound on any single answer, read or health check.
TIMEOUT = 2.0
HTTP_TIMEOUT = TIMEOUT
#: The line uvicorn logs for a request httptools cannot parse.
UVICORN_INVALID = "Invalid HTTP request received."


# -- the server process -----------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One uvicorn for the whole module: every case must leave it healthy for the next."""
    tmp = tmp_path_factory.mktemp("hostile")
    with start_server(UVICORN, tmp, clean_env(PYTHONPATH=str(REPO))) as running:
        yield running


async def debug(http: httpx.AsyncClient, server: ServerProcess, tag: str | None = None) -> Any:
    """The app's counters (and the records of stream `tag`)."""
    params = {"id": tag} if tag is not None else {}
    with anyio.fail_after(TIMEOUT):
        response = await http.get(f"{server.base_url}/debug", params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def debug_once(
    http: httpx.AsyncClient, server: ServerProcess, done: Callable[[Any], bool]
) -> Any:
    """The app's counters, once `done(counters)` holds (callers bound the wait)."""
    while True:
        state = await debug(http, server)
        if done(state):
            return state
        await anyio.sleep(0.05)


# -- a raw HTTP/1.1 client ----------------------------------------------------------


@dataclass
class Reply:
    """What the server answered to one raw request."""

    status: int | None  # None: it closed the connection without answering
    headers: dict[str, str]
    body: bytes  # the whole body, or the first chunk of a stream
    closed: bool  # it closed the connection right after answering
    client_port: int

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


async def exchange(server: ServerProcess, request: bytes, *, events: int = 0) -> Reply:
    """Send `request` as raw bytes on a new connection; return the server's answer.

    A stream (a chunked 200) is read up to its first chunk, or until it has carried
    `events` events, then closed.
    """
    with anyio.fail_after(TIMEOUT):
        conn = await LenientConnection.connect(server.port)
        try:
            port = conn.local_port
            await conn.send(request)
            head = await conn.read_head_or_none()
            if head is None:
                return Reply(None, {}, bytes(conn.buffer), True, port)
            if head.headers.get("transfer-encoding") == "chunked":
                parser = EventParser()
                body = await conn.read_chunk()
                parsed = len(parser.feed(body))
                while parsed < events:
                    chunk = await conn.read_chunk()
                    assert chunk, f"the stream ended after {body!r}"
                    parsed += len(parser.feed(chunk))
                    body += chunk
                return Reply(head.status, head.headers, body, False, port)
            body = await conn.read_exactly(int(head.headers.get("content-length", "0")))
            closed = False
            if head.headers.get("connection") == "close":
                assert await conn.read_until_closed() == b""
                closed = True
            return Reply(head.status, head.headers, body, closed, port)
        finally:
            conn.close()


def get(path: str, *headers: tuple[bytes, bytes]) -> bytes:
    """A GET request for `path` (bytes, sent as they are) with extra raw headers."""
    lines = [b"GET " + path.encode("latin-1") + b" HTTP/1.1", b"Host: " + HOST.encode()]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def stream_events(conn: LenientConnection, count: int) -> list[Event]:
    """Read the head (200, event stream) and then `count` events."""
    head = await conn.read_head_or_none()
    assert head is not None, "closed before the response head"
    assert head.status == 200, head
    assert head.headers["content-type"] == "text/event-stream; charset=utf-8"
    parser = EventParser()
    events: list[Event] = []
    while len(events) < count:
        chunk = await conn.read_chunk()
        assert chunk, f"the stream ended after {events}"
        events += parser.feed(chunk)
    return events


async def assert_healthy(server: ServerProcess) -> None:
    """The server process runs and a new client streams `/ticks` normally."""
    assert server.proc.poll() is None, f"the server exited:\n{server.log()}"
    with anyio.fail_after(TIMEOUT):
        conn = await LenientConnection.connect(server.port)
        try:
            await conn.send(get("/ticks?id=health"))
            events = await stream_events(conn, 3)
        finally:
            conn.close()
    assert [(event.event, event.id) for event in events] == [
        ("tick", "0"),
        ("tick", "1"),
        ("tick", "2"),
    ]


def sseviews_lines(log: str, client_port: int) -> list[str]:
    """What the library logged about the client on `client_port`."""
    who = f"({HOST}:{client_port})"
    return [line for line in log.splitlines() if line.startswith("sseviews ") and who in line]


def assert_no_traceback(server: ServerProcess, since: int) -> None:
    log = server.log()[since:]
    assert "Traceback" not in log, f"the server logged a traceback:\n{log}"


# -- Last-Event-ID ----------------------------------------------------------------------

# name -> (request, expected body of the 400)
BAD_LAST_EVENT_IDS: dict[str, tuple[bytes, str]] = {
    "header-8193-bytes": (
        get("/echo", (b"Last-Event-ID", b"a" * 8193)),
        "Last-Event-ID is longer than 8192 bytes",
    ),
    "header-100-kib": (
        get("/echo", (b"Last-Event-ID", b"a" * 100 * 1024)),
        "Last-Event-ID is longer than 8192 bytes",
    ),
    "header-non-utf8": (
        get("/echo", (b"Last-Event-ID", b"a\xff\xfeb")),
        "Last-Event-ID is not valid UTF-8",
    ),
    "header-overlong-utf8": (
        get("/echo", (b"Last-Event-ID", b"\xc0\xaf")),
        "Last-Event-ID is not valid UTF-8",
    ),
    "query-8193-bytes": (
        get("/echo?lastEventId=" + "a" * 8193),
        "lastEventId is longer than 8192 bytes",
    ),
    # 4097 characters, but 8194 UTF-8 bytes: the limit counts bytes.
    "query-8194-utf8-bytes": (
        get("/echo?lastEventId=" + "%C3%A9" * 4097),
        "lastEventId is longer than 8192 bytes",
    ),
    "query-nul": (get("/echo?lastEventId=a%00b"), "lastEventId contains NUL"),
    "query-percent-ff": (get("/echo?lastEventId=%ff"), "the query string is not valid UTF-8"),
    "query-lone-surrogate": (
        get("/echo?lastEventId=%ED%A0%80"),
        "the query string is not valid UTF-8",
    ),
    "query-truncated-utf8": (
        get("/echo?lastEventId=%E2%82"),
        "the query string is not valid UTF-8",
    ),
}


@pytest.mark.parametrize("case", BAD_LAST_EVENT_IDS)
async def test_hostile_bad_last_event_id_gets_400(server: ServerProcess, case: str) -> None:
    request, message = BAD_LAST_EVENT_IDS[case]
    reply = await exchange(server, request)
    assert (reply.status, reply.text) == (400, message)
    assert reply.headers["content-type"] == "text/plain; charset=utf-8"
    await assert_healthy(server)


async def test_hostile_nul_in_last_event_id_header_is_refused_by_the_parser(
    server: ServerProcess,
) -> None:
    """httptools refuses NUL (and a lone CR) in any header value: uvicorn's 400."""
    since = len(server.log())
    for value in (b"a\x00b", b"a\rb"):
        reply = await exchange(server, get("/echo", (b"Last-Event-ID", value)))
        assert (reply.status, reply.text, reply.closed) == (400, UVICORN_INVALID, True)
    assert server.log()[since:].count(UVICORN_INVALID) == 2
    await assert_healthy(server)


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (get("/echo", (b"Last-Event-ID", b"a" * 8192)), "a" * 8192),
        (get("/echo?lastEventId=" + "b" * 8192), "b" * 8192),
        (get("/echo?lastEventId=" + "%C3%A9" * 4096), "\u00e9" * 4096),
        (get("/echo", (b"Last-Event-ID", "id-\u00e9-\U0001f600".encode())), "id-\u00e9-\U0001f600"),
    ],
    ids=["header-8192-bytes", "query-8192-bytes", "query-8192-utf8-bytes", "header-utf8"],
)
async def test_hostile_last_event_id_up_to_8192_bytes_reaches_the_view(
    server: ServerProcess, request_bytes: bytes, expected: str
) -> None:
    reply = await exchange(server, request_bytes)
    assert reply.status == 200
    events = EventParser().feed(reply.body)
    assert [(event.event, event.json()) for event in events] == [
        ("echo", {"last_event_id": expected})
    ]


async def test_hostile_foreign_last_event_id_on_broadcast_view_gets_400(
    server: ServerProcess,
) -> None:
    for value in (b"foreign", b"42", b"a1b2c3d4-", b"A1B2C3D4-1", b"a1b2c3d4-" + b"9" * 20):
        reply = await exchange(server, get("/rooms/lobby", (b"Last-Event-ID", value)))
        assert reply.status == 400, (value, reply)
        assert f"Last-Event-ID {value.decode()!r} was not issued by this server" in reply.text
        assert "expected '<epoch>-<sequence>'" in reply.text
        await assert_healthy(server)


async def test_hostile_last_event_id_ahead_of_history_gets_a_reset_event(
    server: ServerProcess, http: httpx.AsyncClient
) -> None:
    """Ahead of the head: history lost events. A reset, not a 400 (which would stop
    EventSource for good)."""
    with anyio.fail_after(TIMEOUT):
        epoch = (await http.get(f"{server.base_url}/health")).json()["epoch"]
    ahead = f"{epoch}-{10**18}"
    reply = await exchange(
        server, get("/rooms/lobby", (b"Last-Event-ID", ahead.encode())), events=1
    )
    assert reply.status == 200
    (reset,) = EventParser().feed(reply.body)
    assert reset.event == RESET_EVENT
    assert reset.json()["reason"] == "ahead"
    await assert_healthy(server)


async def test_hostile_last_event_id_of_another_epoch_gets_a_reset_event(
    server: ServerProcess,
) -> None:
    """Well-formed but from another history: not an error, a reset (then live)."""
    reply = await exchange(server, get("/rooms/lobby", (b"Last-Event-ID", b"deadbeef-5")), events=1)
    assert reply.status == 200
    assert reply.body.startswith(b"retry: 100\nevent: ")
    events = EventParser().feed(reply.body)
    assert [event.event for event in events] == [RESET_EVENT]
    assert events[0].json()["reason"] == "unknown_epoch"


# -- group names ------------------------------------------------------------------------

BAD_GROUPS: dict[str, str] = {
    "path-space": "/rooms/a%20b",
    "path-tab": "/rooms/a%09b",
    "path-nul": "/rooms/%00",
    "path-del": "/rooms/a%7Fb",
    "path-nel": "/rooms/a%C2%85b",
    "path-rtl-override": "/rooms/a%E2%80%AEb",
    "path-zero-width-space": "/rooms/a%E2%80%8Bb",
    "path-201-chars": "/rooms/" + "a" * 196,  # "room:" + 196 = 201 characters
    "query-space": "/multi?group=a+b",
    "query-nul": "/multi?group=%00",
    "query-lf": "/multi?group=ok&group=a%0Ab",
    "query-bom": "/multi?group=%EF%BB%BFa",
    "query-private-use": "/multi?group=%EE%80%80",
    "query-empty": "/multi?group=",
    "query-201-chars": "/multi?group=" + "g" * 201,
}


@pytest.mark.parametrize("case", BAD_GROUPS)
async def test_hostile_odd_group_name_gets_400(server: ServerProcess, case: str) -> None:
    reply = await exchange(server, get(BAD_GROUPS[case]))
    assert reply.status == 400, reply
    assert reply.text.startswith("invalid group name: a group name must "), reply.text
    await assert_healthy(server)


@pytest.mark.parametrize("path", ["/rooms/a", "/rooms/" + "a" * 195, "/rooms/caf%C3%A9-%E2%9C%93"])
async def test_hostile_group_names_at_the_limits_are_served(
    server: ServerProcess, path: str
) -> None:
    reply = await exchange(server, get(path))
    assert reply.status == 200, reply
    assert reply.body == b"retry: 100\n"


def _groups_query(count: int) -> str:
    return "/multi?" + "&".join(f"group=g{n}" for n in range(count))


async def test_hostile_more_groups_than_max_groups_gets_400(server: ServerProcess) -> None:
    for count in (65, 2000):
        reply = await exchange(server, get(_groups_query(count)))
        assert (reply.status, reply.text) == (400, f"too many groups for one stream ({count} > 64)")
        await assert_healthy(server)
    # 64 is the default limit: served. So is one group named 1000 times (joined once).
    assert (await exchange(server, get(_groups_query(64)))).status == 200
    assert (await exchange(server, get("/multi?" + "&group=same" * 1000))).status == 200


async def test_hostile_no_group_on_a_group_only_view_gets_400(server: ServerProcess) -> None:
    """A request that names no group has nothing to stream: the client's mistake.

    It must get a 4xx, not a 200 stream that ends at once with ERROR and a
    `NotImplementedError` traceback in the log (any client could fill the log).
    """
    since = len(server.log())
    reply = await exchange(server, get("/multi?id=no-group"))
    await assert_healthy(server)
    assert reply.status == 400, (reply, server.log()[since:])
    assert_no_traceback(server, since)


# -- refusals are logged ------------------------------------------------------------------

LOGGED_REFUSALS: dict[str, bytes] = {
    **{f"last-event-id/{name}": request for name, (request, _) in BAD_LAST_EVENT_IDS.items()},
    "last-event-id/foreign": get("/rooms/lobby", (b"Last-Event-ID", b"foreign")),
    **{f"group/{name}": get(path) for name, path in BAD_GROUPS.items()},
    "group/65-groups": get(_groups_query(65)),
}


async def test_hostile_refusals_are_logged_with_view_client_and_reason(
    server: ServerProcess,
) -> None:
    """Each refusal gets a line from sseviews that names the view, the client (address
    and port) and the reason (the body of the 400). uvicorn's access line names
    neither the view nor the reason."""
    views = {b"GET /echo": "EchoView", b"GET /rooms/": "RoomView", b"GET /multi": "MultiView"}
    replies = {name: await exchange(server, request) for name, request in LOGGED_REFUSALS.items()}
    assert {name: reply.status for name, reply in replies.items()} == dict.fromkeys(replies, 400)
    await anyio.sleep(0.1)  # the last lines reach the log file
    log = server.log()
    unlogged: dict[str, str] = {}
    for name, reply in replies.items():
        [view] = [view for start, view in views.items() if LOGGED_REFUSALS[name].startswith(start)]
        lines = sseviews_lines(log, reply.client_port)
        if not any(view in line and reply.text in line for line in lines):
            unlogged[name] = f"{view}: {reply.text!r}; logged: {lines}"
    assert not unlogged, (
        f"{len(unlogged)} of {len(replies)} refusals lack an sseviews log line naming the "
        f"view, the client and the reason: {unlogged}"
    )


# -- oversized and malformed requests -----------------------------------------------------

OVERSIZED: dict[str, bytes] = {
    "100-kib-header-line": get("/echo", (b"X-Junk", b"a" * 100 * 1024)),
    "1-mib-header-line": get("/echo", (b"X-Junk", b"a" * 1024 * 1024)),
    "10000-headers": get("/echo", *[(b"X-%d" % n, b"v") for n in range(10_000)]),
}


@pytest.mark.parametrize("case", OVERSIZED)
async def test_hostile_oversized_headers_do_not_harm_the_server(
    server: ServerProcess, case: str
) -> None:
    """httptools sets no header size limit (a proxy in front should): the request is
    served, or refused with 400/431, or the connection closed; never a 5xx or a hang."""
    since = len(server.log())
    reply = await exchange(server, OVERSIZED[case])
    assert reply.status in (None, 200, 400, 431), reply
    if reply.status == 200:
        events = EventParser().feed(reply.body)
        assert [event.json() for event in events] == [{"last_event_id": None}]
    await assert_healthy(server)
    assert_no_traceback(server, since)


MALFORMED: dict[str, bytes] = {
    "garbage-line": b"GARBAGE\r\n\r\n",
    "all-byte-values": bytes(range(256)) * 4,
    "http-9.9": b"GET /ticks HTTP/9.9\r\nHost: x\r\n\r\n",
    "unknown-method": b"BREW /ticks HTTP/1.1\r\nHost: x\r\n\r\n",
    "space-in-target": b"GET /ti cks HTTP/1.1\r\nHost: x\r\n\r\n",
    "raw-ff-in-path": b"GET /rooms/\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    "raw-ff-in-query": b"GET /echo?lastEventId=\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    "header-without-colon": b"GET /ticks HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
    "obsolete-line-folding": b"GET /echo HTTP/1.1\r\nHost: x\r\nLast-Event-ID: a\r\n b\r\n\r\n",
    "bare-lf-line-ends": b"GET /ticks HTTP/1.1\nHost: x\n\n",
    "content-length-and-chunked": (
        b"GET /ticks HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    ),
    "negative-content-length": b"GET /ticks HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "bad-chunk-size": (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    ),
    "tls-client-hello": bytes.fromhex("16030100a5010000a10303") + bytes(160),
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "1-mib-target": b"GET /echo?" + b"a" * 1024 * 1024 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("case", MALFORMED)
async def test_hostile_malformed_request_gets_400_or_close(
    server: ServerProcess, case: str
) -> None:
    since = len(server.log())
    reply = await exchange(server, MALFORMED[case])
    if reply.status is not None:
        assert (reply.status, reply.text, reply.closed) == (400, UVICORN_INVALID, True)
    await assert_healthy(server)
    log = server.log()[since:]
    assert UVICORN_INVALID in log, log
    assert "Traceback" not in log, log


# -- field injection --------------------------------------------------------------------------

# Fields an attacker might smuggle into an id or an event name.
INJECTIONS: dict[str, dict[str, str]] = {
    "id-lf": {"id": "1\ndata: injected"},
    "id-cr": {"id": "1\rdata: injected"},
    "id-crlf": {"id": "1\r\n\r\ndata: injected"},
    "id-nul": {"id": "1\0data: injected"},
    "event-lf": {"event": "x\ndata: injected"},
    "event-cr": {"event": "x\rdata: injected"},
    "event-crlf": {"event": "x\r\n\r\nid: injected"},
}


@pytest.mark.parametrize("fields", INJECTIONS.values(), ids=INJECTIONS.keys())
def test_hostile_event_with_injected_field_raises_value_error(fields: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"must not contain (CR or LF|NUL)"):
        Event("data", **fields)  # type: ignore[arg-type]


def test_hostile_comment_and_data_cannot_inject_fields() -> None:
    """A comment or data with line breaks stays a comment or data: the browser sees
    no extra event, id or event name."""
    comment = Event(comment="c\n\nid: 666\r\nevent: injected\rdata: injected")
    parser = EventParser()
    assert parser.feed(comment.encode()) == []
    assert parser.last_event_id == ""
    assert parser.comments == ["c", "", "id: 666", "event: injected", "data: injected"]

    data = Event("a\r\n\r\nid: 666\revent: injected\n\ndata: x", event="ok", id="1")
    [parsed] = EventParser().feed(data.encode())
    assert (parsed.event, parsed.id) == ("ok", "1")
    assert parsed.data == "a\n\nid: 666\nevent: injected\n\ndata: x"


@pytest.mark.parametrize("kind", INJECTIONS)
async def test_hostile_view_building_injected_event_ends_with_error_and_nothing_on_the_wire(
    server: ServerProcess, http: httpx.AsyncClient, kind: str
) -> None:
    tag = f"inject-{kind}"
    query = urlencode({f"inject_{name}": value for name, value in INJECTIONS[kind].items()})
    since = len(server.log())
    with anyio.fail_after(TIMEOUT):
        conn = await LenientConnection.connect(server.port)
        try:
            await conn.send(get(f"/inject?{query}&id={tag}"))
            head = await conn.read_head_or_none()
            assert head is not None and head.status == 200
            body = b""
            while chunk := await conn.read_chunk():  # up to the terminal chunk
                body += chunk
        finally:
            conn.close()
    # Exactly the good event, then the error event and a clean end: not one byte of
    # the bad one, and nothing of the exception.
    good = Event("before", event="good", id="0").encode()
    assert body.startswith(good)
    [final] = EventParser().feed(body[len(good) :])
    assert (final.event, final.data) == ("sseviews.error", '{"reason":"error"}')
    assert b"injected" not in conn.raw
    assert b"must not contain" not in conn.raw
    assert b"after" not in conn.raw
    records = (await debug(http, server, tag))["records"]
    assert [(r["kind"], r.get("reason")) for r in records] == [
        ("connect", None),
        ("disconnect", "error"),
    ]
    log = server.log()[since:]
    assert "events() raised; ending the stream" in log
    assert "must not contain" in log
    await assert_healthy(server)


# -- thousands of connections that never read ----------------------------------------------

CROWD = 2000


async def test_hostile_2000_connections_that_never_read(
    server: ServerProcess, http: httpx.AsyncClient
) -> None:
    """2000 clients send a request and never read. A new client is still served within
    2 s, and once they close, the open-stream count comes back to 0."""
    with anyio.fail_after(5):
        # Streams of earlier tests may still be closing.
        baseline = await debug_once(http, server, lambda state: not state["open_streams"])
    crowd: list[LenientConnection] = []
    request = get("/idle?id=crowd")
    try:
        started = time.monotonic()
        with anyio.fail_after(30):

            async def join() -> None:
                conn = await LenientConnection.connect(server.port)
                crowd.append(conn)
                await conn.send(request)

            for _ in range(CROWD // 100):
                async with anyio.create_task_group() as tg:
                    for _ in range(100):
                        tg.start_soon(join)
            state = await debug_once(
                http, server, lambda state: state["open_by_view"]["IdleView"] >= CROWD
            )
        all_open = time.monotonic() - started
        assert state["open_by_view"]["IdleView"] == state["metrics_open"] == CROWD, state

        asked = time.monotonic()
        with anyio.fail_after(2):
            await assert_healthy(server)
        served = time.monotonic() - asked
    finally:
        closing = time.monotonic()
        for conn in crowd:
            conn.close()
    with anyio.fail_after(10):
        state = await debug_once(
            http, server, lambda state: not (state["open_streams"] or state["metrics_open"])
        )
    drained = time.monotonic() - closing
    assert state["subscribers"] == 0
    assert state["connects"] - baseline["connects"] == CROWD + 1  # and one health check
    ended = sum(state["disconnects"].values()) - sum(baseline["disconnects"].values())
    assert ended == CROWD + 1
    assert (
        state["disconnects"].get("client_closed", 0)
        - baseline["disconnects"].get("client_closed", 0)
        == CROWD + 1
    )
    # No task is left behind (uvicorn's own may take a moment to finish).
    with anyio.fail_after(5):
        await debug_once(http, server, lambda state: state["tasks"] <= baseline["tasks"])
    print(
        f"\nFIGURE crowd={CROWD}: all open in {all_open:.2f}s; a new client streamed in "
        f"{served * 1000:.0f} ms; all closed and cleaned up in {drained:.2f}s"
    )
    await assert_healthy(server)
