"""The server process's own metrics, for the dashboard tile."""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The process's resident set size now (its peak where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes


def open_files() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


class ProcessSampler:
    """CPU use is a rate: each sample covers the time since the previous one."""

    def __init__(self) -> None:
        self._wall = time.monotonic()
        self._cpu = time.process_time()

    def sample(self) -> dict[str, Any]:
        wall, cpu = time.monotonic(), time.process_time()
        elapsed = wall - self._wall
        cpu_percent = 100 * (cpu - self._cpu) / elapsed if elapsed > 0 else 0.0
        self._wall, self._cpu = wall, cpu
        return {
            "pid": os.getpid(),
            "rss_bytes": rss_bytes(),
            "cpu_percent": round(cpu_percent, 1),
            "open_files": open_files(),
            "threads": _threads(),
        }


def _threads() -> int | None:
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Threads:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None
