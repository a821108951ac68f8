"""Class-based Server-Sent Events views for Starlette and FastAPI."""

from __future__ import annotations

from ._broadcast import RESET_EVENT as RESET_EVENT
from ._broadcast import Broadcast as Broadcast
from ._broadcast import Subscription as Subscription
from ._events import Event as Event
from ._exceptions import BackendError as BackendError
from ._exceptions import BroadcastError as BroadcastError
from ._exceptions import BroadcastNotConnected as BroadcastNotConnected
from ._exceptions import InvalidLastEventId as InvalidLastEventId
from ._exceptions import SlowConsumer as SlowConsumer
from ._exceptions import SSEViewsError as SSEViewsError
from ._exceptions import StreamEnded as StreamEnded
from ._lifecycle import DisconnectReason as DisconnectReason
from ._lifecycle import ShutdownMiddleware as ShutdownMiddleware
from ._lifecycle import ShutdownSignal as ShutdownSignal
from ._metrics import Metrics as Metrics
from ._routing import StreamRouter as StreamRouter
from ._views import EventStreamView as EventStreamView

__version__ = "0.1.0"

__all__ = [
    "RESET_EVENT",
    "BackendError",
    "Broadcast",
    "BroadcastError",
    "BroadcastNotConnected",
    "DisconnectReason",
    "Event",
    "EventStreamView",
    "InvalidLastEventId",
    "Metrics",
    "SSEViewsError",
    "ShutdownMiddleware",
    "ShutdownSignal",
    "SlowConsumer",
    "StreamEnded",
    "StreamRouter",
    "Subscription",
]
