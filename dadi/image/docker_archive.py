"""`docker save` archives (`docker-archive:FILE`) as a source.

A docker archive has no OCI manifest of its own: we synthesise one from manifest.json, whose layer
entries are tar members (uncompressed, or gzip in newer docker versions - sniffed).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import BinaryIO

from dadi.errors import ImageError
from dadi.image import mediatypes as mt
from dadi.image.base import ImageSource
from dadi.image.manifest import Descriptor, ImageConfig, ImageManifest, dump_json


class DockerArchiveSource(ImageSource):
    def __init__(self, path: Path, tag: str | None = None):
        self.path = Path(path)
        self.description = f"docker-archive:{path}"
        # Only where each member's bytes lie is kept: no file stays open between reads.
        try:
            with tarfile.open(self.path, "r:") as tar:
                self._members = {
                    _member_name(m.name): (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()
                }
        except (OSError, tarfile.TarError) as exc:
            raise ImageError(f"{self.description}: cannot read the archive: {exc}") from exc
        entries = _load_json_list(self._read_member("manifest.json"), f"{self.description}: manifest.json")
        self._entry = self._choose(entries, tag)
        self._blobs: dict[str, str] = {}  # digest -> member name
        self._manifest: ImageManifest | None = None

    def _choose(self, entries, tag):
        if tag is None:
            return entries[0]
        for entry in entries:
            if any(t == tag or t.endswith("/" + tag) for t in entry.get("RepoTags") or []):
                return entry
        raise ImageError(f"{self.description}: no image tagged {tag!r}")

    def _member(self, name: str, what: str) -> BinaryIO:
        """A reader of one member's bytes (names are kept without a leading './')."""
        place = self._members.get(_member_name(name))
        if place is None:
            raise ImageError(f"{self.description}: {what} is missing from the archive")
        offset, size = place
        f = open(self.path, "rb")
        f.seek(offset)
        return _Slice(f, size)

    def _read_member(self, name: str) -> bytes:  # manifest.json and the config: small
        with self._member(name, name) as f:
            return f.read()

    def _hash_member(self, name: str) -> tuple[str, int, bytes]:
        with self._member(name, f"layer {name}") as stream:
            head = stream.read(4)
            digest = hashlib.sha256(head)
            while block := stream.read(1 << 20):
                digest.update(block)
        return "sha256:" + digest.hexdigest(), self._members[_member_name(name)][1], head

    def get_manifest(self) -> ImageManifest:
        if self._manifest is not None:
            return self._manifest
        config_raw = self._read_member(self._entry.get("Config", ""))
        config_desc = Descriptor(mt.OCI_CONFIG, "sha256:" + hashlib.sha256(config_raw).hexdigest(), len(config_raw))
        self._blobs[config_desc.digest] = self._entry["Config"]
        layers = []
        for name in self._entry.get("Layers") or []:
            digest, size, head = self._hash_member(name)
            media_type = mt.OCI_LAYER_GZIP if head.startswith(b"\x1f\x8b") else mt.OCI_LAYER_TAR
            if head.startswith(b"\x28\xb5\x2f\xfd"):
                media_type = mt.OCI_LAYER_ZSTD
            layers.append(Descriptor(media_type, digest, size))
            self._blobs[digest] = name
        manifest = {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [d.to_json() for d in layers],
        }
        diff_ids = ImageConfig.parse(config_raw, f"{self.description}: config").diff_ids
        if len(diff_ids) != len(layers):
            raise ImageError(f"{self.description}: {len(layers)} layers but {len(diff_ids)} diff_ids in the config")
        self._manifest = ImageManifest.parse(dump_json(manifest), self.description)
        return self._manifest

    def _open_raw(self, desc: Descriptor) -> BinaryIO:
        self.get_manifest()
        name = self._blobs.get(desc.digest)
        if name is None:
            raise ImageError(f"{self.description}: no blob {desc.digest}")
        return self._member(name, name)

    def read_range(self, desc: Descriptor, offset: int, length: int) -> bytes:
        self.get_manifest()
        name = self._blobs.get(desc.digest)
        if name is None:
            raise ImageError(f"{self.description}: no blob {desc.digest}")
        start, size = self._members[name]
        length = max(0, min(length, size - offset))
        with open(self.path, "rb") as f:
            f.seek(start + offset)
            return f.read(length)


def _member_name(name: str) -> str:
    """'./a/b' and '/a/b' -> 'a/b': how manifest.json and the tar may spell one member."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


class _Slice(io.RawIOBase):
    """`size` bytes of a file from its current position; closes the file with itself."""

    def __init__(self, f: BinaryIO, size: int):
        self._f = f
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._f.read(min(len(buffer), self._left))
        self._left -= len(data)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def _load_json_list(raw: bytes, where: str) -> list:
    """docker save's manifest.json is a JSON array with one entry per saved image."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImageError(f"{where}: not valid JSON: {exc}") from exc
    if not isinstance(obj, list) or not obj or not all(isinstance(e, dict) for e in obj):
        raise ImageError(f"{where}: expected a non-empty JSON array of image entries")
    return obj
