"""Configuration, read from the environment.

Every setting has a default that runs on one machine with nothing else installed:
a SQLite file for the messages and the in-process (`memory://`) broadcast.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Settings:
    """The app's settings; `Settings.from_env()` reads them from environment variables."""

    # DATABASE_URL: where messages and jobs are stored (SQLite or PostgreSQL).
    database_url: str = "sqlite+aiosqlite:///./example.db"
    # BROADCAST_URL: memory:// for one process, redis://host:6379/0 for several workers.
    broadcast_url: str = "memory://"
    # HISTORY_URL: where the replay history lives; empty means the broadcast's own
    # (memory, or Redis Streams with redis://). A SQL URL keeps it across restarts;
    # give SQLite a file of its own, not the DATABASE_URL one.
    history_url: str | None = None
    # BROADCAST_PREFIX: Redis keys and history tables are named after it, so two apps
    # (or two test runs) can share one Redis or one database.
    broadcast_prefix: str = "example_project"
    # PRIVATE_TOKEN: the token that opens the private room.
    private_token: str = "letmein"
    # JOB_STEPS and JOB_STEP_SECONDS: how long the demo job takes.
    job_steps: int = 10
    job_step_seconds: float = 0.5
    # METRICS_INTERVAL: seconds between two dashboard updates.
    metrics_interval: float = 1.0
    # NODE_MODULES: the folder npm installed htmx and its SSE extension into, for the
    # /htmx page; empty means example_project/node_modules in the checkout.
    node_modules: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `environ` (default: `os.environ`); unset names keep defaults.

        Raises:
            ValueError: A number setting is not a number.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in fields(cls):
            raw = environ.get(field.name.upper())
            if raw is None or raw == "":
                continue
            kind = type(field.default)
            try:
                values[field.name] = kind(raw) if kind in (int, float) else raw
            except ValueError:
                raise ValueError(f"{field.name.upper()} must be a number, got {raw!r}") from None
        return cls(**values)
