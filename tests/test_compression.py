"""Compressed streams: negotiation, the encoders, and compressed views end to end."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import brotli
import pytest
import zstandard
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.routing import Route
from support.apps import app_for

from sseviews import Broadcast, Event, EventStreamView, Metrics
from sseviews import _compression as compression
from sseviews._compression import Decoder, make_encoder, negotiate
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio

TIMEOUT = 3.0
ENCODINGS = ["gzip", "br", "zstd"]


def decompress(name: str, wire: bytes) -> bytes:
    """`wire` decoded by each encoding's reference decoder, not by `Decoder`."""
    if name == "gzip":
        return gzip.decompress(wire)
    if name == "br":
        return brotli.decompress(wire)  # type: ignore[no-any-return]
    reader = zstandard.ZstdDecompressor().stream_reader(wire, read_across_frames=True)
    return reader.read()


def reading(n: int) -> bytes:
    """A dashboard-like event's data: the same keys every time, a few changing values."""
    sample = {
        "sensor": "north-field",
        "temperature": 20 + n % 7,
        "humidity": 40 + n % 3,
        "battery_percent": 97,
        "status": "ok",
        "n": n,
    }
    return json.dumps(sample).encode()


# -- negotiation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "offered", "chosen"),
    [
        (None, ("gzip",), None),
        ("", ("gzip",), None),
        ("gzip", ("gzip",), "gzip"),
        ("gzip, deflate, br, zstd", ("zstd", "gzip", "br"), "zstd"),  # Chromium's: ours wins
        ("gzip, deflate, br, zstd", ("br", "gzip"), "br"),
        ("gzip;q=0.5, br", ("zstd", "gzip", "br"), "br"),  # the client's q wins
        ("GZIP;Q=0.8", ("gzip",), "gzip"),
        ("x-gzip", ("gzip",), "gzip"),
        ("*", ("br", "gzip"), "br"),
        ("*;q=0.5, gzip;q=0", ("gzip", "br"), "br"),
        ("gzip;q=0", ("gzip",), None),
        ("identity", ("gzip",), None),
        ("identity;q=0, deflate", ("gzip",), None),  # identity is all that is left
        ("gzip;q=oops, br", ("gzip", "br"), "br"),
    ],
)
def test_negotiate_picks_the_clients_best(
    accept: str | None, offered: tuple[str, ...], chosen: str | None
) -> None:
    assert negotiate(accept, offered) == chosen


# -- the encoders -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ENCODINGS)
def test_encoder_flushes_every_chunk_and_ends_cleanly(name: str) -> None:
    encoder = make_encoder(name)
    decoder = Decoder(name)
    sent = [b"retry: 1000\n"]
    decoded = [decoder.decode(encoder.start(sent[0]))]
    for n in range(40):
        chunk = b"id: %d\ndata: %s\n\n" % (n, reading(n))
        sent.append(chunk)
        # Every chunk decodes whole at once: nothing waits in the compressor.
        piece = decoder.decode(encoder.encode(chunk, n % 10 == 9))
        if name == "br" and n == 0:
            piece = decoded.pop() + piece  # brotli holds the preamble for the first write
        assert piece.endswith(chunk)
        decoded.append(piece)
    last = b"event: bye\ndata: x\n\n"
    sent.append(last)
    wire_end = encoder.finish(last)
    decoded.append(decoder.decode(wire_end))
    assert decoder.ended
    assert b"".join(decoded) == b"".join(sent)


@pytest.mark.parametrize("name", ENCODINGS)
def test_encoder_output_is_one_valid_body(name: str) -> None:
    encoder = make_encoder(name)
    parts = [encoder.start(b"retry: 500\n")]
    chunks = [b"data: %s\n\n" % reading(n) for n in range(100)]
    for n, chunk in enumerate(chunks):
        parts.append(encoder.encode(chunk, n in (3, 50)))
    parts.append(encoder.finish(b""))
    wire = b"".join(parts)
    plain = b"retry: 500\n" + b"".join(chunks)
    assert decompress(name, wire) == plain
    # Each flush costs a few bytes of its own: the 5x of the benchmark's streams is
    # not reached on events this small.
    assert len(wire) * 4 <= len(plain), f"{name}: {len(plain)} bytes became {len(wire)}"


def test_gzip_encoder_frees_its_compressor_when_idle_and_shares_the_preamble() -> None:
    first, second = make_encoder("gzip"), make_encoder("gzip")
    assert first.start(b"retry: 10\n") is second.start(b"retry: 10\n")  # one cached preamble
    assert first._deflate is None  # type: ignore[attr-defined]  # none for the head
    first.encode(b"data: 1\n\n", False)
    assert first._deflate is not None  # type: ignore[attr-defined]
    first.encode(b": ping\n\n", True)
    assert first._deflate is None  # type: ignore[attr-defined]


def test_gzip_encoder_partial_flushes_events_and_full_flushes_at_idle() -> None:
    encoder = make_encoder("gzip")
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert inflate.decompress(encoder.start(b"retry: 10\n")) == b"retry: 10\n"
    for n in range(20):
        chunk = b"id: %d\ndata: %s\n\n" % (n, reading(n))
        wire = encoder.encode(chunk, False)
        # A partial flush: no sync flush's empty stored block, 4 bytes saved per event,
        # and still every byte of the event decodes at once.
        assert not wire.endswith(b"\x00\x00\xff\xff"), n
        assert inflate.decompress(wire) == chunk
    # At idle, a FULL flush ends on a byte boundary, so a new compressor can go on.
    wire = encoder.encode(b": ping\n\n", True)
    assert wire.endswith(b"\x00\x00\xff\xff")
    assert inflate.decompress(wire) == b": ping\n\n"
    assert inflate.decompress(encoder.encode(b"data: again\n\n", False)) == b"data: again\n\n"


def test_decoder_rejects_an_unknown_or_broken_body() -> None:
    with pytest.raises(ValueError, match="cannot decode Content-Encoding 'deflate'"):
        Decoder("deflate")
    with pytest.raises(ValueError, match="invalid gzip body"):
        Decoder("gzip").decode(b"not gzip at all")


# -- the setting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "error", "message"),
    [
        (("gzip", "deflate"), ValueError, "unknown encoding 'deflate'"),
        (("gzip", "gzip"), ValueError, "names an encoding twice"),
        ((), TypeError, "non-empty tuple"),
        (["gzip"], TypeError, "non-empty tuple"),
        ("gzip", TypeError, "non-empty tuple"),
    ],
)
def test_compress_setting_checked(setting: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        type("Bad", (EventStreamView,), {"compress": setting})


def test_compress_setting_names_the_extra_of_a_missing_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(compression, "brotli", None)
    with pytest.raises(ValueError, match=r"needs the 'brotli' package: pip install 'sseviews\["):
        type("Bad", (EventStreamView,), {"compress": ("br", "gzip")})
    assert compression.offered_encodings(True) == ("gzip", "zstd")


# -- compressed views -------------------------------------------------------------------


def readings_view(count: int, gate: anyio.Event | None = None, **settings: Any) -> type:
    async def events(self: EventStreamView) -> AsyncIterator[Any]:
        for n in range(count):
            if gate is not None and n == 1:
                await gate.wait()  # the first event must arrive before the second exists
            yield Event(reading(n).decode(), id=str(n))

    attrs: dict[str, Any] = {"events": events, "compress": True, "retry": 1500}
    attrs.update(settings)
    return type("Readings", (EventStreamView,), attrs)


@pytest.mark.parametrize("name", ENCODINGS)
async def test_view_compresses_what_the_client_accepts(name: str) -> None:
    gate = anyio.Event()
    view = readings_view(200, gate, compress=(name,))
    async with EventStreamClient(view, timeout=TIMEOUT) as client:
        async with client.stream("/", headers={"Accept-Encoding": f"{name}, identity"}) as stream:
            assert stream.headers["content-encoding"] == name
            assert stream.headers["vary"] == "Accept-Encoding"
            first = await stream.next_event()  # flushed: no later event is needed
            assert first.id == "0"
            gate.set()
            events = [first] + [await stream.next_event() for _ in range(199)]
            await stream.wait_ended()
            assert [e.data for e in events] == [reading(n).decode() for n in range(200)]
            assert stream.retry == 1500
            assert decompress(name, stream.wire) == stream.raw
            assert len(stream.wire) * 4 <= len(stream.raw)


async def test_view_without_accept_encoding_sends_identity_with_vary() -> None:
    async with EventStreamClient(readings_view(3), timeout=TIMEOUT) as client:
        async with client.stream("/") as stream:
            assert "content-encoding" not in stream.headers
            assert stream.headers["vary"] == "Accept-Encoding"
            assert [(await stream.next_event()).id for _ in range(3)] == ["0", "1", "2"]
            await stream.wait_ended()
            assert stream.wire == stream.raw


async def test_view_true_prefers_gzip_then_zstd_then_br() -> None:
    async with EventStreamClient(readings_view(1), timeout=TIMEOUT) as client:
        for accept, chosen in [("br, zstd, gzip", "gzip"), ("br, zstd", "zstd"), ("br", "br")]:
            async with client.stream("/", headers={"Accept-Encoding": accept}) as stream:
                assert stream.headers["content-encoding"] == chosen
                assert (await stream.next_event()).id == "0"


async def test_view_head_answers_with_the_negotiated_encoding() -> None:
    async with EventStreamClient(readings_view(1), timeout=TIMEOUT) as client:
        response = await client.request("HEAD", "/", headers={"Accept-Encoding": "gzip"})
        assert response.headers["content-encoding"] == "gzip"
        assert response.headers["vary"] == "Accept-Encoding"


@pytest.mark.parametrize("name", ENCODINGS)
async def test_view_pings_are_flushed_and_the_stream_goes_on_after_them(name: str) -> None:
    gate = anyio.Event()

    class Slow(EventStreamView):
        compress = (name,)
        ping_interval = 0.05

        async def events(self) -> AsyncIterator[Any]:
            yield "before"
            await gate.wait()
            yield "after"

    async with EventStreamClient(Slow, timeout=TIMEOUT) as client:
        async with client.stream("/", headers={"Accept-Encoding": name}) as stream:
            assert (await stream.next_event()).data == "before"
            await stream.next_comment()  # a ping, decoded as soon as it was sent
            gate.set()
            assert (await stream.next_event()).data == "after"
            await stream.wait_ended()
            assert decompress(name, stream.wire) == stream.raw


@pytest.mark.parametrize("name", ENCODINGS)
async def test_view_error_farewell_is_compressed_and_ends_the_encoding(name: str) -> None:
    class Failing(EventStreamView):
        compress = (name,)

        async def events(self) -> AsyncIterator[Any]:
            yield "one"
            raise RuntimeError("boom")

    async with EventStreamClient(Failing, timeout=TIMEOUT) as client:
        async with client.stream("/", headers={"Accept-Encoding": name}) as stream:
            assert (await stream.next_event()).data == "one"
            farewell = await stream.next_event()
            assert farewell.event == "sseviews.error"
            await stream.wait_ended()
            assert decompress(name, stream.wire) == stream.raw


@pytest.mark.parametrize("name", ENCODINGS)
async def test_view_group_stream_compressed_resumes_with_last_event_id(name: str) -> None:
    broadcast = Broadcast("memory://")
    view = type(
        "Room",
        (EventStreamView,),
        {"broadcast": broadcast, "groups": ["room"], "compress": (name,), "ping_interval": None},
    )
    app = app_for(broadcast, Route("/room", view))
    accept = {"Accept-Encoding": name}
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/room", headers=accept) as stream:
            assert stream.headers["content-encoding"] == name
            ids = [await broadcast.publish("room", {"n": n}) for n in range(5)]
            seen = [await stream.next_event() for _ in range(5)]
            assert [e.id for e in seen] == ids
        later = [await broadcast.publish("room", {"n": n}) for n in range(5, 8)]
        resumed = {**accept, "Last-Event-ID": seen[-1].id}
        async with client.stream("/room", headers=resumed) as stream:
            replayed = [await stream.next_event() for _ in range(3)]
            assert [e.id for e in replayed] == later
            assert [e.json() for e in replayed] == [{"n": 5}, {"n": 6}, {"n": 7}]


async def test_view_under_gzip_middleware_is_compressed_once() -> None:
    app = Starlette(
        routes=[Route("/", readings_view(50, compress=("gzip",)))],
        middleware=[Middleware(GZipMiddleware, minimum_size=10)],
    )
    async with EventStreamClient(app, timeout=TIMEOUT) as client:
        async with client.stream("/", headers={"Accept-Encoding": "gzip"}) as stream:
            assert stream.headers.getlist("content-encoding") == ["gzip"]
            events = [await stream.next_event() for _ in range(50)]
            await stream.wait_ended()
            assert [e.data for e in events] == [reading(n).decode() for n in range(50)]
            # One layer: the body inflates once to the plain stream.
            assert zlib.decompress(stream.wire, 16 + zlib.MAX_WBITS) == stream.raw
            assert stream.raw.startswith(b"retry: 1500\n")


async def test_view_metrics_count_the_bytes_as_sent() -> None:
    metrics = Metrics()
    view = readings_view(30, compress=("gzip",), metrics=metrics)
    async with EventStreamClient(view, timeout=TIMEOUT) as client:
        async with client.stream("/", headers={"Accept-Encoding": "gzip"}) as stream:
            await stream.wait_ended()
            wire = len(stream.wire)
    counted = metrics.snapshot()["Readings"]
    assert counted["events"] == 30
    assert counted["bytes"] == wire


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            gzip.compress(b"data: x\n\n")[:-8],
            "ended a gzip response before the end of its encoding",
        ),
        (b"plain text", "invalid gzip body"),
    ],
)
async def test_client_fails_a_body_that_does_not_decode(body: bytes, problem: str) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"text/event-stream"), (b"content-encoding", b"gzip")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async with EventStreamClient(app, lifespan=False, timeout=TIMEOUT) as client:
        with pytest.raises(AssertionError, match=problem):
            async with client.stream("/") as stream:
                await stream.next_event()


@pytest.mark.parametrize("name", ENCODINGS)
async def test_view_that_sends_nothing_still_ends_its_encoding(name: str) -> None:
    class Empty(EventStreamView):
        compress = (name,)

        async def events(self) -> AsyncIterator[Any]:
            return
            yield  # an async generator that yields nothing

    async with EventStreamClient(Empty, timeout=TIMEOUT) as client:
        async with client.stream("/", headers={"Accept-Encoding": name}) as stream:
            await stream.wait_ended()  # raises if the encoding did not end
            assert stream.wire
            assert stream.raw == b""
