"""How the apps run under real servers tell the test what happened to their streams:
one JSON line per happening, appended to the file an environment variable names, so
the test sees it whichever process of the server ran the stream, and after the
server has exited. The test reads it with `support.servers.read_records()`."""

from __future__ import annotations

import json
import os
import time
from typing import Any


def append_record(env: str, kind: str, **fields: Any) -> None:
    """Append `{"kind": kind, "pid": ..., "t": ..., **fields}` to the file named by the
    environment variable `env` (nothing if it is unset). The file is opened per write,
    so the line is on disk before the process exits."""
    path = os.environ.get(env)
    if not path:
        return
    line = json.dumps({"kind": kind, "pid": os.getpid(), "t": time.time(), **fields})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
