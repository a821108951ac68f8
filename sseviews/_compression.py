"""Compressed streams: `Content-Encoding` negotiation and one encoder per stream.

A view with `compress` set answers a request whose `Accept-Encoding` allows it
with a compressed body: gzip always, br with the optional `brotli` package, zstd
with the optional `zstandard` package. The stream's writer hands each chunk it
sends to the stream's encoder, which compresses it and flushes it whole (gzip: a
partial flush, zstd: the end of a block, brotli: a flush), so every event, ping
and final event reaches the client at once; the clean end of a stream finishes
the encoding (gzip's trailer, zstd's frame end).

Memory per idle stream stays small:

- each encoder's level, window and tables are the `GZIP_*`, `BROTLI_*` and
  `ZSTD_*` settings below (their cost is in docs/compression.md);
- a stream holds no compressor until its first event: the gzip header and the
  `retry:` preamble are compressed once per process and shared (a FULL flush
  makes the deflate blocks that follow independent of them, and zstd frames
  may follow each other);
- gzip and zstd streams drop their compressor when the stream goes idle (the
  writer sends a ping): a FULL flush ends the deflate dictionary, so a new raw
  deflate compressor continues the same gzip member (the encoder keeps the CRC32
  and length for the trailer), and a zstd stream ends its frame and starts
  another. A brotli stream cannot be resumed by a new compressor, so it keeps
  its own from its first event to its end.
"""

from __future__ import annotations

import functools
import importlib
import struct
import zlib
from collections.abc import Iterable
from typing import Any, Protocol

from starlette.types import Message, Scope


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:  # pragma: no cover - the test extra installs both
        return None


# The optional packages: used if installed, never required.
brotli: Any = _optional("brotli")
zstandard: Any = _optional("zstandard")

__all__ = [
    "ENCODINGS",
    "Decoder",
    "Encoder",
    "accept_encoding",
    "available_encodings",
    "compressed_start",
    "make_encoder",
    "mark_negotiated",
    "negotiate",
    "offered_encodings",
]

#: Every encoding sseviews knows, in the order `compress = True` prefers them:
#: gzip compresses small flushed events best, br holds the most memory (see below).
ENCODINGS = ("gzip", "zstd", "br")
#: The extra that installs an encoding's optional package.
EXTRAS = {"br": "brotli", "zstd": "zstd"}
_MODULES = {"br": "brotli", "zstd": "zstandard"}

# The settings come from `python benchmarks/bench_compression.py --matrix` (the
# table in docs/compression.md). A gzip or zstd stream drops its compressor at
# idle, but a stream that never idles (a dashboard sending every second) holds it
# for its whole life, so the windows stay small: each step up in window size buys
# a few percent of bytes for tens of KiB per active stream.
# gzip: level 6 with an 8 KiB window (wbits 13) and memLevel 5: about 52 KiB per
# active stream (the 32 KiB window compresses the chat stream 7% more and holds
# 131 KiB; level 9 costs more CPU for a few bytes; memLevel 8 holds more memory
# for the same bytes).
GZIP_LEVEL = 6
GZIP_WBITS = 13
GZIP_MEMLEVEL = 5
# brotli: quality 5 and a 64 KiB window, which holds no more memory than the
# smallest one. A brotli stream keeps its compressor to its end, and no quality
# that compresses flushed events holds less (qualities 0 and 1 hold little but
# do not compress them; quality 2 and up hold about as much).
BROTLI_QUALITY = 5
BROTLI_LGWIN = 16
# zstd: level 6 with a 16 KiB window and 4 K-entry hash and chain tables: about
# 101 KiB per active stream (a 128 KiB window compresses the chat stream 6% more
# and holds 256 KiB; level 9 does no better, level 3 worse).
ZSTD_LEVEL = 6
ZSTD_WINDOW_LOG = 14
ZSTD_HASH_LOG = 12
ZSTD_CHAIN_LOG = 12

# A gzip member header: deflate, no name, no time, unknown OS (RFC 1952).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


def available_encodings() -> tuple[str, ...]:
    """The encodings this process can produce, in `ENCODINGS` order."""
    return tuple(name for name in ENCODINGS if _installed(name))


def _installed(name: str) -> bool:
    if name == "br":
        return brotli is not None
    if name == "zstd":
        return zstandard is not None
    return True


def offered_encodings(setting: bool | tuple[str, ...]) -> tuple[str, ...]:
    """What a view's `compress` setting offers (checked by `check_compress`)."""
    if setting is True:
        return available_encodings()
    if not setting:
        return ()
    return tuple(setting)


def compress_problem(view: str, setting: Any) -> tuple[type[Exception], str] | None:
    """What is wrong with a view's `compress` setting, if anything."""
    if isinstance(setting, bool):
        return None
    if not isinstance(setting, tuple) or not setting:
        return TypeError, (
            f"{view}.compress must be False, True or a non-empty tuple of encodings such "
            f'as ("zstd", "br", "gzip"), got {setting!r}'
        )
    for name in setting:
        if name not in ENCODINGS:
            return ValueError, (
                f"{view}.compress: unknown encoding {name!r}; expected some of {ENCODINGS!r}"
            )
        if not _installed(name):
            return ValueError, (
                f"{view}.compress names {name!r}, which needs the {_MODULES[name]!r} "
                f"package: pip install 'sseviews[{EXTRAS[name]}]'"
            )
    if len(set(setting)) != len(setting):
        return ValueError, f"{view}.compress names an encoding twice: {setting!r}"
    return None


def accept_encoding(scope: Scope) -> str | None:
    """The request's `Accept-Encoding`, its repeated headers joined; None without one."""
    values = [value for name, value in scope["headers"] if name == b"accept-encoding"]
    if not values:
        return None
    return b",".join(values).decode("latin-1")


def negotiate(accept: str | None, offered: Iterable[str]) -> str | None:
    """The encoding to answer `Accept-Encoding: accept` with; None for identity.

    The client's highest q-value wins, the view's order breaks ties; `*` stands
    for every coding the header does not name, and q=0 refuses one. A header that
    allows none of `offered` (or no header at all) gets the identity encoding.
    """
    if not accept:
        return None
    weights: dict[str, float] = {}
    for item in accept.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0  # a malformed weight allows nothing
        if coding == "x-gzip":
            coding = "gzip"
        weights[coding] = max(quality, weights.get(coding, 0.0))
    default = weights.get("*", 0.0)
    best: str | None = None
    best_quality = 0.0
    for coding in offered:
        quality = weights.get(coding, default)
        if quality > best_quality:
            best, best_quality = coding, quality
    return best


def mark_negotiated(head: Message, encoding: str | None) -> None:
    """Add `Vary: Accept-Encoding`, and `Content-Encoding` unless `encoding` is None,
    to the head of a view that compresses."""
    headers = head["headers"]
    headers.append((b"vary", b"Accept-Encoding"))
    if encoding is not None:
        headers.append((b"content-encoding", encoding.encode("latin-1")))


def compressed_start(head: Message, first: bytes, encoder: Encoder | None) -> tuple[Message, bytes]:
    """The head and first chunk of a view that compresses (`encoder` None: the
    client accepts none of its encodings)."""
    if encoder is None:
        mark_negotiated(head, None)
        return head, first
    mark_negotiated(head, encoder.name)
    return head, encoder.start(first)


class Encoder(Protocol):
    """One stream's encoder: what the writer hands each chunk it sends."""

    name: str

    def start(self, first: bytes) -> bytes:
        """The encoded first chunk (the `retry:` line, or empty)."""

    def encode(self, data: bytes, idle: bool) -> bytes:
        """`data` compressed and flushed; `idle` (a ping) lets the encoder free its memory."""

    def finish(self, last: bytes) -> bytes:
        """`last` compressed, and the end of the encoding."""


def make_encoder(name: str) -> Encoder:
    """A new encoder for the negotiated encoding `name`."""
    if name == "gzip":
        return GzipEncoder()
    if name == "br":
        return BrotliEncoder()
    if name == "zstd":
        return ZstdEncoder()
    raise ValueError(f"unknown encoding {name!r}")


def _deflater() -> Any:
    return zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -GZIP_WBITS, GZIP_MEMLEVEL)


@functools.lru_cache(maxsize=32)
def _gzip_preamble(first: bytes) -> tuple[bytes, int]:
    """The gzip header and `first` in deflate blocks ended by a FULL flush, with its CRC32.

    Pure, so shared by every stream that starts with the same `first`.
    """
    deflate = _deflater()
    return _GZIP_HEADER + deflate.compress(first) + deflate.flush(zlib.Z_FULL_FLUSH), zlib.crc32(
        first
    )


class GzipEncoder:
    """gzip (RFC 1952) as a series of raw deflate blocks, each send flushed."""

    __slots__ = ("_crc", "_deflate", "_size")
    name = "gzip"

    def __init__(self) -> None:
        self._deflate: Any = None  # made at the first event, dropped when idle
        self._crc = 0
        self._size = 0

    def start(self, first: bytes) -> bytes:
        data, self._crc = _gzip_preamble(first)
        self._size = len(first)
        return data

    def encode(self, data: bytes, idle: bool) -> bytes:
        deflate = self._deflate
        if deflate is None:
            deflate = self._deflate = _deflater()
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        if idle:
            # A FULL flush ends the dictionary on a byte boundary: a new compressor
            # continues from here.
            self._deflate = None
            return deflate.compress(data) + deflate.flush(zlib.Z_FULL_FLUSH)  # type: ignore[no-any-return]
        # A PARTIAL flush ends the block with the data, then a 10-bit empty block
        # rather than a sync flush's 4-byte marker: the decoder has every byte of
        # `data`, and the next block goes on from the bits still pending.
        return deflate.compress(data) + deflate.flush(zlib.Z_PARTIAL_FLUSH)  # type: ignore[no-any-return]

    def finish(self, last: bytes) -> bytes:
        deflate = self._deflate if self._deflate is not None else _deflater()
        self._deflate = None
        crc = zlib.crc32(last, self._crc)
        size = (self._size + len(last)) & 0xFFFFFFFF
        end: bytes = deflate.compress(last) + deflate.flush(zlib.Z_FINISH)
        return end + struct.pack("<II", crc, size)


class BrotliEncoder:
    """br (RFC 7932): one compressor from the first event to the end of the stream."""

    __slots__ = ("_compressor", "_pending")
    name = "br"

    def __init__(self) -> None:
        self._compressor: Any = None
        # The preamble, held until the first write: a brotli stream cannot be
        # continued by a second compressor, so none is made for the head alone.
        self._pending = b""

    def start(self, first: bytes) -> bytes:
        self._pending = first
        return b""

    def _open(self) -> Any:
        compressor = self._compressor = brotli.Compressor(
            mode=brotli.MODE_TEXT, quality=BROTLI_QUALITY, lgwin=BROTLI_LGWIN
        )
        return compressor

    def encode(self, data: bytes, idle: bool) -> bytes:
        compressor = self._compressor
        if compressor is None:
            compressor = self._open()
            data, self._pending = self._pending + data, b""
        return compressor.process(data) + compressor.flush()  # type: ignore[no-any-return]

    def finish(self, last: bytes) -> bytes:
        compressor = self._compressor
        if compressor is None:
            compressor = self._open()
            last, self._pending = self._pending + last, b""
        self._compressor = None
        return compressor.process(last) + compressor.finish()  # type: ignore[no-any-return]


def _zstd_compressor() -> Any:
    parameters = zstandard.ZstdCompressionParameters.from_level(
        ZSTD_LEVEL,
        window_log=ZSTD_WINDOW_LOG,
        hash_log=ZSTD_HASH_LOG,
        chain_log=ZSTD_CHAIN_LOG,
    )
    return zstandard.ZstdCompressor(compression_params=parameters)


@functools.lru_cache(maxsize=32)
def _zstd_preamble(first: bytes) -> bytes:
    """`first` as one whole zstd frame (empty for an empty `first`); pure, so shared."""
    if not first:
        return b""
    return _zstd_compressor().compress(first)  # type: ignore[no-any-return]


class ZstdEncoder:
    """zstd (RFC 8878) as a series of frames: one per stretch of activity."""

    __slots__ = ("_frame",)
    name = "zstd"

    def __init__(self) -> None:
        self._frame: Any = None  # the open frame's compressor, dropped when idle

    def start(self, first: bytes) -> bytes:
        return _zstd_preamble(first)

    def encode(self, data: bytes, idle: bool) -> bytes:
        frame = self._frame
        if frame is None:
            frame = self._frame = _zstd_compressor().compressobj()
        if idle:
            self._frame = None  # the frame ends; the next write starts another
            return frame.compress(data) + frame.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)  # type: ignore[no-any-return]
        return frame.compress(data) + frame.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)  # type: ignore[no-any-return]

    def finish(self, last: bytes) -> bytes:
        frame, self._frame = self._frame, None
        if frame is None:
            # A whole frame, even an empty one: a body that ends with a frame's end.
            whole: bytes = _zstd_compressor().compress(last)
            return whole
        return frame.compress(last) + frame.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)  # type: ignore[no-any-return]


class Decoder:
    """Decode a compressed body chunk by chunk (the test client's side).

    Each chunk decodes at once to everything it carries, since the encoder
    flushes every send; `ended` is True once the encoding's end was read.
    """

    def __init__(self, name: str) -> None:
        if name not in ENCODINGS:
            raise ValueError(f"cannot decode Content-Encoding {name!r}")
        if not _installed(name):
            raise ValueError(
                f"decoding {name!r} needs the {_MODULES[name]!r} package: "
                f"pip install 'sseviews[{EXTRAS[name]}]'"
            )
        self.name = name
        self.ended = False
        self._inner: Any = self._new()

    def _new(self) -> Any:
        if self.name == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        if self.name == "br":
            return brotli.Decompressor()
        return zstandard.ZstdDecompressor().decompressobj()

    def decode(self, chunk: bytes) -> bytes:
        """The bytes `chunk` carries; ValueError for a chunk that is not valid."""
        try:
            if self.name == "gzip":
                data: bytes = self._inner.decompress(chunk)
                self.ended = self._inner.eof
                return data
            if self.name == "br":
                data = self._inner.process(chunk)
                self.ended = self._inner.is_finished()
                return data
            # zstd: a series of frames, each read by a fresh decompressor.
            out = []
            while chunk:
                inner = self._inner
                out.append(inner.decompress(chunk))
                if not inner.eof:
                    self.ended = False
                    break
                self.ended = True
                chunk = inner.unused_data
                self._inner = self._new()
            return b"".join(out)
        except Exception as exc:  # zlib.error, brotli.error, zstandard.ZstdError
            raise ValueError(f"invalid {self.name} body: {exc}") from exc
