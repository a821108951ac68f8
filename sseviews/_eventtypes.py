"""A view's declared events (`event_types`) and the check of what it sends against them.

A view declares `event_types = {"tick": Tick, "message": ChatMessage}`: the SSE
event name (`"message"` for unnamed events, as the browser names them) and the
type of its payload. The declaration is compiled once, at class creation, into an
`EventTypes`, so a view without one pays nothing per event.

Payloads are checked as the client will decode them: JSON for structured types,
the text itself for `str`. Plain types, dataclasses, TypedDicts, enums and
`Literal`s are checked here; pydantic models (and any type this module does not
know, when pydantic is installed) are checked by pydantic, imported only then.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import sys
import types
import typing
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Literal, Protocol, Union

from starlette.types import Scope

from ._events import Event, check_line, dumps
from ._reserved import EVENT_CHECKS_KEY

__all__ = [
    "UNNAMED",
    "CheckedStream",
    "EventTypes",
    "compile_event_types",
    "is_pydantic_type",
    "typeddict_fields",
]

logger = logging.getLogger("sseviews")


class CheckedStream(Protocol):
    """What the check needs of the view whose events it checks (`EventStreamView` is one)."""

    scope: Scope

    def describe(self) -> str: ...


#: The name that stands for unnamed events: the browser dispatches them as "message".
UNNAMED = "message"

# A check returns None when `value` fits, else what is wrong (`path` names where).
_Check = Callable[[Any, str], "str | None"]

_BYTES = (bytes, bytearray, memoryview)
_SUPPORTED = (
    "str, int, float, bool, None, Any, list[T], tuple[T, ...], dict[str, T], a union, "
    "Literal[...], an Enum, a TypedDict, a dataclass or a pydantic model"
)


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _where(path: str) -> str:
    return f" at {path.lstrip('.')}" if path else ""


def is_pydantic_type(tp: Any) -> bool:
    """True when `tp` is a pydantic model class (without importing pydantic)."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is None or not isinstance(tp, type):
        return False
    return issubclass(tp, pydantic.BaseModel)


def _is_typeddict(tp: Any) -> bool:
    return isinstance(tp, type) and typing.is_typeddict(tp)


def typeddict_fields(tp: type) -> tuple[dict[str, Any], set[str]]:
    """A TypedDict's field types and required keys (`Required`/`NotRequired` read
    from the annotations, which `__required_keys__` misses under postponed ones)."""
    hints = typing.get_type_hints(tp, include_extras=True)
    total = getattr(tp, "__total__", True)
    fields: dict[str, Any] = {}
    required: set[str] = set()
    for name, hint in hints.items():
        needed = total
        while True:
            origin = typing.get_origin(hint)
            if origin is typing.Required or origin is typing.NotRequired:
                needed = origin is typing.Required
                hint = typing.get_args(hint)[0]
            elif origin is typing.Annotated:
                hint = typing.get_args(hint)[0]
            else:
                break
        fields[name] = hint
        if needed:
            required.add(name)
    return fields, required


class _Unsupported(Exception):
    """A type this module cannot check without pydantic."""


class _Compiler:
    """Turns a type into a check; one per declaration, so recursive types work."""

    def __init__(self) -> None:
        self._named: dict[Any, _Check] = {}

    def compile(self, tp: Any) -> _Check:
        if tp is Any or tp is object:
            return _accept
        if tp is None or tp is type(None):
            return _is_none
        if tp is bool:
            return _is_bool
        if tp is int:
            return _is_int
        if tp is float:
            return _is_float
        if tp is str:
            return _is_str
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Annotated:
            return self.compile(args[0])
        if origin is Union or origin is types.UnionType:
            return _union([self.compile(arg) for arg in args], tp)
        if origin is Literal:
            return _literal(args)
        if tp in (list, tuple, set, frozenset) or origin in (list, set, frozenset, Sequence):
            item = self.compile(args[0]) if args else _accept
            return _array(item)
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return _array(self.compile(args[0]))
            return _fixed_tuple([self.compile(arg) for arg in args])
        if tp is dict or origin in (dict, Mapping):
            if args and args[0] is not str:
                raise _Unsupported(f"dict keys must be str in JSON, got {args[0]!r}")
            value = self.compile(args[1]) if args else _accept
            return _object(value)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return _enum(tp)
        if is_pydantic_type(tp):
            raise _Unsupported("a pydantic model")
        if _is_typeddict(tp) or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return self._record(tp)
        raise _Unsupported(f"{tp!r}")

    def _record(self, tp: type) -> _Check:
        known = self._named.get(tp)
        if known is not None:
            return known
        fields: dict[str, _Check] = {}
        required: set[str] = set()
        is_dataclass = not _is_typeddict(tp)  # isinstance() refuses TypedDicts

        def check(value: Any, path: str) -> str | None:
            if is_dataclass and isinstance(value, tp):
                value = {name: getattr(value, name) for name in fields}
            elif not isinstance(value, dict):
                return f"expected {tp.__name__} (an object), got {_describe(value)}{_where(path)}"
            for name in required:
                if name not in value:
                    return f"{tp.__name__} is missing {name!r}{_where(path)}"
            for name, item in value.items():
                field = fields.get(name)
                if field is not None:
                    problem = field(item, f"{path}.{name}")
                    if problem is not None:
                        return problem
            return None

        self._named[tp] = check  # before the fields: a field may refer back to tp
        try:
            if _is_typeddict(tp):
                hints, needed = typeddict_fields(tp)
            else:
                hints = typing.get_type_hints(tp)
        except Exception as exc:
            message = f"the annotations of {tp.__name__} cannot be resolved: {exc}"
            raise _Unsupported(message) from None
        if _is_typeddict(tp):
            names = list(hints)
            required.update(needed)
        else:
            names = [field.name for field in dataclasses.fields(tp)]
            for field in dataclasses.fields(tp):
                no_default = field.default is dataclasses.MISSING
                if no_default and field.default_factory is dataclasses.MISSING:
                    required.add(field.name)
        for name in names:
            fields[name] = self.compile(hints[name])
        return check


def _accept(value: Any, path: str) -> str | None:
    return None


def _is_none(value: Any, path: str) -> str | None:
    return None if value is None else f"expected null, got {_describe(value)}{_where(path)}"


def _is_bool(value: Any, path: str) -> str | None:
    if value is True or value is False:
        return None
    return f"expected bool, got {_describe(value)}{_where(path)}"


def _is_int(value: Any, path: str) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    return f"expected int, got {_describe(value)}{_where(path)}"


def _is_float(value: Any, path: str) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            return f"expected a finite number, got {value!r}{_where(path)}"
        return None
    return f"expected float, got {_describe(value)}{_where(path)}"


def _is_str(value: Any, path: str) -> str | None:
    return None if isinstance(value, str) else f"expected str, got {_describe(value)}{_where(path)}"


def _union(checks: list[_Check], tp: Any) -> _Check:
    def check(value: Any, path: str) -> str | None:
        for each in checks:
            if each(value, path) is None:
                return None
        return f"expected {_type_name(tp)}, got {_describe(value)}{_where(path)}"

    return check


def _literal(values: tuple[Any, ...]) -> _Check:
    allowed = [value.value if isinstance(value, enum.Enum) else value for value in values]

    def check(value: Any, path: str) -> str | None:
        if isinstance(value, enum.Enum):
            value = value.value
        for each in allowed:
            if value == each and type(value) is type(each):
                return None
        return f"expected one of {allowed!r}, got {_describe(value)}{_where(path)}"

    return check


def _enum(tp: type[enum.Enum]) -> _Check:
    values = [member.value for member in tp]

    def check(value: Any, path: str) -> str | None:
        if isinstance(value, tp) or value in values:
            return None
        return f"expected a value of {tp.__name__} {values!r}, got {_describe(value)}{_where(path)}"

    return check


def _array(item: _Check) -> _Check:
    def check(value: Any, path: str) -> str | None:
        if not isinstance(value, list | tuple | set | frozenset):
            return f"expected a list, got {_describe(value)}{_where(path)}"
        for index, each in enumerate(value):
            problem = item(each, f"{path}[{index}]")
            if problem is not None:
                return problem
        return None

    return check


def _fixed_tuple(items: list[_Check]) -> _Check:
    def check(value: Any, path: str) -> str | None:
        if not isinstance(value, list | tuple) or len(value) != len(items):
            return f"expected a list of {len(items)} items, got {_describe(value)}{_where(path)}"
        for index, (each, item) in enumerate(zip(value, items, strict=True)):
            problem = item(each, f"{path}[{index}]")
            if problem is not None:
                return problem
        return None

    return check


def _object(item: _Check) -> _Check:
    def check(value: Any, path: str) -> str | None:
        if not isinstance(value, dict):
            return f"expected an object (dict), got {_describe(value)}{_where(path)}"
        for key, each in value.items():
            if not isinstance(key, str):
                return f"expected str keys, got {_describe(key)}{_where(path)}"
            problem = item(each, f"{path}.{key}")
            if problem is not None:
                return problem
        return None

    return check


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return repr(tp).replace("typing.", "")


class _NoType:
    """Stands for "no fast path": no value has this type."""


_NO_TYPE: Any = _NoType


class _Payload:
    """The check of one declared payload type, as the client will decode it."""

    __slots__ = ("_adapter", "_check", "exact", "type")

    def __init__(self, tp: Any) -> None:
        self.type = tp
        self._check: _Check | None = None
        self._adapter: Any = None
        # An instance of a pydantic model or dataclass is trusted: it was checked
        # (pydantic) or is checked field by field, without encoding it first.
        self.exact = tp if is_pydantic_type(tp) else _NO_TYPE
        try:
            self._check = _Compiler().compile(tp)
        except _Unsupported as exc:
            try:
                from pydantic import TypeAdapter
            except ImportError:
                raise TypeError(
                    f"cannot check payloads of type {tp!r} ({exc}): expected {_SUPPORTED}; "
                    "other types need pydantic installed"
                ) from None
            try:
                self._adapter = TypeAdapter(tp)
            except Exception as error:
                raise TypeError(f"pydantic cannot check payloads of type {tp!r}: {error}") from None

    def problem(self, data: Any) -> str | None:
        """What is wrong with `data` as this payload, or None when it fits."""
        check = self._check
        if check is not None:
            problem = check(data, "")
            if problem is None:
                return None
            if isinstance(data, _BYTES):
                try:
                    data = bytes(data).decode("utf-8")
                except UnicodeDecodeError:
                    return "the data is not UTF-8 text"
                problem = check(data, "")
                if problem is None:
                    return None
            if not isinstance(data, str):
                return problem
            # Text that is not itself a valid payload: the client parses it as JSON.
            try:
                decoded = json.loads(data)
            except ValueError:
                return problem
            return check(decoded, "")
        if type(data) is self.exact:
            return None
        if isinstance(data, _BYTES):
            try:
                data = bytes(data).decode("utf-8")
            except UnicodeDecodeError:
                return "the data is not UTF-8 text"
        text = data if isinstance(data, str) else dumps(data)
        try:
            self._adapter.validate_json(text, strict=True)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            errors = getattr(exc, "errors", None)
            if not callable(errors):
                return str(exc)
            return "; ".join(
                f"{error['msg']}{_where('.'.join(str(part) for part in error['loc']))}"
                for error in errors()
            )
        return None


class EventTypes:
    """A view's compiled `event_types`: the check of each event it sends."""

    __slots__ = ("_payloads", "_reported", "declared")

    def __init__(self, declared: Mapping[str, Any]) -> None:
        self.declared: dict[str, Any] = dict(declared)
        self._payloads = {name: _Payload(tp) for name, tp in self.declared.items()}
        # (view, event name) pairs already logged: each mismatch is logged once.
        self._reported: set[tuple[str, str]] = set()

    def problem(self, name: str | None, data: Any) -> str | None:
        """What is wrong with event `name` carrying `data`, or None when it fits."""
        payload = self._payloads.get(name or UNNAMED)
        if payload is None:
            declared = ", ".join(repr(each) for each in self.declared)
            return f"the event name is not declared (declared: {declared})"
        try:
            return payload.problem(data)
        except (TypeError, ValueError) as exc:  # data that cannot even be encoded
            return str(exc)

    def report(self, view: CheckedStream, name: str | None, data: Any, problem: str) -> None:
        """Report a mismatch: to the test client when there is one, else log it once."""
        view_name = type(view).__qualname__
        event_name = name or UNNAMED
        if event_name in self.declared:
            expected = f"expected {_type_name(self.declared[event_name])}"
        else:
            expected = "an undeclared event name"
        message = (
            f"{view_name} sent event {event_name!r} that does not match its event_types "
            f"({expected}): {problem}; sent {_describe(data)}"
        )
        extensions = view.scope.get("extensions") or {}
        recorder = extensions.get(EVENT_CHECKS_KEY)
        if recorder is not None:
            recorder.event_mismatch(message)
            return
        key = (f"{type(view).__module__}.{view_name}", event_name)
        if key in self._reported:
            return
        self._reported.add(key)
        logger.error(
            "%s: %s; the event was not sent (later mismatches of this event are dropped "
            "without logging)",
            view.describe(),
            message,
        )

    def relayed(self, view: CheckedStream) -> None:
        """Hand the check to a test client: this stream relays group events as bytes.

        In production those bytes are not decoded again (check what you publish);
        `EventStreamClient` checks each event it parses from them.
        """
        extensions = view.scope.get("extensions") or {}
        recorder = extensions.get(EVENT_CHECKS_KEY)
        if recorder is not None:
            recorder.check_relayed(self, type(view).__qualname__)

    async def checked(self, view: CheckedStream, events: Any) -> AsyncIterator[Any]:
        """Relay `events` (the view's `events()`), dropping and reporting mismatches."""
        payloads = self._payloads
        try:
            async for item in events:
                if isinstance(item, Event):
                    name, data = item.event or UNNAMED, item.data
                    if data is None:  # not dispatched by the browser: nothing to check
                        yield item
                        continue
                else:
                    name, data = UNNAMED, item
                payload = payloads.get(name)
                if payload is not None and type(data) is payload.exact:
                    yield item  # a pydantic model instance of the declared model
                    continue
                problem = self.problem(name, data)
                if problem is None:
                    yield item
                else:
                    self.report(view, name, data, problem)
        finally:
            await events.aclose()


def compile_event_types(cls: type) -> EventTypes | None:
    """Check `cls.event_types` and compile it; None when the view declares none.

    Raises:
        TypeError: It is not a mapping of event names to types, or a type cannot be checked.
        ValueError: An event name is empty or holds CR or LF.
    """
    declared = cls.event_types  # type: ignore[attr-defined]
    if declared is None:
        return None
    if not isinstance(declared, Mapping):
        raise TypeError(
            f"{cls.__name__}.event_types must be a mapping of event names to payload types "
            f'(for example {{"tick": Tick, "message": str}}), got {declared!r}'
        )
    for name, tp in declared.items():
        if not isinstance(name, str):
            raise TypeError(
                f"{cls.__name__}.event_types keys must be event names (str; "
                f'"{UNNAMED}" for unnamed events), got {name!r}'
            )
        if not name:
            raise ValueError(
                f'{cls.__name__}.event_types has an empty event name: use "{UNNAMED}" '
                "for unnamed events"
            )
        try:
            check_line("event", name)
        except ValueError:
            raise ValueError(
                f"{cls.__name__}.event_types has the event name {name!r}, which holds "
                "CR or LF: expected a name on one line"
            ) from None
        if isinstance(tp, str):
            raise TypeError(
                f"{cls.__name__}.event_types[{name!r}] must be a type, got the string {tp!r}"
            )
    try:
        return EventTypes(declared)
    except TypeError as exc:
        raise TypeError(f"{cls.__name__}.event_types: {exc}") from None
