"""The sseviews sample app: a chat, a live dashboard, job progress and a private room.

Run it with `python -m example_project` (or `sseviews run example_project`).
"""

from __future__ import annotations

from .app import create_app
from .settings import Settings

app = create_app()

__all__ = ["Settings", "app", "create_app"]
