"""Server CPU per stream opened, in-process: no sockets, no client noise.

Each app gets 5000 stream requests through hand-made ASGI calls; the figure is
the process CPU time until every response head was sent, divided by 5000.

    python benchmarks/open_cost.py
"""

from __future__ import annotations

import asyncio
import importlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

APPS = {
    "raw ASGI": "benchmarks.apps.raw_app:app",
    "sse-starlette": "benchmarks.apps.sse_starlette_app:app",
    "sseviews": "benchmarks.apps.sseviews_app:app",
}
STREAMS = 5000
RUNS = 5


class _Cycle:
    """The request side of one connection, as a server keeps it.

    Its receive() awaits only an asyncio future, like uvicorn's, and it says so
    (`_sseviews_callback_safe`), so sseviews serves these streams as it does under
    uvicorn: without a second task.
    """

    _sseviews_callback_safe = True
    __slots__ = ("gone", "pending")

    def __init__(self, gone: asyncio.Event, pending: list[dict[str, Any]]) -> None:
        self.gone = gone
        self.pending = pending

    async def receive(self) -> dict[str, Any]:
        if self.pending:
            return self.pending.pop()
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def _open_streams(app: Any) -> float:
    loop = asyncio.get_running_loop()
    opened: list[tuple[asyncio.Task[None], asyncio.Event, asyncio.Event]] = []
    started = time.process_time()
    for _ in range(STREAMS):
        gone = asyncio.Event()
        head = asyncio.Event()
        pending = [{"type": "http.request", "body": b"", "more_body": False}]

        receive = _Cycle(gone, pending).receive

        async def send(message: dict[str, Any], head: asyncio.Event = head) -> None:
            if message["type"] == "http.response.start":
                head.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/idle",
            "raw_path": b"/idle",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"127.0.0.1")],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        opened.append((loop.create_task(app(scope, receive, send)), gone, head))
    for _, _, head in opened:
        await head.wait()
    for _ in range(3):
        await asyncio.sleep(0)
    cost = (time.process_time() - started) / STREAMS * 1e6
    for _, gone, _ in opened:
        gone.set()
    await asyncio.gather(*(task for task, _, _ in opened))
    return cost


def main() -> None:
    print(f"server CPU per stream opened, median of {RUNS} runs of {STREAMS} streams")
    for name, spec in APPS.items():
        module, attribute = spec.split(":")
        app = getattr(importlib.import_module(module), attribute)
        costs = [asyncio.run(_open_streams(app)) for _ in range(RUNS)]
        print(f"  {name:14} {statistics.median(costs):7.1f} us")


if __name__ == "__main__":
    main()
