"""What the converter, export and inspect need of an image's home: a source to read, a target to write."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

from dadi.digests import VerifyingReader, sha256_digest
from dadi.errors import ImageError
from dadi.image.manifest import Descriptor, ImageConfig, ImageManifest

# Configs and manifests are small; a bigger one is a broken or hostile source.
MAX_METADATA_BLOB = 16 << 20


def _read_up_to(stream: BinaryIO, limit: int) -> bytes:
    """Up to `limit` bytes, fewer only at the end of the stream. A raw stream (the registry's BlobStream)
    returns what has arrived on each read, so one read of a body spread over several packets is short."""
    parts: list[bytes] = []
    got = 0
    while got < limit:
        part = stream.read(limit - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


class ImageSource(ABC):
    """An image to read: its manifest, config and blobs. Every blob read is checked against its digest."""

    description: str

    @abstractmethod
    def get_manifest(self) -> ImageManifest: ...

    @abstractmethod
    def _open_raw(self, desc: Descriptor) -> BinaryIO: ...

    @abstractmethod
    def read_range(self, desc: Descriptor, offset: int, length: int) -> bytes:
        """Bytes of a blob, unverified: the caller checks them against a digest it trusts."""

    def open_blob(self, desc: Descriptor, what: str) -> VerifyingReader:
        return VerifyingReader(self._open_raw(desc), desc.digest, desc.size, what)

    def read_blob(self, desc: Descriptor, what: str) -> bytes:
        if desc.size > MAX_METADATA_BLOB:
            raise ImageError(f"{what}: {desc.size} bytes is too big for a manifest or config")
        with self._open_raw(desc) as stream:
            data = _read_up_to(stream, desc.size + 1)
        if len(data) != desc.size:
            raise ImageError(f"{what}: {len(data)} bytes, but its descriptor says {desc.size}")
        if sha256_digest(data) != desc.digest:
            raise ImageError(f"{what}: digest mismatch: expected {desc.digest}, got {sha256_digest(data)}")
        return data

    def get_config(self, manifest: ImageManifest) -> ImageConfig:
        what = f"{self.description}: config {manifest.config.digest}"
        return ImageConfig.parse(self.read_blob(manifest.config, what), what)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class ImageTarget(ABC):
    """Where a converted image goes. Blobs first; the manifest last, so no partial image is visible."""

    description: str

    @abstractmethod
    def has_blob(self, digest: str) -> bool: ...

    @abstractmethod
    def put_blob(self, digest: str, size: int, path: Path | None = None, data: bytes | None = None) -> str:
        """Store a blob from a file or from memory; returns "uploaded" or "exists"."""

    @abstractmethod
    def put_manifest(self, raw: bytes, media_type: str) -> str:
        """Store the manifest under the target's tag; returns where it went."""
