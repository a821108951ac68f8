"""Mistakes in a view, caught as early as each can be, with an error that names the fix.

- **When the class is created** (`check_settings`, `check_events`,
  `check_setting_names`): a setting of the wrong type or out of range, an
  `events` that is not an async generator, and an attribute whose name is a
  near miss of a setting's (`ping_intreval`), which would leave it at its
  default. Also (`check_hooks`, `check_hook_names`): a hook of the
  wrong kind (a plain `def on_connect`, an `async def ping_message`), and a method
  whose name is a near miss of a hook's (`event`, `on_disconect`), which would
  otherwise never be called.
- **When the class is registered** (`StreamRouter.add_stream`, `nothing_to_stream`)
  **and on each request that `on_connect()` accepts** (`wiring_problem`): a view
  with nothing to stream, and `groups` without a `broadcast` (per request only).
  Not at class creation: a base class of other views streams nothing, and
  `View.broadcast = broadcast` after the class statement (inside an app factory,
  say) is a legitimate way to set it.
- **When `on_connect()` returns** (`on_connect_result_problem`): anything but
  None or a `Response`.
- **On the first value a stream yields** (`lookalike_problem`): a `(name, data)`
  tuple or an sse-starlette style dict, which sseviews would send as JSON data.

The checks take the base view class as an argument, so this module never
imports `_views`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from ._broadcast import Broadcast, check_group
from ._compression import compress_problem
from ._exceptions import EventShapeWarning, HookNameWarning, SettingNameWarning
from ._metrics import Metrics
from .stores.base import MAX_CURSOR_GROUPS

__all__ = [
    "check_events",
    "check_hook_names",
    "check_hooks",
    "check_setting_names",
    "check_settings",
    "edit_distance",
    "lookalike_problem",
    "nothing_to_stream",
    "on_connect_result_problem",
    "resembled",
    "warn_lookalike",
    "wiring_problem",
]

# The hooks a view overrides, and the kind each must be.
_ASYNC_HOOKS = ("on_connect", "on_disconnect")
_SYNC_HOOKS = ("ping_message",)  # the writer calls it without awaiting
_EITHER_HOOKS = ("groups", "authorize_group", "presence_info")  # sync or async, no yield
# The names a misspelt method most likely meant (`groups` is a setting: the
# settings check names it).
HOOKS = (
    "events",
    "on_connect",
    "on_disconnect",
    "authorize_group",
    "presence_info",
    "ping_message",
)
# The fields of an sse-starlette event given as a dict.
_SSE_KEYS = frozenset({"event", "data", "id", "retry", "comment"})


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, counting a swap of two neighbours as one edit."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            cost = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            if i > 1 and j > 1 and char_a == b[j - 2] and a[i - 2] == char_b:
                cost = min(cost, previous2[j - 2] + 1)
            current.append(cost)
        previous2, previous = previous, current
    return previous[-1]


def resembled(name: str, candidates: Any) -> str | None:
    """The candidate that `name` looks like a misspelling of, if any.

    One edit is allowed, two in a name of 10 or more characters: `retry` is not
    `entry`, `metrics` not `retries`, `connect` not `on_connect`.
    """
    lowered = name.lower()
    best: tuple[int, str] | None = None
    for candidate in candidates:
        allowed = 1 if len(candidate) < 10 else 2
        if abs(len(lowered) - len(candidate)) > allowed:
            continue
        distance = edit_distance(lowered, candidate)
        if distance <= allowed and (best is None or distance < best[0]):
            best = (distance, candidate)
    return best[1] if best is not None else None


def _function(value: Any) -> Callable[..., Any] | None:
    """The function defined in a class body (None for other attributes)."""
    if isinstance(value, staticmethod | classmethod):
        value = value.__func__
    return value if inspect.isfunction(value) else None


def _is_coroutine_function(function: Callable[..., Any]) -> bool:
    # A decorator that keeps __wrapped__ (functools.wraps) around an async def counts.
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        inspect.unwrap(function)
    )


def _is_async_generator_function(function: Callable[..., Any]) -> bool:
    return inspect.isasyncgenfunction(function) or inspect.isasyncgenfunction(
        inspect.unwrap(function)
    )


def check_hooks(cls: type) -> None:
    """Refuse a hook of the wrong kind, defined in `cls`'s own body.

    Raises:
        TypeError: `on_connect` or `on_disconnect` is not an `async def` (or is an
            async generator), `ping_message` is an `async def`, or `groups`,
            `authorize_group` or `presence_info` is an async generator.
    """
    own = vars(cls)
    view = cls.__name__
    for name in _ASYNC_HOOKS:
        function = _function(own.get(name))
        if function is None:
            continue
        if _is_async_generator_function(function):
            raise TypeError(
                f"{view}.{name}() must be an `async def` without `yield`; it is an async "
                f"generator: remove the `yield`"
            )
        if not _is_coroutine_function(function):
            arguments = "self, reason" if name == "on_disconnect" else "self"
            raise TypeError(
                f"{view}.{name}() must be an `async def` (sseviews awaits it); it is a plain "
                f"def: make it `async def {name}({arguments})`"
            )
    for name in _SYNC_HOOKS:
        function = _function(own.get(name))
        if function is None:
            continue
        if _is_coroutine_function(function) or _is_async_generator_function(function):
            raise TypeError(
                f"{view}.{name}() must be a plain `def` that returns the message (the "
                f"writer calls it without awaiting): make it `def {name}(self)`"
            )
    for name in _EITHER_HOOKS:
        function = _function(own.get(name))
        if function is not None and _is_async_generator_function(function):
            raise TypeError(
                f"{view}.{name}() must return its value (a plain `def` or an `async def` "
                f"with `return`), not yield it: it is an async generator"
            )


def check_hook_names(cls: type, base: type) -> None:
    """Warn about a method of `cls` whose name is a near miss of a hook's.

    A method named like a hook the view already overrides (an `event()` helper
    beside `events()`) is a helper of the view's own, and is not warned about.

    Warns:
        HookNameWarning: naming the hook the method most likely meant.
    """
    for name, value in vars(cls).items():
        if name.startswith("_") or name in HOOKS or _function(value) is None:
            continue
        if hasattr(base, name):
            continue  # an overridden helper or property of the base (describe, ...)
        if any(name in vars(parent) for parent in cls.__mro__[1:]):
            continue  # inherited: warned about where it was first defined
        hook = resembled(name, HOOKS)
        if hook is None or getattr(cls, hook) is not getattr(base, hook):
            continue
        warnings.warn(
            f"{cls.__name__}.{name}() looks like a misspelling of the hook {hook}(), which "
            f"the view does not override, so sseviews never calls {name}(); rename it to {hook}",
            HookNameWarning,
            stacklevel=3,  # this, __init_subclass__, then the class statement
        )


def _sets_groups(cls: type, base: type) -> bool:
    groups = getattr(cls, "groups", ())
    if groups is getattr(base, "groups", ()):
        return False
    return callable(groups) or isinstance(groups, property) or bool(groups)


def nothing_to_stream(cls: type, base: type) -> str | None:
    """Say so when the view can never answer but with an error.

    That is a view that neither overrides `events()` nor sets `broadcast` or
    `groups`, nor `on_connect()` (which may refuse every request on purpose).
    Registering it (`StreamRouter.add_stream`) refuses it.
    """
    if getattr(cls, "on_connect", None) is not getattr(base, "on_connect", None):
        return None
    return _streams_nothing(cls, base)


def _streams_nothing(cls: type, base: type) -> str | None:
    if getattr(cls, "broadcast", None) is not None or _sets_groups(cls, base):
        return None
    if getattr(cls, "events", None) is not getattr(base, "events", None):
        return None
    return (
        f"{cls.__name__} has nothing to stream: override `async def events(self)` (an async "
        f"generator that yields the events), or set `broadcast` and `groups` to stream "
        f"group events"
    )


def wiring_problem(cls: type, base: type) -> str | None:
    """What the view lacks to stream anything, or None when it can stream.

    Cheap (a few attribute reads): it runs on each request of a view without a
    `broadcast`. A view with a broadcast may still get its groups in `on_connect()`
    (an empty list is then refused with 400, per request).
    """
    if getattr(cls, "broadcast", None) is not None:
        return None
    groups = getattr(cls, "groups", ())
    if groups is getattr(base, "groups", ()) and getattr(cls, "events", None) is not getattr(
        base, "events", None
    ):
        return None  # the usual view: its own events(), no groups
    if _sets_groups(cls, base):
        view = cls.__name__
        return (
            f"{view} sets groups but no broadcast, so it has nothing to stream the groups "
            f"from: set `broadcast = Broadcast(...)` on the view (or `{view}.broadcast = "
            f"broadcast` before it serves a request)"
        )
    return _streams_nothing(cls, base)


def on_connect_result_problem(view: str, result: object) -> str:
    """Say why `result`, returned by `on_connect()`, is neither None nor a `Response`."""
    hint = ""
    if isinstance(result, int) and not isinstance(result, bool):
        hint = (
            f"; to refuse with {result}, `raise HTTPException(status_code={result})` or "
            f"`return Response(status_code={result})`"
        )
    elif isinstance(result, bool):
        hint = "; to accept the stream, return None (or nothing)"
    return (
        f"{view}.on_connect() returned {result!r} ({type(result).__name__}): it must return "
        f"None to accept the stream, or refuse it by raising HTTPException or returning a "
        f"starlette Response{hint}"
    )


def lookalike_problem(item: object) -> str | None:
    """What a yielded value written for another SSE library would be mistaken for.

    Only tuples and dicts are looked at; sseviews would send both as JSON data.
    """
    kind = type(item)
    if kind is tuple:
        assert isinstance(item, tuple)
        if len(item) == 2 and isinstance(item[0], str) and item[0]:
            name = item[0]
            return (
                f"a ({name!r}, data) tuple, which sseviews sends as one JSON array of data "
                f"in an unnamed event; to send an event named {name!r}, yield "
                f"Event(data, event={name!r}) (from sseviews import Event); to send the "
                f"array, yield a list"
            )
        return None
    if kind is dict:
        assert isinstance(item, dict)
        keys = set(item)
        if len(keys) >= 2 and keys <= _SSE_KEYS and ("data" in keys or "event" in keys):
            fields = ", ".join(
                f"{key}=..." for key in ("event", "id", "retry", "comment") if key in keys
            )
            args = "data" + (", " + fields if fields else "")
            return (
                f"a dict with the keys of an sse-starlette event ({', '.join(sorted(keys))}), "
                f"which sseviews sends as the JSON data of an unnamed event; yield "
                f"Event({args}) instead (from sseviews import Event)"
            )
    return None


def warn_lookalike(cls: type, events: Callable[..., Any], problem: str) -> None:
    """Warn once (the caller keeps count) about a lookalike value, at `events()`'s def."""
    function = inspect.unwrap(events)
    code = getattr(function, "__code__", None)
    filename = code.co_filename if code is not None else "<unknown>"
    lineno = code.co_firstlineno if code is not None else 0
    warnings.warn_explicit(
        f"{cls.__name__}.events() yielded {problem} (warned once per view class)",
        EventShapeWarning,
        filename,
        lineno,
        module=cls.__module__,
    )


def _check_seconds(cls: type, name: str, *, allow_none: bool, allow_zero: bool) -> None:
    value = getattr(cls, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        expected = "a number of seconds" + (" or None" if allow_none else "")
        raise TypeError(f"{cls.__name__}.{name} must be {expected}, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{cls.__name__}.{name} must be {bound}, got {value!r}")


def check_settings(cls: Any) -> None:
    """Check the view's settings when its class is created: a TypeError or ValueError
    that names the setting and what it expects."""
    _check_seconds(cls, "ping_interval", allow_none=True, allow_zero=False)
    _check_seconds(cls, "send_timeout", allow_none=True, allow_zero=False)
    _check_seconds(cls, "shutdown_grace_period", allow_none=False, allow_zero=True)
    _check_seconds(cls, "disconnect_timeout", allow_none=False, allow_zero=False)
    _check_seconds(cls, "max_lifetime", allow_none=True, allow_zero=False)
    if cls.tokens is not None and not callable(getattr(cls.tokens, "verify", None)):
        raise TypeError(f"{cls.__name__}.tokens must be a StreamTokens, got {cls.tokens!r}")
    if cls.token_cookie is not None and not isinstance(cls.token_cookie, str):
        raise TypeError(f"{cls.__name__}.token_cookie must be a str, got {cls.token_cookie!r}")
    for name in ("retry", "error_retry"):
        retry = getattr(cls, name)
        if retry is not None:
            if not isinstance(retry, int) or isinstance(retry, bool):
                raise TypeError(
                    f"{cls.__name__}.{name} must be None or an int of ms, got {retry!r}"
                )
            if retry < 0:
                raise ValueError(f"{cls.__name__}.{name} must be >= 0 (ms), got {retry!r}")
    headers = cls.headers
    if not isinstance(headers, Mapping) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in headers.items()
    ):
        raise TypeError(f"{cls.__name__}.headers must be a mapping of str to str, got {headers!r}")
    problem = compress_problem(cls.__name__, cls.compress)
    if problem is not None:
        raise problem[0](problem[1])
    if cls.broadcast is not None and not isinstance(cls.broadcast, Broadcast):
        raise TypeError(f"{cls.__name__}.broadcast must be a Broadcast, got {cls.broadcast!r}")
    if cls.metrics is not None and not isinstance(cls.metrics, Metrics):
        raise TypeError(f"{cls.__name__}.metrics must be a Metrics, got {cls.metrics!r}")
    if not isinstance(cls.announce_presence, bool):
        raise TypeError(f"{cls.__name__}.announce_presence must be a bool")
    names = ["max_buffer_events", "max_buffer_bytes", "max_groups", "retry_after"]
    names.append("presence_info_max_bytes")
    if cls.max_connections is not None:
        names.append("max_connections")
    for name in names:
        value = getattr(cls, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{cls.__name__}.{name} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{cls.__name__}.{name} must be >= 1, got {value!r}")
    if cls.max_groups > MAX_CURSOR_GROUPS:
        raise ValueError(
            f"{cls.__name__}.max_groups must be <= {MAX_CURSOR_GROUPS} (a stream's id "
            f"carries a position per group), got {cls.max_groups!r}"
        )
    groups = cls.__dict__.get("groups")
    if isinstance(groups, str):
        raise TypeError(f"{cls.__name__}.groups must be a list of names or a method, not a str")
    if groups is not None and not callable(groups) and not isinstance(groups, property):
        for group in groups:
            check_group(group)


def check_events(cls: Any, base: type) -> None:
    """Raise TypeError when the view's `events` is not an async generator function."""
    events = cls.events
    if events is getattr(base, "events", None):
        return
    if inspect.isasyncgenfunction(inspect.unwrap(events)):
        return
    if inspect.iscoroutinefunction(events):
        got = "an async def without yield (a coroutine function)"
    elif inspect.isgeneratorfunction(events):
        got = "a def with yield (a sync generator)"
    elif callable(events):
        got = "a plain def" if inspect.isfunction(events) else repr(events)
    else:
        got = repr(events)
    raise TypeError(
        f"{cls.__name__}.events() must be an async generator: `async def events(self):` "
        f"with `yield` in its body; got {got}"
    )


def check_setting_names(cls: type, base: type) -> None:
    """Warn (`SettingNameWarning`) about a class attribute that looks like a misspelt
    setting of `base`, which would leave the real setting at its default."""
    settings = frozenset(name for name in base.__annotations__ if not name.startswith("_"))
    hooks = frozenset(name for name in vars(base) if not name.startswith("_"))
    for name in cls.__dict__:
        if name.startswith("_") or name in settings or name in hooks:
            continue
        if any(name in vars(base) for base in cls.__mro__[1:]):
            continue  # inherited: warned about where it was first set
        setting = resembled(name, settings)
        value = cls.__dict__[name]
        if inspect.isfunction(value) or isinstance(value, staticmethod | classmethod | property):
            # A method is a helper of the view's own, unless it resembles `groups`,
            # the one setting that may be a method.
            if setting != "groups":
                continue
        if setting is not None:
            warnings.warn(
                f"{cls.__name__}.{name} looks like a misspelling of the setting "
                f"{setting!r}, which it leaves at its default ({getattr(cls, setting)!r}); "
                f"rename it to {setting}",
                SettingNameWarning,
                stacklevel=3,  # this, __init_subclass__, then the class statement
            )
