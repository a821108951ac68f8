"""Class-based Server-Sent Events views for Starlette and FastAPI."""

from __future__ import annotations

from ._asyncapi import asyncapi as asyncapi
from ._broadcast import Broadcast as Broadcast
from ._broadcast import Subscription as Subscription
from ._events import Event as Event
from ._exceptions import BackendError as BackendError
from ._exceptions import BroadcastError as BroadcastError
from ._exceptions import BroadcastNotConnected as BroadcastNotConnected
from ._exceptions import EventShapeWarning as EventShapeWarning
from ._exceptions import HookNameWarning as HookNameWarning
from ._exceptions import InvalidLastEventId as InvalidLastEventId
from ._exceptions import InvalidToken as InvalidToken
from ._exceptions import SettingNameWarning as SettingNameWarning
from ._exceptions import SlowConsumer as SlowConsumer
from ._exceptions import SSEViewsError as SSEViewsError
from ._exceptions import StreamEnded as StreamEnded
from ._lifecycle import DisconnectReason as DisconnectReason
from ._lifecycle import ShutdownMiddleware as ShutdownMiddleware
from ._lifecycle import ShutdownSignal as ShutdownSignal
from ._logging import install_fallback as _install_fallback
from ._metrics import Metrics as Metrics
from ._presence import PresenceEntry as PresenceEntry
from ._reserved import ERROR_EVENT as ERROR_EVENT
from ._reserved import EXPIRED_EVENT as EXPIRED_EVENT
from ._reserved import JOIN_EVENT as JOIN_EVENT
from ._reserved import LEAVE_EVENT as LEAVE_EVENT
from ._reserved import RESET_EVENT as RESET_EVENT
from ._routing import StreamRouter as StreamRouter
from ._static import js_route as js_route
from ._views import EventStreamView as EventStreamView

__version__ = "0.1.0"

# Warnings and errors show with their level even when the app configures no logging.
_install_fallback()

__all__ = [
    "ERROR_EVENT",
    "EXPIRED_EVENT",
    "JOIN_EVENT",
    "LEAVE_EVENT",
    "RESET_EVENT",
    "BackendError",
    "Broadcast",
    "BroadcastError",
    "BroadcastNotConnected",
    "DisconnectReason",
    "Event",
    "EventShapeWarning",
    "EventStreamView",
    "HookNameWarning",
    "InvalidLastEventId",
    "InvalidToken",
    "Metrics",
    "PresenceEntry",
    "SSEViewsError",
    "SettingNameWarning",
    "ShutdownMiddleware",
    "ShutdownSignal",
    "SlowConsumer",
    "StreamEnded",
    "StreamRouter",
    "Subscription",
    "asyncapi",
    "js_route",
]
