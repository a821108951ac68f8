"""The per-connection writer: lean streams (no second task) and the writer-task fallback.

Every behaviour here is checked in both modes: "lean" is how the test client and
uvicorn are served (receive() driven by callbacks, writes from the request task),
"task" wraps receive() in a middleware, which gives the stream a writer task.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import RequestResponseCycle as H11Cycle
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle as HttptoolsCycle

from sseviews import DisconnectReason, Event, EventStreamView, StreamEnded
from sseviews._connection import callback_safe
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio

MODES = ["lean", "task"]


class WrappedReceive:
    """A pure ASGI middleware that wraps receive(), as many middlewares do."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped() -> Message:
            return await receive()

        await self.app(scope, wrapped, send)


def serve(view: type[EventStreamView], mode: str) -> ASGIApp:
    return view if mode == "lean" else WrappedReceive(view)


class Recorder:
    def __init__(self) -> None:
        self.reasons: list[DisconnectReason] = []
        self.ended = anyio.Event()

    def record(self, reason: DisconnectReason) -> None:
        self.reasons.append(reason)
        self.ended.set()


def idle_view(recorder: Recorder, **settings: Any) -> type[EventStreamView]:
    class Idle(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            yield "hello"
            await anyio.sleep_forever()

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            recorder.record(reason)

    for name, value in settings.items():
        setattr(Idle, name, value)
    return Idle


def test_callback_safe_knows_uvicorn_and_the_test_client() -> None:
    for cycle in (HttptoolsCycle, H11Cycle):
        assert callback_safe(object.__new__(cycle).receive)


def test_callback_safe_refuses_unknown_and_wrapped_receivers() -> None:
    async def receive() -> Message:
        return {"type": "http.disconnect"}

    class Other:
        async def receive(self) -> Message:
            return {"type": "http.disconnect"}

        async def other(self) -> Message:
            return {"type": "http.disconnect"}

    class Declared(Other):
        _sseviews_callback_safe = True

    assert not callback_safe(receive)
    assert not callback_safe(Other().receive)
    assert not callback_safe(Declared().other)  # only a method named receive
    assert callback_safe(Declared().receive)


@pytest.mark.parametrize("mode", MODES)
async def test_connection_lean_stream_has_no_second_task_while_idle(mode: str) -> None:
    recorder = Recorder()
    app = serve(idle_view(recorder), mode)
    async with EventStreamClient(app) as client:
        before = len(asyncio.all_tasks())
        async with client.stream("/") as stream:
            assert (await stream.next_event(timeout=2)).data == "hello"
            await anyio.sleep(0.05)
            extra = len(asyncio.all_tasks()) - before
        with anyio.fail_after(2):
            await recorder.ended.wait()
    # The client runs each exchange in a task of its own; the view adds a writer
    # task only when receive() is wrapped.
    assert extra == (1 if mode == "lean" else 2)
    assert recorder.reasons == [DisconnectReason.CLIENT_CLOSED]


@pytest.mark.parametrize("mode", MODES)
async def test_connection_disconnect_noticed_while_events_waits(mode: str) -> None:
    recorder = Recorder()
    async with EventStreamClient(serve(idle_view(recorder), mode)) as client:
        async with client.stream("/") as stream:
            await stream.next_event(timeout=2)
        with anyio.fail_after(1):
            await recorder.ended.wait()
    assert recorder.reasons == [DisconnectReason.CLIENT_CLOSED]


@pytest.mark.parametrize("mode", MODES)
async def test_connection_pings_while_idle_and_not_while_events_flow(mode: str) -> None:
    recorder = Recorder()
    app = serve(idle_view(recorder, ping_interval=0.1), mode)
    async with EventStreamClient(app) as client, client.stream("/") as stream:
        await stream.next_event(timeout=2)
        await anyio.sleep(0.45)
        pings = len(stream.comments)
    assert 3 <= pings <= 5, pings


@pytest.mark.parametrize("mode", MODES)
async def test_connection_burst_batched_in_order(mode: str) -> None:
    sends: list[int] = []

    class Burst(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            for index in range(5000):
                yield Event(index, id=str(index))

    async def counting(scope: Scope, receive: Receive, send: Send) -> None:
        async def counted(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                sends.append(message["body"].count(b"\n\n"))
            await send(message)

        await serve(Burst, mode)(scope, receive, counted)

    async with EventStreamClient(counting) as client, client.stream("/") as stream:
        received = [int((await stream.next_event(timeout=5)).data) for _ in range(5000)]
    assert received == list(range(5000))
    assert sum(sends) == 5000
    # Everything events() had ready went out together, not one send per event.
    assert len(sends) < 50, len(sends)


@pytest.mark.parametrize("mode", MODES)
async def test_connection_paused_client_resumes_in_order(mode: str) -> None:
    recorder = Recorder()
    total = 300  # 300 KiB: more than the writer's high-water mark

    class Big(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            for index in range(total):
                yield Event(f"{index}:" + "x" * 1024)
            await anyio.sleep_forever()

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            recorder.record(reason)

    async with EventStreamClient(serve(Big, mode)) as client:
        before = len(asyncio.all_tasks())
        async with client.stream("/") as stream:
            stream.pause()
            await anyio.sleep(0.2)
            stream.resume()
            received = [(await stream.next_event(timeout=5)).data for _ in range(total)]
            await anyio.sleep(0.05)
            extra = len(asyncio.all_tasks()) - before
    assert [int(data.split(":")[0]) for data in received] == list(range(total))
    # In lean mode the writer task that finished the blocked write has exited.
    assert extra == (1 if mode == "lean" else 2)


@pytest.mark.parametrize("mode", MODES)
async def test_connection_send_timeout_drops_a_client_that_stopped_reading(mode: str) -> None:
    recorder = Recorder()

    class Flood(EventStreamView):
        send_timeout = 0.2

        async def events(self) -> AsyncIterator[Any]:
            while True:
                yield "x" * 1024
                await anyio.lowlevel.checkpoint()

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            recorder.record(reason)

    async with EventStreamClient(serve(Flood, mode)) as client:
        async with client.stream("/") as stream:
            stream.pause()
            with anyio.fail_after(2):
                await recorder.ended.wait()
    assert recorder.reasons == [DisconnectReason.SEND_TIMEOUT]


@pytest.mark.parametrize("mode", MODES)
async def test_connection_shutdown_ends_an_idle_stream(mode: str) -> None:
    recorder = Recorder()
    async with EventStreamClient(serve(idle_view(recorder), mode)) as client:
        async with client.stream("/") as stream:
            await stream.next_event(timeout=2)
            with anyio.fail_after(2):
                await client.shutdown()
                await recorder.ended.wait()
            assert stream.ended or await _ends(stream)
    assert recorder.reasons == [DisconnectReason.SHUTDOWN]


async def _ends(stream: Any) -> bool:
    try:
        await stream.next_event(timeout=2)
    except StreamEnded:
        return True
    return False


class Peer:
    """A server's side of one request, whose receive() can be driven by callbacks."""

    _sseviews_callback_safe = True

    def __init__(self, before_wait: str = "none") -> None:
        self.before_wait = before_wait
        self.chunks = [b"a", b"b"]  # request body chunks, answered at once
        self.gone = asyncio.Event()
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        if self.chunks:
            return {"type": "http.request", "body": self.chunks.pop(0), "more_body": True}
        if self.before_wait == "raise":
            raise RuntimeError("the server broke")
        if self.before_wait == "checkpoint":
            await asyncio.sleep(0)  # a bare yield before the wait
        if self.before_wait == "odd":
            await _Odd()
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)


class _Odd:
    """An awaitable that yields something no event loop understands."""

    def __await__(self) -> Any:
        yield "not a future"


async def run_app(app: ASGIApp, peer: Peer) -> None:
    await app(request_scope(), peer.receive, peer.send)


def request_scope() -> Scope:
    return {
        "type": "http",
        "method": "GET",
        "path": "/",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 5000),
    }


@pytest.mark.parametrize("before_wait", ["none", "checkpoint"])
async def test_connection_lean_listener_reads_past_body_chunks(before_wait: str) -> None:
    recorder = Recorder()
    peer = Peer(before_wait)
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_app, idle_view(recorder), peer)
        await anyio.sleep(0.1)
        assert not peer.chunks  # both chunks were read, and the stream goes on
        assert not recorder.ended.is_set()
        peer.gone.set()
        with anyio.fail_after(1):
            await recorder.ended.wait()
    assert recorder.reasons == [DisconnectReason.CLIENT_CLOSED]
    # The client is gone: nothing more is written after the one event.
    assert peer.sent[-1] == {
        "type": "http.response.body",
        "body": b"data: hello\n\n",
        "more_body": True,
    }


@pytest.mark.parametrize(
    ("before_wait", "logged"),
    [("raise", "receive() failed"), ("odd", "not an asyncio future")],
)
async def test_connection_lean_listener_failure_ends_with_error(
    before_wait: str, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    peer = Peer(before_wait)
    with anyio.fail_after(2):
        await idle_view(recorder)(request_scope(), peer.receive, peer.send)
    assert recorder.reasons == [DisconnectReason.ERROR]
    assert logged in caplog.text


@pytest.mark.parametrize("mode", MODES)
async def test_connection_ping_timer_waits_a_whole_interval_after_each_write(mode: str) -> None:
    class Ticker(EventStreamView):
        ping_interval = 0.15

        async def events(self) -> AsyncIterator[Any]:
            for index in range(8):
                yield index
                await anyio.sleep(0.05)
            await anyio.sleep_forever()

    async with EventStreamClient(serve(Ticker, mode)) as client, client.stream("/") as stream:
        for _ in range(8):
            await stream.next_event(timeout=2)
        assert stream.comments == []  # events flowed: no ping was due
        await anyio.sleep(0.4)
        assert len(stream.comments) >= 1


async def test_connection_lean_writer_cancelled_with_the_request_task() -> None:
    recorder = Recorder()
    release = anyio.Event()

    class Blocked(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            for _ in range(200):
                yield "x" * 1024
            await anyio.sleep_forever()

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            recorder.record(reason)

    class Stuck(Peer):
        async def send(self, message: Message) -> None:
            if message.get("body"):
                await release.wait()  # a client that never reads
            self.sent.append(message)

    peer = Stuck()
    before = len(asyncio.all_tasks())
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_app, Blocked, peer)
        await anyio.sleep(0.1)
        assert len(asyncio.all_tasks()) - before == 2  # the request task and its writer
        tg.cancel_scope.cancel()  # the server gives up on the request
    assert recorder.reasons == [DisconnectReason.SHUTDOWN]
    await anyio.lowlevel.checkpoint()
    assert len(asyncio.all_tasks()) == before  # the writer did not outlive it


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ending", ["client_closed", "completed", "error"])
async def test_connection_closed_stream_freed_without_the_garbage_collector(
    mode: str, ending: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once a stream is over, nothing of it may stay in a reference cycle: at 10k
    # streams, cycles hold memory until a full collection and slow every one.
    # (pytest's log capture would keep the error's traceback, and the view with it.)
    monkeypatch.setattr(logging.getLogger("sseviews"), "propagate", False)
    views: list[weakref.ref[EventStreamView]] = []
    recorder = Recorder()

    class View(EventStreamView):
        async def on_connect(self) -> None:
            views.append(weakref.ref(self))

        async def events(self) -> AsyncIterator[Any]:
            yield "hello"
            if ending == "client_closed":
                await anyio.sleep_forever()
            if ending == "error":
                raise RuntimeError("events() failed")

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            recorder.record(reason)

    gc.collect()
    gc.disable()
    try:
        async with EventStreamClient(serve(View, mode)) as client:
            async with client.stream("/") as stream:
                assert (await stream.next_event(timeout=2)).data == "hello"
                if ending != "client_closed":
                    await stream.wait_ended()
            with anyio.fail_after(2):
                await recorder.ended.wait()
            for _ in range(5):  # let the request task return
                await anyio.lowlevel.checkpoint()
            freed = views[0]() is None
    finally:
        gc.enable()
    assert recorder.reasons == [DisconnectReason(ending)]
    assert freed
