"""The names sseviews reserves: the events it sends itself, and its ASGI scope keys.

Every module that sends, parses or documents one of these takes it from here, so a
name is spelt once (the Redis scripts get `sseviews.join` and `sseviews.leave`
from here too, through `_redis.LUA_LIVE`).
"""

from __future__ import annotations

__all__ = [
    "ERROR_EVENT",
    "EVENT_CHECKS_KEY",
    "EXPIRED_EVENT",
    "JOIN_EVENT",
    "LEAVE_EVENT",
    "RESERVED_EVENTS",
    "RESET_EVENT",
    "SHUTDOWN_KEY",
]

#: The name of the event sent instead of a replay when a cursor cannot be resumed.
RESET_EVENT = "sseviews.reset"

#: The name of the event a stream sends last when its `events()` raised: its data
#: is `{"reason": "error"}`, never the exception, and it carries a `retry:` field
#: (the view's `error_retry`) so that clients come back later, not at once.
ERROR_EVENT = "sseviews.error"

#: The name of the event a stream sends last when it ends because its token
#: expired: the client fetches a new token before it reconnects.
EXPIRED_EVENT = "sseviews.expired"

#: The name of the ephemeral event published when a connection joins a group.
JOIN_EVENT = "sseviews.join"

#: The name of the ephemeral event published when a connection leaves a group.
LEAVE_EVENT = "sseviews.leave"

#: Every event name above.
RESERVED_EVENTS = frozenset({RESET_EVENT, ERROR_EVENT, EXPIRED_EVENT, JOIN_EVENT, LEAVE_EVENT})

#: The ASGI scope extension under which a request's `ShutdownSignal` is found.
SHUTDOWN_KEY = "sseviews.shutdown"

#: The ASGI scope extension under which a test client collects the mismatches of a
#: view's `event_types`, instead of the log.
EVENT_CHECKS_KEY = "sseviews.event_checks"
