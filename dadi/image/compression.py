"""Decompression of source layer streams: gzip, zstd or none, as the media type says (or sniffed)."""

from __future__ import annotations

import gzip
import io
import zlib
from typing import BinaryIO

import zstandard

from dadi.errors import ImageError

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _PeekableStream(io.RawIOBase):
    """Lets us sniff the first bytes of a non-seekable stream and still hand all of it on."""

    def __init__(self, stream: BinaryIO, head: bytes):
        self._stream = stream
        self._head = head

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _ErrorTranslatingStream(io.RawIOBase):
    """Turns a decompressor's own exceptions into an ImageError that names the layer."""

    def __init__(self, stream, source: BinaryIO, what: str, kind: str):
        self._stream = stream
        self._source = source  # closed with us: GzipFile leaves the file object it reads open
        self._what = what
        self._kind = kind

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
            self._source.close()
        super().close()

    def readinto(self, buffer) -> int:
        try:
            data = self._stream.read(len(buffer))
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            raise ImageError(f"{self._what}: corrupt {self._kind} stream: {exc}") from exc
        buffer[: len(data)] = data
        return len(data)


class _ZstdFrames(io.RawIOBase):
    """Decompresses concatenated zstd frames and, unlike zstandard's stream_reader, fails when the
    input ends inside a frame (a truncated blob must not pass for a shorter layer)."""

    def __init__(self, stream: BinaryIO, what: str):
        self._stream = stream
        self._what = what
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False  # bytes of the current frame were fed and it has not ended yet
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            data = self._stream.read(1 << 20)
            if not data:
                if self._in_frame:
                    raise ImageError(f"{self._what}: corrupt zstd stream: input ends inside a frame (truncated?)")
                return 0
            self._pending = self._feed(data)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _feed(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self._frame.decompress(data))
            self._in_frame = not self._frame.eof
            if not self._frame.eof:
                break
            data = self._frame.unused_data
            self._frame = self._decompressor.decompressobj()
        return b"".join(out)


def open_decompressed(stream: BinaryIO, compression: str, what: str) -> BinaryIO:
    """A readable stream of the uncompressed tar. compression: "gzip", "zstd", "none" or "auto"."""
    head = stream.read(4)
    raw = _PeekableStream(stream, head)
    if compression == "auto":
        if head.startswith(_GZIP_MAGIC):
            compression = "gzip"
        elif head.startswith(_ZSTD_MAGIC):
            compression = "zstd"
        else:
            compression = "none"
    if compression == "none":
        return io.BufferedReader(raw, 1 << 20)
    buffered = io.BufferedReader(raw, 1 << 20)
    if compression == "gzip" and head.startswith(_GZIP_MAGIC):
        inner = gzip.GzipFile(fileobj=buffered, mode="rb")
    elif compression == "zstd" and head.startswith(_ZSTD_MAGIC):
        inner = _ZstdFrames(buffered, what)
    else:
        buffered.close()
        if compression in ("gzip", "zstd"):
            raise ImageError(f"{what}: media type says {compression}, but the blob does not start with its magic")
        raise ImageError(f"{what}: unknown compression {compression!r}")
    return io.BufferedReader(_ErrorTranslatingStream(inner, buffered, what, compression), 1 << 20)
