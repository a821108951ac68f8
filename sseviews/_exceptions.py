"""Exceptions raised by sseviews.

Every exception the library raises on purpose derives from `SSEViewsError`:

    SSEViewsError
    ├── StreamEnded            the test client's stream has ended
    ├── InvalidLastEventId     a Last-Event-ID this broadcast layer did not issue
    ├── InvalidToken           a stream token that is missing, forged, malformed or expired
    ├── SettingNameWarning     a view attribute that looks like a misspelt setting
    ├── HookNameWarning        a view method that looks like a misspelt hook
    ├── EventShapeWarning      a yielded value shaped like another SSE library's event
    └── BroadcastError         the broadcast layer cannot do its job
        ├── BroadcastNotConnected
        ├── SlowConsumer       a subscriber fell too far behind its groups
        └── BackendError       the live backend or the history store failed

Bad values given to a constructor or a function raise the built-in `ValueError`
or `TypeError` where the value enters, with a message that says what was expected.
"""

from __future__ import annotations


class SSEViewsError(Exception):
    """Base class of every exception raised by sseviews."""


class StreamEnded(SSEViewsError):
    """Raised by the test client when a stream has ended and no event is left to read."""


class InvalidLastEventId(SSEViewsError):
    """Raised when a `Last-Event-ID` was not issued by this broadcast layer.

    Views turn it into a `400 Bad Request` response.
    """


class InvalidToken(SSEViewsError):
    """Raised when `StreamTokens.verify()` rejects a token.

    The token is forged or signed with an unknown secret, malformed, expired, or
    its claims have the wrong types. The message says which. Views that set
    `tokens` turn it into a `401 Unauthorized` response.
    """


class BroadcastError(SSEViewsError):
    """Raised when the broadcast layer cannot publish or deliver events."""


class BroadcastNotConnected(BroadcastError):
    """Raised when a broadcast is used before `async with broadcast:` connected it."""


class SlowConsumer(BroadcastError):
    """Raised when a subscriber fell further behind its groups than its buffer allows.

    Nothing is dropped silently: the subscription ends, and the client resumes
    from its last event id (streams end with `DisconnectReason.SLOW_CONSUMER`).
    """


class BackendError(BroadcastError):
    """Raised when the live backend (Redis) or the history store (SQL) fails.

    Subscribers end with this error instead of hanging or silently missing events;
    clients reconnect and replay from their `Last-Event-ID`.
    """


class SettingNameWarning(SSEViewsError, UserWarning):
    """Warned when a view subclass sets an attribute that looks like a misspelt setting.

    For example `ping_intervall = 5`: the view would silently keep the default
    `ping_interval`. Rename the attribute, or, if the name is meant, silence the
    warning with `warnings.filterwarnings("ignore", category=SettingNameWarning)`.
    """


class HookNameWarning(SSEViewsError, UserWarning):
    """Warned when a view subclass defines a method that looks like a misspelt hook.

    For example `async def event(self)` or `async def on_disconect(self, reason)`:
    sseviews would never call it, and the view would keep the default hook. Rename
    the method, or, if the name is meant, silence the warning with
    `warnings.filterwarnings("ignore", category=HookNameWarning)`.
    """


class EventShapeWarning(SSEViewsError, UserWarning):
    """Warned when `events()` yields a value shaped like another SSE library's event.

    A `("tick", data)` tuple, or a dict such as `{"event": "tick", "data": ...}`
    (sse-starlette's form), is sent by sseviews as the JSON data of an unnamed
    event; `Event(data, event="tick")` sends an event named `tick`. sseviews looks
    at the first value each stream yields that is not an `Event`, and warns once
    per view class.
    """
