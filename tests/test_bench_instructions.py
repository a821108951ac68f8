"""The in-process driver of `benchmarks/bench_instructions.py`, without valgrind.

A benchmark whose events stop reaching the subscribers must fail, not report a
low count: each contender's app delivers every event to every subscriber through
the driver, and a misdelivery makes the driver raise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("uvloop")  # the benchmark's loop, as the fan-out servers'

# `benchmarks` is a directory of the repository, not an installed package.
_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from benchmarks import bench_instructions as bench  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.apps import fanout_raw  # noqa: E402

SIZES = bench.Sizes(subscribers=50, warmup=2, events=3)
TIMEOUT = 30.0


@pytest.mark.parametrize("key", ["raw", "floor", "sse-starlette", "sseviews"])
def test_bench_instructions_driver_delivers_every_event_to_every_subscriber(key: str) -> None:
    if key == "sse-starlette":
        pytest.importorskip("sse_starlette")
    report = bench.run_child(key, SIZES, TIMEOUT)
    assert report["deliveries_checked"] == 50 * 5
    assert report["body_bytes_per_delivery"] > len('data: {"t":0,"i":0}\n\n')
    assert len(report["gc_collections_in_window"]) == 3


def test_bench_instructions_driver_fails_on_a_misdelivered_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publish_one = fanout_raw.publish_one

    async def misdeliver(index: int) -> None:
        # Event 2 goes twice to one stream and not to another: the count of
        # deliveries is right, the streams are not.
        await publish_one(index)
        if index == 2:
            first, second = sorted(fanout_raw.subscribers, key=id)[:2]
            message: Any = second.get_nowait()
            first.put_nowait(message)

    monkeypatch.setattr(fanout_raw, "publish_one", misdeliver)
    with pytest.raises(harness.BenchError, match=r"events \[0, 1, 3"):
        bench.run_child("raw", SIZES, TIMEOUT)
