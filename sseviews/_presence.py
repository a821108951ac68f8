"""Presence: which connections are in a group, as entries shared by every process.

A view whose `presence_info()` returns a mapping is *present* in its groups while
its stream is open. The broadcast gives it a connection id and writes one entry,
`{"id": ..., "info": ..., "joined_at": ...}` as compact JSON, to its live backend
at join, and removes it at leave: one backend write each. With `announce_presence`
the same JSON is the data of an ephemeral `sseviews.join` / `sseviews.leave` event
(no id, never stored, never replayed).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

from ._reserved import JOIN_EVENT, LEAVE_EVENT

__all__ = [
    "DEFAULT_PRESENCE_LIMIT",
    "JOIN_EVENT",
    "LEAVE_EVENT",
    "PresenceEntry",
    "encode_entry",
    "entry_from_json",
    "presence_wire",
]

#: How many entries `Broadcast.presence()` returns unless told otherwise.
DEFAULT_PRESENCE_LIMIT = 1000


class PresenceEntry:
    """One open connection listed in a group's presence.

    Attributes:
        id: The connection id the broadcast gave the stream (unique across processes).
        info: What the view's `presence_info()` returned, as JSON decoded it.
        joined_at: When the stream joined, in seconds since the epoch (`time.time()`).
    """

    __slots__ = ("id", "info", "joined_at")

    def __init__(self, id: str, info: dict[str, Any], joined_at: float) -> None:
        self.id = id
        self.info = info
        self.joined_at = joined_at

    def as_dict(self) -> dict[str, Any]:
        """Return the entry as a JSON-ready dict (the data of join and leave events)."""
        return {"id": self.id, "info": self.info, "joined_at": self.joined_at}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PresenceEntry):
            return NotImplemented
        return (self.id, self.info, self.joined_at) == (other.id, other.info, other.joined_at)

    __hash__ = None  # type: ignore[assignment]  # info is a mutable dict

    def __repr__(self) -> str:
        return f"PresenceEntry(id={self.id!r}, info={self.info!r}, joined_at={self.joined_at!r})"


def encode_entry(member_id: str, info: object, max_bytes: int) -> bytes:
    """Return the entry's compact JSON (one line, no NUL), or raise if `info` is not fit.

    Raises:
        TypeError: `info` is not a mapping with str keys, or not JSON-serialisable.
        ValueError: Its JSON is larger than `max_bytes`.
    """
    if not isinstance(info, Mapping):
        raise TypeError(
            f"presence_info() must return a mapping (or None), got {type(info).__name__}"
        )
    try:
        info_json = json.dumps(
            dict(info), separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise TypeError(f"presence_info() must return JSON-serialisable data: {exc}") from None
    size = len(info_json.encode("utf-8"))
    if size > max_bytes:
        raise ValueError(
            f"presence_info() returned {size} bytes of JSON, more than the "
            f"{max_bytes} allowed (presence_info_max_bytes); it is refused, not truncated"
        )
    joined_at = round(time.time(), 3)
    # json.dumps escapes every control character, so the entry is one line without NUL.
    entry = f'{{"id":{json.dumps(member_id)},"info":{info_json},"joined_at":{joined_at}}}'
    return entry.encode("utf-8")


def entry_from_json(raw: bytes) -> PresenceEntry:
    data = json.loads(raw)
    joined_at = float(data["joined_at"])
    if not math.isfinite(joined_at):  # pragma: no cover - written by encode_entry
        joined_at = 0.0
    return PresenceEntry(str(data["id"]), data["info"], joined_at)


def presence_wire(event: str, entry: bytes) -> bytes:
    """The wire bytes of an ephemeral join/leave event: a name and data, no id."""
    return b"event: %s\ndata: %s\n\n" % (event.encode(), entry)
