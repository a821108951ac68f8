"""Run `uvicorn.Server(config).serve()` three times, one after another, in this process.

Each round serves the same app object on a fresh loopback socket, opens one
`/ticks` stream, reads a few events, then starts shutdown: by setting
`server.should_exit` from a task, or by sending this process SIGTERM. It then
reads the rest of the response and waits (bounded) for `serve()` to return.

The last line printed on stdout is a JSON object with one entry per round,
for `tests/test_server.py` to assert on.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from typing import Any

import uvicorn

from tests.apps.lifecycle import app

MODES = ("should_exit", "sigterm", "should_exit")
EVENTS_BEFORE_SHUTDOWN = 3


async def read_chunk(reader: asyncio.StreamReader) -> bytes:
    """One chunk of a chunked body; b"" for the terminal chunk."""
    size_line = await reader.readuntil(b"\r\n")
    size = int(size_line.split(b";")[0], 16)
    data = await reader.readexactly(size + 2)
    return data[:-2]


async def one_round(index: int, mode: str, caught: list[int]) -> dict[str, Any]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    result: dict[str, Any] = {"round": index, "mode": mode}
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(5):
            # uvicorn offers a flag, not an event, for "listening".
            while not server.started:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ticks?id=round-%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % index)
        body = b""
        async with asyncio.timeout(3):
            head = await reader.readuntil(b"\r\n\r\n")
            result["status"] = int(head.split(b" ", 2)[1])
            while body.count(b"event: tick\n") < EVENTS_BEFORE_SHUTDOWN:
                body += await read_chunk(reader)
        result["events_before_shutdown"] = body.count(b"event: tick\n")

        started = time.monotonic()
        if mode == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        else:

            async def trigger() -> None:
                server.should_exit = True

            await asyncio.create_task(trigger())

        result["clean_end"] = False
        try:
            async with asyncio.timeout(3):
                while await read_chunk(reader):
                    pass
                result["clean_end"] = True
                result["eof_after_end"] = await reader.read() == b""
        except (TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            result["read_error"] = repr(exc)

        done, _ = await asyncio.wait({serving}, timeout=3)
        result["serve_returned"] = bool(done)
        result["serve_seconds"] = time.monotonic() - started
        if done:
            result["serve_error"] = repr(serving.exception()) if serving.exception() else None
        # Everything the server started, the shutdown watcher included, is gone.
        await asyncio.sleep(0)
        result["leftover_tasks"] = sorted(
            repr(task.get_coro())
            for task in asyncio.all_tasks()
            if task is not asyncio.current_task()
        )
        result["signals_reraised"] = list(caught)
    except Exception as exc:
        # Reported, not raised: the test shows which round went wrong, and how.
        result["error"] = repr(exc)
    finally:
        if writer is not None:
            writer.close()
        if not serving.done():
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
    return result


async def main() -> list[dict[str, Any]]:
    # uvicorn re-raises a signal it caught once serve() returns, with the handler
    # that was installed before: keep one that records it, so the process lives on.
    caught: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    results = []
    for index, mode in enumerate(MODES):
        caught.clear()
        results.append(await one_round(index, mode, caught))
    return results


if __name__ == "__main__":
    rounds = asyncio.run(main())
    sys.stdout.write(json.dumps({"rounds": rounds}) + "\n")
