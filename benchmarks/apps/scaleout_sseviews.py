"""Per-user groups with sseviews: the app of ``benchmarks/bench_scaleout.py``, case (a).

* ``GET /user?u=N`` -- an ``EventStreamView`` that streams the group ``u:N``
  (one group per user, as an app that notifies each user of their own events).
* ``GET /start?n=5000&interval=0.001`` -- starts one task that publishes ``n``
  events on a fixed schedule (``fanout_common.publish_paced``), each to the
  group of a user drawn at random from ``0..SCALEOUT_USERS-1`` by a seeded
  generator: ``await bc.publish("u:<user>", {"t": ..., "i": n, "u": user})``.
  The client checks that every event reaches the stream of its ``u`` exactly once.
* ``GET /stats`` -- as in the other fan-out apps (``fanout_common.py``).

The broadcast, its URL (``FANOUT_BROADCAST_URL``), prefix (``FANOUT_PREFIX``) and
lifespan are those of ``fanout_sseviews.py``, so several processes share the
groups through Redis. ``SCALEOUT_USERS`` (default 4000) is how many users the
publisher draws from; ``SCALEOUT_SEED`` (default 17) seeds the draw.

Run with ``python -m uvicorn benchmarks.apps.scaleout_sseviews:app`` from the repo
root.
"""

from __future__ import annotations

import os
import random

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from benchmarks.apps.fanout_common import Publisher, control_routes, payload
from benchmarks.apps.fanout_sseviews import bc, lifespan
from sseviews import EventStreamView

USERS = int(os.environ.get("SCALEOUT_USERS", "4000"))
_draw = random.Random(int(os.environ.get("SCALEOUT_SEED", "17")))


class UserEvents(EventStreamView):
    broadcast = bc
    ping_interval = None
    send_timeout = None

    def groups(self) -> list[str]:
        user = self.request.query_params.get("u", "")
        if not user.isdigit():
            raise HTTPException(400, "expected ?u=<user number>")
        return [f"u:{int(user)}"]


async def publish_to_random_user(index: int) -> None:
    user = _draw.randrange(USERS)
    await bc.publish(f"u:{user}", {**payload(index), "u": user})


publisher = Publisher(publish_to_random_user)

app = Starlette(
    routes=[Route("/user", UserEvents), *control_routes(publisher, lambda: bc.subscriber_count)],
    lifespan=lifespan,
)
