"""The per-connection loop: one writer, one listener, the producer in the request task.

Every behaviour is checked on asyncio and trio, and with the server's own
`receive()` as well as one wrapped by a middleware: a stream runs the same way
under all of them.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sseviews import Broadcast, DisconnectReason, Event, EventStreamView, StreamEnded
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio

MODES = ["plain", "wrapped"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class WrappedReceive:
    """A pure ASGI middleware that wraps receive(), as many middlewares do."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped() -> Message:
            return await receive()

        await self.app(scope, wrapped, send)


def serve(view: type[EventStreamView], mode: str) -> ASGIApp:
    return view if mode == "plain" else WrappedReceive(view)


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


class Peer:
    """A server's side of one request: body chunks first, then a wait for the client."""

    def __init__(self, before_wait: str = "none") -> None:
        self.before_wait = before_wait
        self.chunks = [b"a", b"b"]  # request body chunks, answered at once
        self.gone = anyio.Event()
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        if self.chunks:
            return {"type": "http.request", "body": self.chunks.pop(0), "more_body": True}
        if self.before_wait == "raise":
            raise RuntimeError("the server broke")
        if self.before_wait == "checkpoint":
            await anyio.lowlevel.checkpoint()
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)


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


async def until(condition: Callable[[], bool], within: float = 2) -> None:
    """Poll `condition` until it holds; fail the test after `within` seconds."""
    with anyio.fail_after(within):
        for _ in range(int(within / 0.01) + 1):
            if condition():
                return
            await anyio.sleep(0.01)
    raise AssertionError("the condition never held")


async def _ends(stream: Any) -> bool:
    try:
        await stream.next_event(timeout=2)
    except StreamEnded:
        return True
    return False


# -- the same behaviour on every backend and with any receive() -----------------------


async def test_connection_head_then_an_empty_chunk_before_any_event() -> None:
    peer = Peer()
    recorder = Recorder()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_app, idle_view(recorder), peer)
        await until(lambda: len(peer.sent) >= 3)
        peer.gone.set()
    assert peer.sent[0]["type"] == "http.response.start"
    # ASGI lets a server hold the head until the first body message: send one at once.
    assert peer.sent[1] == {"type": "http.response.body", "body": b"", "more_body": True}
    assert peer.sent[2]["body"] == b"data: hello\n\n"


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
    total = 300  # 300 KiB: more than the writer's high-water mark

    class Big(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            for index in range(total):
                yield Event(f"{index}:" + "x" * 1024)
            await anyio.sleep_forever()

    async with EventStreamClient(serve(Big, mode)) as client:
        async with client.stream("/") as stream:
            stream.pause()
            await anyio.sleep(0.2)
            stream.resume()
            received = [(await stream.next_event(timeout=5)).data for _ in range(total)]
    assert [int(data.split(":")[0]) for data in received] == list(range(total))


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
async def test_connection_send_timeout_drops_a_group_stream_that_stopped_reading(
    mode: str,
) -> None:
    recorder = Recorder()
    broadcast = Broadcast("memory://")

    class Room(EventStreamView):
        send_timeout = 0.2
        groups = ("room",)

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            recorder.record(reason)

    Room.broadcast = broadcast
    async with broadcast, EventStreamClient(serve(Room, mode)) as client:
        async with client.stream("/") as stream:
            await broadcast.publish("room", "first")
            await stream.next_event(timeout=2)
            stream.pause()
            await broadcast.publish("room", "blocked")
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


@pytest.mark.parametrize("before_wait", ["none", "checkpoint"])
async def test_connection_listener_reads_past_body_chunks(before_wait: str) -> None:
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


async def test_connection_listener_failure_ends_with_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    peer = Peer("raise")
    with anyio.fail_after(2):
        await idle_view(recorder)(request_scope(), peer.receive, peer.send)
    assert recorder.reasons == [DisconnectReason.ERROR]
    assert "receive() failed" in caplog.text


@pytest.mark.parametrize("mode", MODES)
async def test_connection_ping_waits_a_whole_interval_after_each_write(mode: str) -> None:
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


async def test_connection_send_failure_ends_with_error(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()

    class Broken(Peer):
        async def send(self, message: Message) -> None:
            if message.get("body"):
                raise RuntimeError("the transport broke")
            self.sent.append(message)

    peer = Broken()
    with anyio.fail_after(2):
        await idle_view(recorder)(request_scope(), peer.receive, peer.send)
    assert recorder.reasons == [DisconnectReason.ERROR]
    assert "sending to the client failed" in caplog.text


# -- the rule: every send and receive in the stream's own tasks -----------------------

REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")


class Recording:
    """Record, for every send and receive, the context and where it started and ended."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token
        self.calls: list[tuple[str, str, object, object]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        REQUEST.set(self.token)

        async def recorded_receive() -> Message:
            started = anyio.get_current_task().id
            with anyio.fail_after(30):  # a cancel scope around the call, as middleware do
                message = await receive()
            self.calls.append(("receive", REQUEST.get(), started, anyio.get_current_task().id))
            return message

        async def recorded_send(message: Message) -> None:
            started = anyio.get_current_task().id
            with anyio.fail_after(30):
                await anyio.lowlevel.checkpoint()
                await send(message)
            self.calls.append(("send", REQUEST.get(), started, anyio.get_current_task().id))

        await self.app(scope, recorded_receive, recorded_send)


@pytest.mark.parametrize("kind", ["generator", "groups", "subscription"])
async def test_connection_sends_and_receives_in_the_streams_context(kind: str) -> None:
    broadcast = Broadcast("memory://")

    class Room(EventStreamView):
        groups = ("room",)

    class Relay(Room):
        async def events(self) -> AsyncIterator[Any]:
            async for event in self.subscription:
                yield event

    class Generator(EventStreamView):
        async def events(self) -> AsyncIterator[Any]:
            for index in range(3):
                yield index
                await anyio.sleep(0.01)
            await anyio.sleep_forever()

    view = {"generator": Generator, "groups": Room, "subscription": Relay}[kind]
    view.broadcast = broadcast
    app = Recording(view, "stream")
    async with broadcast, EventStreamClient(app) as client:
        async with client.stream("/") as stream:
            if kind != "generator":
                REQUEST.set("publisher")  # the publisher's own context
                for index in range(3):
                    await broadcast.publish("room", index)
            assert [(await stream.next_event(timeout=2)).data for _ in range(3)] == [
                "0",
                "1",
                "2",
            ]
        await until(lambda: any(call[0] == "receive" for call in app.calls))
    assert len([call for call in app.calls if call[0] == "send"]) >= 3
    for name, token, started, ended in app.calls:
        assert token == "stream", name
        assert started == ended, name  # awaited to completion where it started


# -- the tasks of a stream (asyncio: counted) -----------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("mode", MODES)
async def test_connection_tasks_per_stream(mode: str) -> None:
    recorder = Recorder()
    broadcast = Broadcast("memory://")

    class Room(EventStreamView):
        groups = ("room",)

    Room.broadcast = broadcast
    async with broadcast, EventStreamClient(serve(idle_view(recorder), mode)) as client:
        before = len(asyncio.all_tasks())
        async with client.stream("/") as stream:
            await stream.next_event(timeout=2)
            # The client's exchange task runs the request; a view with events()
            # adds its writer and its listener.
            assert len(asyncio.all_tasks()) - before == 3
    async with broadcast, EventStreamClient(serve(Room, mode)) as client:
        before = len(asyncio.all_tasks())
        async with client.stream("/") as stream:
            await broadcast.publish("room", "x")
            await stream.next_event(timeout=2)
            # A view that streams its groups listens in the request task: its writer
            # is the one child.
            assert len(asyncio.all_tasks()) - before == 2


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_connection_children_cancelled_with_the_request_task() -> None:
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
        # the request task, its writer and its listener
        assert len(asyncio.all_tasks()) - before == 3
        tg.cancel_scope.cancel()  # the server gives up on the request
    assert recorder.reasons == [DisconnectReason.SHUTDOWN]
    await anyio.lowlevel.checkpoint()
    assert len(asyncio.all_tasks()) == before  # no child outlived it


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_connection_closed_group_stream_freed_without_the_garbage_collector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    views: list[weakref.ref[EventStreamView]] = []
    recorder = Recorder()
    broadcast = Broadcast("memory://")

    class Room(EventStreamView):
        groups = ("room",)

        async def on_connect(self) -> None:
            views.append(weakref.ref(self))

        async def on_disconnect(self, reason: DisconnectReason) -> None:
            recorder.record(reason)

    Room.broadcast = broadcast
    gc.collect()
    gc.disable()
    try:
        async with broadcast, EventStreamClient(Room) as client:
            async with client.stream("/") as stream:
                await broadcast.publish("room", "hello")
                assert (await stream.next_event(timeout=2)).data == "hello"
            with anyio.fail_after(2):
                await recorder.ended.wait()
            for _ in range(5):  # let the request task return
                await anyio.lowlevel.checkpoint()
            freed = views[0]() is None
    finally:
        gc.enable()
    assert recorder.reasons == [DisconnectReason.CLIENT_CLOSED]
    assert freed


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("ending", ["client_closed", "completed", "error"])
async def test_connection_closed_stream_freed_without_the_garbage_collector(
    ending: str, monkeypatch: pytest.MonkeyPatch
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
        async with EventStreamClient(View) as client:
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
