"""The sseviews sample app: a chat, a live dashboard, job progress and a private room.

Run it with `python -m example_project` (or `sseviews run example_project`).
"""

from __future__ import annotations

from .app import app, create_app
from .settings import Settings

__all__ = ["Settings", "app", "create_app"]
