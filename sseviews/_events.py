"""`Event`, one Server-Sent Events message, and its wire encoding.

The encoding follows the WHATWG HTML "Server-sent events" section: fields are
`name: value` lines separated by `\\n`, and every message ends with a blank line.
An event is encoded once, when it is built, so an event broadcast to many clients
costs one encoding.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import uuid
from collections.abc import Callable
from typing import Any

__all__ = ["Event", "check_line", "dumps", "encode_comment", "encode_data", "event_from_wire"]

_SEPARATORS = (",", ":")


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    model_dump = getattr(value, "model_dump", None)  # pydantic v2 models
    if callable(model_dump):
        return model_dump(mode="json")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(
        f"event data of type {type(value).__name__} is not JSON serializable: "
        "expected str, bytes, dict, list, a number, bool, None, a dataclass, "
        "a pydantic model, a date/time, a UUID or a Decimal"
    )


def dumps(value: Any) -> str:
    try:
        # allow_nan=False: NaN and Infinity are not JSON, and browsers'
        # JSON.parse rejects them even though Python's json.loads accepts them.
        return json.dumps(
            value,
            separators=_SEPARATORS,
            ensure_ascii=False,
            allow_nan=False,
            default=_json_default,
        )
    except ValueError as exc:
        if "Out of range float" not in str(exc):
            raise
        raise ValueError(
            "event data contains NaN or Infinity, which JSON (and the browser's "
            "JSON.parse) cannot represent: send null or a string instead"
        ) from None


def _data_text(data: Any) -> str:
    """Return the text that the `data:` lines carry."""
    if isinstance(data, str):
        return data
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            return bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"bytes event data must be valid UTF-8 text: {exc}") from None
    return dumps(data)


def _split_lines(text: str) -> list[str]:
    # Only CRLF, CR and LF end lines in SSE; str.splitlines() would also split on
    # \v, \f, \x1c, \u2028 and others, which the browser keeps inside the data.
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.split("\n")


def _data_field(text: str) -> str:
    if "\n" not in text and "\r" not in text:
        return "data: " + text + "\n"
    return "".join(["data: " + line + "\n" for line in _split_lines(text)])


def _encode_utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"event text must be encodable as UTF-8: {exc}") from None


def encode_data(data: Any) -> bytes:
    """Encode `data` as the data of one unnamed message.

    This is the fast path for values that a view yields without wrapping them in
    an `Event`. It matches `Event(data).encode()` except for `None`: a bare
    yielded `None` is sent as JSON `null`, while `Event(None)` sends no data.
    """
    if isinstance(data, str) and "\n" not in data and "\r" not in data:
        return _encode_utf8("data: " + data + "\n\n")
    return _encode_utf8(_data_field(_data_text(data)) + "\n")


def encode_comment(text: str) -> bytes:
    """Encode `text` as comment lines (`: text\n`), with no blank line after them.

    A comment line alone is not an event boundary: the WHATWG parser ignores it and
    dispatches nothing, and so do clients that wrongly dispatch an empty event at
    every blank line. The next event's own field lines follow it unchanged.

    Raises:
        TypeError: `text` is not a str.
        ValueError: `text` is not encodable as UTF-8.
    """
    if not isinstance(text, str):
        raise TypeError(
            f"a keep-alive comment must be a str (or send an Event), got {type(text).__name__}"
        )
    if "\n" not in text and "\r" not in text:
        return _encode_utf8(": " + text + "\n")
    return _encode_utf8("".join([": " + line + "\n" for line in _split_lines(text)]))


def check_line(name: str, value: str | None, *, allow_nul: bool = True) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"Event {name} must be a str or None, got {type(value).__name__}")
    if "\n" in value or "\r" in value:
        raise ValueError(
            f"Event {name} must not contain CR or LF (it would inject SSE fields): {value!r}"
        )
    if not allow_nul and "\0" in value:
        raise ValueError(f"Event {name} must not contain NUL (browsers ignore such ids): {value!r}")


class Event:
    """One Server-Sent Events message.

    Args:
        data: The payload. A `str` is sent as it is, split into one `data:` line per
            line; `bytes` are taken as UTF-8 text; anything else (dict, list, number,
            bool, None, dataclass, pydantic model) is JSON-encoded compactly, without
            ASCII escaping. `None` sends no `data:` field at all.
        event: The event name (`event:` field). Browsers dispatch unnamed events to
            `onmessage`, and named ones to `addEventListener(name, ...)`.
        id: The event id (`id:` field); the browser sends the last one it saw back
            as `Last-Event-ID` when it reconnects. An `int` is converted to `str`.
        retry: The reconnection delay the browser should use, in milliseconds.
        comment: A comment (`: ` lines), ignored by browsers; a multi-line comment
            becomes several comment lines.

    Raises:
        ValueError: `event` or `id` contains CR or LF, `id` contains NUL, `retry` is
            negative, the text is not valid UTF-8, or `data` holds NaN or Infinity.
        TypeError: A field has the wrong type, or `data` cannot be JSON-encoded.

    Events are immutable: their wire bytes are computed once, when they are built.
    """

    # Two slots, each set once: the fields as one tuple, and the wire bytes. A view
    # builds an Event for every message it yields, so setting six slots one by one
    # (through object.__setattr__, since assignment raises) was most of its cost.
    __slots__ = ("_fields", "_wire")

    _fields: tuple[Any, str | None, str | None, int | None, str | None]
    _wire: bytes

    def __init__(
        self,
        data: Any = None,
        *,
        event: str | None = None,
        id: str | int | None = None,
        retry: int | None = None,
        comment: str | None = None,
    ) -> None:
        if type(data) is str and "\n" not in data and "\r" not in data:
            text = "data: " + data + "\n"
        elif data is not None:
            text = _data_field(_data_text(data))
        else:
            text = ""
        if event is None and id is None and retry is None and comment is None:
            text += "\n"  # the common case: data only
        else:
            if id is not None:
                if isinstance(id, int) and not isinstance(id, bool):
                    id = str(id)
                check_line("id", id, allow_nul=False)  # type: ignore[arg-type]
            if event is not None:
                check_line("event", event)
            text = _fields_text(text, event, id, retry, comment)  # type: ignore[arg-type]
        try:
            wire = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"event text must be encodable as UTF-8: {exc}") from None
        _set_fields(self, (data, event, id, retry, comment))
        _set_wire(self, wire)

    @property
    def data(self) -> Any:
        """The payload, as given."""
        return self._fields[0]

    @property
    def event(self) -> str | None:
        """The event name (`event:` field), or None."""
        return self._fields[1]

    @property
    def id(self) -> str | None:
        """The event id (`id:` field), or None; an `int` id is kept as a `str`."""
        return self._fields[2]

    @property
    def retry(self) -> int | None:
        """The reconnection delay in milliseconds (`retry:` field), or None."""
        return self._fields[3]

    @property
    def comment(self) -> str | None:
        """The comment (`: ` lines), or None."""
        return self._fields[4]

    def encode(self) -> bytes:
        """Return the message's wire bytes, ending with a blank line."""
        return self._wire

    def json(self) -> Any:
        """Decode the data as JSON, as `JSON.parse(event.data)` would in a browser."""
        if self.data is None:
            raise ValueError("this event has no data")
        return json.loads(_data_text(self.data))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Event is immutable; build a new Event instead")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Event is immutable; build a new Event instead")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self._fields == other._fields

    __hash__ = None  # type: ignore[assignment]  # data may be a dict

    def __repr__(self) -> str:
        fields = [f"{self.data!r}"] if self.data is not None else []
        for name in ("event", "id", "retry", "comment"):
            value = getattr(self, name)
            if value is not None:
                fields.append(f"{name}={value!r}")
        return f"Event({', '.join(fields)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, self._fields)


# Set each slot once, past Event.__setattr__ (which raises): the slots' own setters.
_set_fields: Callable[[Event, tuple[Any, ...]], None] = Event.__dict__["_fields"].__set__
_set_wire: Callable[[Event, bytes], None] = Event.__dict__["_wire"].__set__


def _fields_text(
    text: str, event: str | None, id: str | None, retry: int | None, comment: str | None
) -> str:
    """The field lines of an event with more than data, before its `data:` lines `text`,
    and the blank line that ends it."""
    if retry is not None:
        if not isinstance(retry, int) or isinstance(retry, bool):
            raise TypeError(
                f"Event retry must be an int of milliseconds, got {type(retry).__name__}"
            )
        if retry < 0:
            raise ValueError(f"Event retry must be a non-negative int, got {retry}")
    if comment is not None and not isinstance(comment, str):
        raise TypeError(f"Event comment must be a str or None, got {type(comment).__name__}")
    parts: list[str] = []
    if comment is not None:
        parts.extend([": " + line + "\n" for line in _split_lines(comment)])
    if event is not None:
        parts.append("event: " + event + "\n")
    if id is not None:
        parts.append("id: " + id + "\n")
    if retry is not None:
        parts.append(f"retry: {retry}\n")
    parts.append(text)
    parts.append("\n")
    return "".join(parts)


def _rebuild(
    data: Any, event: str | None, id: str | None, retry: int | None, comment: str | None
) -> Event:
    return Event(data, event=event, id=id, retry=retry, comment=comment)


def event_from_wire(wire: bytes) -> Event:
    """Rebuild an `Event` from bytes this module encoded, keeping those exact bytes."""
    data: list[str] = []
    comments: list[str] = []
    fields: dict[str, str] = {}
    for line in wire.decode("utf-8").split("\n"):
        if not line:
            continue
        name, _, value = line.partition(": ")
        if name == "data":
            data.append(value)
        elif name == "":
            comments.append(value)
        else:
            fields[name] = value
    clone = object.__new__(Event)
    retry = fields.get("retry")
    _set_fields(
        clone,
        (
            "\n".join(data) if data else None,
            fields.get("event"),
            fields.get("id"),
            int(retry) if retry is not None else None,
            "\n".join(comments) if comments else None,
        ),
    )
    _set_wire(clone, wire)
    return clone
