"""Python memory per idle stream, by tracemalloc, under a real uvicorn in-process.

RSS figures (bench_core.py) include the allocator's slack; this one counts the
bytes Python allocates per open stream, and names the lines that allocate them.
The apps are bench_core's idle endpoints (raw ASGI, the Starlette floor,
sse-starlette, the sseviews generator view), plus an sseviews view that streams
a broadcast group (``apps/sseviews_app.py``), and a generator view
(``apps/sseviews_generator_app.py``).

    python benchmarks/memory_profile.py [--streams 1000] [--top 0] [--apps raw,floor]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import socket
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any, Literal

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# key: (label, app, uvicorn's lifespan setting)
APPS: dict[str, tuple[str, str, Literal["on", "off"]]] = {
    "raw": ("raw ASGI", "benchmarks.apps.raw_app:app", "off"),
    "floor": ("Starlette floor", "benchmarks.apps.starlette_floor_app:app", "off"),
    "sse-starlette": ("sse-starlette", "benchmarks.apps.sse_starlette_app:app", "off"),
    "sseviews": ("sseviews, group view", "benchmarks.apps.sseviews_app:app", "on"),
    "sseviews-generator": (
        "sseviews, generator view",
        "benchmarks.apps.sseviews_generator_app:app",
        "off",
    ),
}

_CLIENT = """
import socket, sys, time
port, n, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
held = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /idle HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
    held.append(s)
for s in held:
    s.recv(4096)
print("open", flush=True)
time.sleep(hold)
"""


async def _measure(spec: str, lifespan: Literal["on", "off"], streams: int, top: int) -> float:
    module, attribute = spec.split(":")
    app: Any = getattr(importlib.import_module(module), attribute)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        app, loop="none", http="httptools", log_level="warning", lifespan=lifespan
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    async with asyncio.timeout(10):
        # uvicorn offers a flag, not an event, for "listening".
        while not server.started:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    # Warm up: the first streams import and cache what every later one reuses.
    warm = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CLIENT, str(port), "20", "0", stdout=subprocess.DEVNULL
    )
    await asyncio.wait_for(warm.wait(), 30)
    await asyncio.sleep(0.5)
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CLIENT, str(port), str(streams), "60", stdout=subprocess.PIPE
    )
    try:
        assert client.stdout is not None
        await asyncio.wait_for(client.stdout.readline(), 60)
        await asyncio.sleep(1)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        client.kill()
        await client.wait()
    tracemalloc.stop()
    stats = after.compare_to(before, "lineno")
    for stat in stats[:top]:
        print(f"    {stat.size_diff / streams:7.0f} B  {stat.traceback[0]}")
    server.should_exit = True
    await asyncio.wait_for(serving, 10)
    return sum(stat.size_diff for stat in stats) / streams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--top", type=int, default=0, help="also list the top N lines")
    parser.add_argument(
        "--apps", default=",".join(APPS), help="comma-separated subset of: " + ",".join(APPS)
    )
    args = parser.parse_args()
    keys = args.apps.split(",")
    unknown = [key for key in keys if key not in APPS]
    if unknown:
        parser.error(f"unknown app(s) {unknown}; choose from {list(APPS)}")
    print(f"Python bytes per idle stream, {args.streams} streams (tracemalloc)")
    for key in keys:
        name, spec, lifespan = APPS[key]
        per_stream = asyncio.run(_measure(spec, lifespan, args.streams, args.top))
        print(f"  {name:26} {per_stream / 1024:6.1f} KB")


if __name__ == "__main__":
    main()
