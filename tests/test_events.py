from __future__ import annotations

import dataclasses
import json
import pickle
from typing import Any

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sseviews import Event
from sseviews._events import encode_comment, encode_data
from sseviews.testing import EventParser


@dataclasses.dataclass
class Point:
    x: int
    label: str


class User(pydantic.BaseModel):
    name: str
    tags: list[str]


# -- data -----------------------------------------------------------------------


def test_event_str_data_single_line() -> None:
    assert Event("hello").encode() == b"data: hello\n\n"


@pytest.mark.parametrize(
    ("text", "wire"),
    [
        ("a\nb", b"data: a\ndata: b\n\n"),
        ("a\rb", b"data: a\ndata: b\n\n"),
        ("a\r\nb", b"data: a\ndata: b\n\n"),
        ("a\r\n\r\nb", b"data: a\ndata: \ndata: b\n\n"),
        ("a\n\rb", b"data: a\ndata: \ndata: b\n\n"),
        ("a\n", b"data: a\ndata: \n\n"),
        ("\n", b"data: \ndata: \n\n"),
        ("", b"data: \n\n"),
    ],
)
def test_event_str_data_split_on_cr_lf_crlf(text: str, wire: bytes) -> None:
    assert Event(text).encode() == wire


def test_event_str_data_keeps_other_unicode_line_breaks() -> None:
    # Browsers only end lines on CR and LF; \v, \f, \x85, \u2028 stay in the data.
    text = "a\vb\fc\x1cd\x85e\u2028f\u2029g"
    assert Event(text).encode() == ("data: " + text + "\n\n").encode()


def test_event_str_data_keeps_leading_spaces() -> None:
    assert Event("  two spaces").encode() == b"data:   two spaces\n\n"


def test_event_str_data_encoded_as_utf8() -> None:
    assert Event("héllo ✓ 😀").encode() == "data: héllo ✓ 😀\n\n".encode()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ({"a": 1, "b": [1, 2]}, '{"a":1,"b":[1,2]}'),
        ([1, "x", None], '[1,"x",null]'),
        (42, "42"),
        (1.5, "1.5"),
        (True, "true"),
        (False, "false"),
        ({"name": "José ✓"}, '{"name":"José ✓"}'),
        (Point(1, "é"), '{"x":1,"label":"é"}'),
        (User(name="Zoë", tags=["a"]), '{"name":"Zoë","tags":["a"]}'),
    ],
)
def test_event_json_data_compact_utf8_no_ascii_escaping(value: Any, text: str) -> None:
    assert Event(value).encode() == ("data: " + text + "\n\n").encode("utf-8")


def test_event_json_data_with_newline_in_string_stays_one_line() -> None:
    wire = Event({"text": "a\nb"}).encode()
    assert wire == b'data: {"text":"a\\nb"}\n\n'


def test_event_json_data_not_serializable_raises_type_error() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        Event({"x": object()})


def test_event_bytes_data_taken_as_utf8() -> None:
    assert Event("é\nx".encode()).encode() == "data: é\ndata: x\n\n".encode()


def test_event_bytes_data_invalid_utf8_raises_value_error() -> None:
    with pytest.raises(ValueError, match="UTF-8"):
        Event(b"\xff\xfe")


def test_event_none_data_sends_no_data_field() -> None:
    assert Event(event="tick").encode() == b"event: tick\n\n"


def test_event_lone_surrogate_raises_value_error() -> None:
    with pytest.raises(ValueError, match="UTF-8"):
        Event("\ud800")


def test_event_json_helper_decodes_data() -> None:
    assert Event({"a": [1]}).json() == {"a": [1]}
    assert Event('{"b": 2}').json() == {"b": 2}


# -- event and id ---------------------------------------------------------------


def test_event_named_event_and_id_fields() -> None:
    wire = Event("x", event="update", id="7").encode()
    assert wire == b"event: update\nid: 7\ndata: x\n\n"


def test_event_int_id_converted_to_str() -> None:
    event = Event("x", id=12)
    assert event.id == "12"
    assert b"id: 12\n" in event.encode()


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "\n", "x\r"])
def test_event_event_name_with_cr_or_lf_raises_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        Event("x", event=bad)


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "\n", "x\r"])
def test_event_id_with_cr_or_lf_raises_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        Event("x", id=bad)


def test_event_id_with_nul_raises_value_error() -> None:
    with pytest.raises(ValueError, match="NUL"):
        Event("x", id="a\0b")


def test_event_event_name_with_nul_is_allowed() -> None:
    assert Event("x", event="a\0b").encode() == b"event: a\0b\ndata: x\n\n"


@pytest.mark.parametrize("field", ["event", "id", "comment"])
def test_event_text_field_wrong_type_raises_type_error(field: str) -> None:
    with pytest.raises(TypeError):
        Event("x", **{field: b"bytes"})


# -- retry ----------------------------------------------------------------------


@pytest.mark.parametrize("retry", [0, 1, 3000])
def test_event_retry_non_negative_int(retry: int) -> None:
    assert Event(retry=retry).encode() == f"retry: {retry}\n\n".encode()


@pytest.mark.parametrize("retry", [True, False, 1.0, 1.5, "100"])
def test_event_retry_wrong_type_raises_type_error(retry: Any) -> None:
    with pytest.raises(TypeError):
        Event("x", retry=retry)


def test_event_retry_negative_raises_value_error() -> None:
    with pytest.raises(ValueError):
        Event("x", retry=-1)


# -- comment and framing --------------------------------------------------------


def test_event_comment_encoded_as_colon_line() -> None:
    assert Event(comment="hi").encode() == b": hi\n\n"


@pytest.mark.parametrize("comment", ["one\ntwo\rthree", "one\r\ntwo\nthree"])
def test_event_multi_line_comment_split(comment: str) -> None:
    first, second, third = ("one", "two", "three")
    wire = Event(comment=comment).encode()
    assert wire == f": {first}\n: {second}\n: {third}\n\n".encode()


def test_encode_comment_is_one_line_without_a_blank_line() -> None:
    assert encode_comment("ping") == b": ping\n"
    assert encode_comment("") == b": \n"
    assert encode_comment("a\r\nb\rc") == b": a\n: b\n: c\n"


def test_encode_comment_dispatches_nothing() -> None:
    parser = EventParser()
    assert parser.feed(encode_comment("ping") * 3) == []
    assert parser.comments == ["ping"] * 3


@pytest.mark.parametrize("text", [None, b"ping", 1])
def test_encode_comment_wrong_type_raises_type_error(text: Any) -> None:
    with pytest.raises(TypeError, match="must be a str"):
        encode_comment(text)


def test_event_all_fields_framing() -> None:
    wire = Event("a\nb", event="e", id="1", retry=10, comment="c").encode()
    assert wire == b": c\nevent: e\nid: 1\nretry: 10\ndata: a\ndata: b\n\n"
    assert b"\r" not in wire
    assert wire.endswith(b"\n\n")
    assert not wire.endswith(b"\n\n\n")


def test_event_encode_cached() -> None:
    event = Event({"a": 1}, event="e", id="1")
    first = event.encode()
    assert event.encode() is first


def test_event_immutable() -> None:
    event = Event("x", event="e")
    with pytest.raises(AttributeError):
        event.data = "y"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        event.event = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del event.id
    with pytest.raises(AttributeError):
        event.extra = 1  # type: ignore[attr-defined]
    assert event.data == "x"
    assert event.encode() == b"event: e\ndata: x\n\n"


def test_event_equality_and_unhashable() -> None:
    assert Event("x", id="1") == Event("x", id="1")
    assert Event("x", id="1") != Event("x", id="2")
    with pytest.raises(TypeError):
        hash(Event("x"))


def test_event_pickle_round_trip() -> None:
    event = Event({"a": 1}, event="e", id="3", retry=5, comment="c")
    clone = pickle.loads(pickle.dumps(event))
    assert clone == event
    assert clone.encode() == event.encode()


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "two\nlines",
        "cr\rcrlf\r\nend",
        "",
        "é ✓ 😀",
        b"bytes",
        "é\r\n".encode(),
        {"a": 1},
        [1, 2],
        3,
        2.5,
        True,
        Point(1, "p"),
        User(name="u", tags=[]),
    ],
)
def test_encode_data_equals_event_encode(value: Any) -> None:
    assert encode_data(value) == Event(value).encode()


def test_encode_data_invalid_utf8_bytes_raises_value_error() -> None:
    with pytest.raises(ValueError):
        encode_data(b"\xc3")


# -- properties -----------------------------------------------------------------

_line_text = st.text().filter(lambda s: "\r" not in s and "\n" not in s)
_id_text = _line_text.filter(lambda s: "\0" not in s)


@given(
    data=st.text(),
    event=st.none() | _line_text,
    id=st.none() | _id_text,
    retry=st.none() | st.integers(min_value=0, max_value=2**63),
    comment=st.none() | st.text(),
)
def test_event_round_trips_through_whatwg_parser(
    data: str, event: str | None, id: str | None, retry: int | None, comment: str | None
) -> None:
    wire = Event(data, event=event, id=id, retry=retry, comment=comment).encode()
    parser = EventParser()
    (parsed,) = parser.feed(wire)
    assert parsed.data == data.replace("\r\n", "\n").replace("\r", "\n")
    # An empty event type dispatches as an unnamed "message" event, as in browsers.
    assert parsed.event == (event or None)
    assert parsed.id == id
    assert parser.retry == retry
    if comment is None:
        assert parser.comments == []
    else:
        assert parser.comments == comment.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    assert parser.last_event_id == (id or "")


@given(
    st.lists(st.tuples(st.text(), st.none() | _line_text), min_size=1, max_size=5),
    st.lists(st.text(), max_size=6),
    st.integers(min_value=1, max_value=7),
)
def test_encode_comment_between_events_never_merges_into_them(
    events: list[tuple[str, str | None]], comments: list[str], step: int
) -> None:
    # Comment lines (keep-alive pings) before, between and after events, in any
    # chunking: the events parse exactly as they do without them.
    encoded = [Event(data, event=name, id=str(i)).encode() for i, (data, name) in enumerate(events)]
    pieces = [encode_comment(comment) for comment in comments]
    wire = b"".join(
        (pieces[i] if i < len(pieces) else b"") + event for i, event in enumerate(encoded)
    ) + b"".join(pieces[len(encoded) :])
    parser = EventParser()
    parsed = []
    for start in range(0, len(wire), step):
        parsed.extend(parser.feed(wire[start : start + step]))
    alone = EventParser().feed(b"".join(encoded))
    assert [(e.data, e.event, e.id) for e in parsed] == [(e.data, e.event, e.id) for e in alone]
    assert len(parsed) == len(events)


@given(st.lists(st.text(), min_size=1, max_size=5), st.integers(min_value=1, max_value=7))
def test_event_stream_parses_back_in_any_chunking(texts: list[str], step: int) -> None:
    wire = b"".join(Event(text, id=str(i)).encode() for i, text in enumerate(texts))
    parser = EventParser()
    parsed = []
    for start in range(0, len(wire), step):
        parsed.extend(parser.feed(wire[start : start + step]))
    assert [event.data for event in parsed] == [
        text.replace("\r\n", "\n").replace("\r", "\n") for text in texts
    ]
    assert [event.id for event in parsed] == [str(i) for i in range(len(texts))]


@given(st.text(max_size=20))
def test_event_event_name_rejected_exactly_when_it_has_cr_or_lf(name: str) -> None:
    bad = "\r" in name or "\n" in name
    try:
        Event("x", event=name)
    except ValueError:
        assert bad
    else:
        assert not bad


@given(st.text(max_size=20))
def test_event_id_rejected_exactly_when_it_has_cr_lf_or_nul(id: str) -> None:
    bad = "\r" in id or "\n" in id or "\0" in id
    try:
        Event("x", id=id)
    except ValueError:
        assert bad
    else:
        assert not bad


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)  # JSON has no NaN or Infinity
    | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@given(st.lists(_json_values, max_size=3) | st.dictionaries(st.text(), _json_values, max_size=3))
def test_event_json_data_round_trips(value: Any) -> None:
    (parsed,) = EventParser().feed(Event(value).encode())
    assert json.loads(parsed.data) == value


@pytest.mark.parametrize(
    "data", [float("nan"), float("inf"), {"x": float("-inf")}, [1.0, float("nan")]]
)
def test_event_non_finite_float_data_raises_value_error(data: object) -> None:
    # NaN and Infinity are not JSON: browsers' JSON.parse rejects them.
    with pytest.raises(ValueError, match="NaN or Infinity"):
        Event(data)
    with pytest.raises(ValueError, match="NaN or Infinity"):
        encode_data(data)
