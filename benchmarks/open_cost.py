"""Server CPU per stream opened, in-process: no sockets, no client noise.

Each app gets 5000 stream requests to its ``/idle`` endpoint (bench_core's)
through hand-made ASGI calls; the figure is the process CPU time until every
response head was sent, divided by 5000, garbage collection included.

    python benchmarks/open_cost.py [--streams 5000] [--runs 5] [--apps raw,floor]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# key: (label, app)
APPS = {
    "raw": ("raw ASGI", "benchmarks.apps.raw_app:app"),
    "floor": ("Starlette floor", "benchmarks.apps.starlette_floor_app:app"),
    "sse-starlette": ("sse-starlette", "benchmarks.apps.sse_starlette_app:app"),
    "sseviews": ("sseviews", "benchmarks.apps.sseviews_app:app"),
}
STREAMS = 5000
RUNS = 5


class _Cycle:
    """The request side of one connection, as a server keeps it.

    Its receive() awaits only an asyncio event, like uvicorn's.
    """

    __slots__ = ("gone", "pending")

    def __init__(self, gone: asyncio.Event, pending: list[dict[str, Any]]) -> None:
        self.gone = gone
        self.pending = pending

    async def receive(self) -> dict[str, Any]:
        if self.pending:
            return self.pending.pop()
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def _with_lifespan(app: Any, streams: int) -> float:
    """Open the streams inside the app's lifespan (sseviews connects its Broadcast there)."""
    router = getattr(app, "router", None)
    if router is None:
        return await _open_streams(app, streams)
    async with router.lifespan_context(app):
        return await _open_streams(app, streams)


async def _open_streams(app: Any, streams: int) -> float:
    loop = asyncio.get_running_loop()
    opened: list[tuple[asyncio.Task[None], asyncio.Event, asyncio.Event]] = []
    started = time.process_time()
    for _ in range(streams):
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
    cost = (time.process_time() - started) / streams * 1e6
    for _, gone, _ in opened:
        gone.set()
    await asyncio.gather(*(task for task, _, _ in opened))
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=STREAMS)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument(
        "--apps", default=",".join(APPS), help="comma-separated subset of: " + ",".join(APPS)
    )
    args = parser.parse_args()
    keys = args.apps.split(",")
    unknown = [key for key in keys if key not in APPS]
    if unknown:
        parser.error(f"unknown app(s) {unknown}; choose from {list(APPS)}")
    print(f"server CPU per stream opened, median of {args.runs} runs of {args.streams} streams")
    for key in keys:
        name, spec = APPS[key]
        module, attribute = spec.split(":")
        app = getattr(importlib.import_module(module), attribute)
        costs = [asyncio.run(_with_lifespan(app, args.streams)) for _ in range(args.runs)]
        print(f"  {name:16} {statistics.median(costs):7.1f} us")


if __name__ == "__main__":
    main()
