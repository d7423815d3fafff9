"""ImageSource.read_blob over a stream that returns a body piece by piece, as the registry's BlobStream
does when the body arrives in several packets (seen with traces over a shaped link: the node benchmark)."""

from __future__ import annotations

import io

import pytest

from dadi.digests import sha256_digest
from dadi.errors import ImageError
from dadi.image.base import ImageSource
from dadi.image.manifest import Descriptor


class _Trickle(io.RawIOBase):
    """A raw stream handing out at most `piece` bytes per read, like read1 on a slow socket."""

    def __init__(self, data: bytes, piece: int):
        self._data = data
        self._pos = 0
        self._piece = piece

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._piece, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


class _TrickleSource(ImageSource):
    description = "trickle"

    def __init__(self, data: bytes, piece: int):
        self._data = data
        self._piece = piece

    def get_manifest(self):
        raise NotImplementedError

    def _open_raw(self, desc):
        return _Trickle(self._data, self._piece)

    def read_range(self, desc, offset, length):
        return self._data[offset : offset + length]


def _desc(data: bytes, size: int | None = None) -> Descriptor:
    return Descriptor("application/octet-stream", sha256_digest(data), len(data) if size is None else size)


@pytest.mark.parametrize("piece", [1, 1448, 3699, 1 << 20])
def test_read_blob_reads_a_body_that_arrives_in_pieces(piece):
    data = bytes(range(256)) * 20  # 5120 bytes: several packets
    assert _TrickleSource(data, piece).read_blob(_desc(data), "blob") == data


def test_read_blob_still_rejects_a_short_or_long_blob():
    data = b"x" * 5000
    with pytest.raises(ImageError, match="4999 bytes, but its descriptor says 5000"):
        _TrickleSource(data[:-1], 1000).read_blob(_desc(data), "blob")
    with pytest.raises(ImageError, match="5000 bytes, but its descriptor says 4999"):
        _TrickleSource(data, 1000).read_blob(_desc(data[:-1]), "blob")
