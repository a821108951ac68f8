"""A pure ASGI middleware that records, for every request, where each `send` and
`receive` call ran: the task and the request's ContextVar token at the start of the
call and again once the awaited call has returned (or raised, or been closed).

It sets `REQUEST_TOKEN` to a token of the request's own before calling the app, as
tracing and error-reporting middleware (OpenTelemetry, Sentry) set theirs: a call
made in another request's context, or finished in another task, shows up here.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_TOKEN: ContextVar[str | None] = ContextVar("sseviews_test_request_token", default=None)


@dataclass
class Call:
    """One `send` or `receive` call, as seen by the middleware."""

    kind: str  # "send" or "receive"
    message_type: str  # of the message sent; for a receive, of the message received
    token_at_start: str | None
    task_at_start: asyncio.Task[Any] | None
    token_at_end: str | None = None
    task_at_end: asyncio.Task[Any] | None = None
    # "returned", "raised", "cancelled", "closed" (the coroutine was closed while it
    # waited: it was never awaited to completion), or None while still running.
    outcome: str | None = None

    def describe(self) -> str:
        return (
            f"{self.kind}({self.message_type}) started in {_name(self.task_at_start)} "
            f"[token {self.token_at_start}], ended ({self.outcome}) in "
            f"{_name(self.task_at_end)} [token {self.token_at_end}]"
        )


def _name(task: asyncio.Task[Any] | None) -> str:
    if task is None:
        return "no task (a callback)"
    coro = task.get_coro()
    qualname = getattr(coro, "__qualname__", type(coro).__name__)
    return f"task {task.get_name()} ({qualname})"


@dataclass
class RequestRecord:
    """What the middleware saw of one request."""

    token: str
    method: str
    path: str
    query: str
    task: asyncio.Task[Any] | None  # the task that called the middleware: the request task
    calls: list[Call] = field(default_factory=list)
    # Set once the app has returned, when `left_running` is filled in.
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    # Tasks other than the request task that made a call and were still running
    # when the app returned: a connection's helper tasks must be awaited before that.
    left_running: list[asyncio.Task[Any]] = field(default_factory=list)

    def task_name(self) -> str:
        return _name(self.task)


class RecorderMiddleware:
    """Record where every `send` (and, with `wrap_receive`, `receive`) call runs.

    Without `wrap_receive` the app gets the server's own `receive`, as under a middleware
    that wraps `send` only: a library that treats a server's `receive` specially still can.
    """

    def __init__(
        self, app: ASGIApp, requests: list[RequestRecord], *, wrap_receive: bool = True
    ) -> None:
        self.app = app
        self.requests = requests
        self.wrap_receive = wrap_receive

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(
            token=uuid.uuid4().hex,
            method=scope["method"],
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            task=asyncio.current_task(),
        )
        self.requests.append(record)
        reset = REQUEST_TOKEN.set(record.token)
        calls = record.calls

        async def recorded_send(message: Message) -> None:
            call = _start(calls, "send", message["type"])
            await _finish(call, send(message))

        async def recorded_receive() -> Message:
            call = _start(calls, "receive", "?")
            message: Message = await _finish(call, receive())
            call.message_type = message["type"]
            return message

        try:
            await self.app(scope, recorded_receive if self.wrap_receive else receive, recorded_send)
        finally:
            REQUEST_TOKEN.reset(reset)
            record.left_running = [
                task
                for task in {id(call.task_at_start): call.task_at_start for call in calls}.values()
                if task is not None and task is not record.task and not task.done()
            ]
            record.finished.set()


def _start(calls: list[Call], kind: str, message_type: str) -> Call:
    call = Call(kind, message_type, REQUEST_TOKEN.get(), _current_task())
    calls.append(call)
    return call


async def _finish(call: Call, awaitable: Awaitable[Any]) -> Any:
    outcome = "raised"
    try:
        result = await awaitable
        outcome = "returned"
        return result
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    except GeneratorExit:
        outcome = "closed"
        raise
    finally:
        call.token_at_end = REQUEST_TOKEN.get()
        call.task_at_end = _current_task()
        call.outcome = outcome


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop: a coroutine closed by the garbage collector
        return None


def task_context_token(task: asyncio.Task[Any]) -> str | None:
    """The `REQUEST_TOKEN` in `task`'s own context (`Task.get_context()`, Python 3.12+).

    Raises:
        NotImplementedError: On Python 3.11, which cannot read a task's context.
    """
    get_context = getattr(task, "get_context", None)
    if get_context is None:
        raise NotImplementedError("Task.get_context() needs Python 3.12")
    value: str | None = get_context().get(REQUEST_TOKEN)
    return value
