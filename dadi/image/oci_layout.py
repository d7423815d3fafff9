"""OCI image layouts on disk (`oci:DIR[:TAG]`), as source and as target."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from dadi.digests import digest_hex, sha256_digest
from dadi.errors import ImageError, ImageNotFound
from dadi.image import mediatypes as mt
from dadi.image.base import ImageSource, ImageTarget
from dadi.image.manifest import Descriptor, ImageManifest, dump_json, is_index, load_json, select_platform


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest_hex(digest)


class OCILayoutSource(ImageSource):
    def __init__(self, layout: Path, tag: str | None, platform: str = "linux/amd64"):
        self.layout = Path(layout)
        self.tag = tag
        self.platform = platform
        self.description = f"oci:{layout}" + (f":{tag}" if tag else "")
        if not (self.layout / "index.json").is_file():
            raise ImageError(f"{self.description}: not an OCI image layout (no index.json)")

    def _manifest_descriptor(self) -> Descriptor:
        where = f"{self.description}: index.json"
        index = load_json((self.layout / "index.json").read_bytes(), where)
        entries = index.get("manifests")
        if not isinstance(entries, list) or not entries:
            raise ImageError(f"{where}: no manifests")
        descs = [Descriptor.from_json(e, f"{where}: manifests[{i}]") for i, e in enumerate(entries)]
        if self.tag is None:
            if len(descs) != 1:
                names = sorted(d.annotations.get(mt.OCI_REF_NAME, d.digest) for d in descs)
                raise ImageError(f"{where}: {len(descs)} images; name one of: {', '.join(names)}")
            return descs[0]
        for desc in descs:
            if desc.annotations.get(mt.OCI_REF_NAME) == self.tag:
                return desc
        raise ImageNotFound(f"{where}: no image tagged {self.tag!r}")

    def get_manifest(self) -> ImageManifest:
        desc = self._manifest_descriptor()
        for _ in range(4):  # nested indexes: a multi-platform image inside the layout
            raw = self.read_blob(desc, f"{self.description}: manifest {desc.digest}")
            if is_index(load_json(raw, f"{self.description}: manifest {desc.digest}"), desc.media_type):
                desc = select_platform(raw, f"{self.description}: index {desc.digest}", self.platform)
                continue
            return ImageManifest.parse(raw, f"{self.description}: manifest {desc.digest}", desc.media_type)
        raise ImageError(f"{self.description}: indexes nested too deeply")

    def _open_raw(self, desc: Descriptor) -> BinaryIO:
        path = blob_path(self.layout, desc.digest)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise ImageError(f"{self.description}: blob {desc.digest} is missing ({path})") from None

    def read_range(self, desc: Descriptor, offset: int, length: int) -> bytes:
        with self._open_raw(desc) as f:
            f.seek(offset)
            return f.read(length)

    def blob_file(self, desc: Descriptor) -> Path:
        return blob_path(self.layout, desc.digest)


class OCILayoutTarget(ImageTarget):
    def __init__(self, layout: Path, tag: str):
        self.layout = Path(layout)
        self.tag = tag
        self.description = f"oci:{layout}:{tag}"
        (self.layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        layout_file = self.layout / "oci-layout"
        if not layout_file.exists():
            _atomic_write(layout_file, b'{"imageLayoutVersion":"1.0.0"}')
        if not (self.layout / "index.json").exists():
            _atomic_write(self.layout / "index.json", dump_json({"schemaVersion": 2, "manifests": []}))

    def has_blob(self, digest: str) -> bool:
        return blob_path(self.layout, digest).is_file()

    def put_blob(self, digest: str, size: int, path: Path | None = None, data: bytes | None = None) -> str:
        dest = blob_path(self.layout, digest)
        if dest.is_file() and dest.stat().st_size == size:
            return "exists"
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                if data is not None:
                    out.write(data)
                else:
                    with open(path, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            os.replace(tmp, dest)
        except BaseException:
            os.unlink(tmp)
            raise
        return "uploaded"

    def put_manifest(self, raw: bytes, media_type: str) -> str:
        digest = sha256_digest(raw)
        self.put_blob(digest, len(raw), data=raw)
        index_file = self.layout / "index.json"
        index = load_json(index_file.read_bytes(), f"{self.description}: index.json")
        entries = [
            e for e in index.get("manifests", []) if (e.get("annotations") or {}).get(mt.OCI_REF_NAME) != self.tag
        ]
        entries.append(
            {"mediaType": media_type, "digest": digest, "size": len(raw), "annotations": {mt.OCI_REF_NAME: self.tag}}
        )
        index["manifests"] = entries
        _atomic_write(index_file, json.dumps(index, indent=2).encode())
        return f"{self.description}@{digest}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
