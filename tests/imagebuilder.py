"""Write OCI image layouts and layer tars from Python, byte for byte reproducibly.

Test support: the end-to-end tests need real OCI images with every corner of layer semantics in them,
and they need the same image twice to give the same digests. `TarBuilder` writes one layer tar in PAX
format the way Go's archive/tar does (the writer behind docker, buildah and umoci), `OCILayoutBuilder`
stacks such tars into an image layout, and `write_docker_archive` re-packs a layout as `docker save` would.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zstandard

DEFAULT_MTIME = 1_600_000_000  # 2020-09-13T12:26:40Z: any fixed instant keeps the output reproducible
DEFAULT_CREATED = "2020-09-13T12:26:40Z"

Compression = Literal["gzip", "zstd", "none"]

LAYER_MEDIA_TYPES: dict[str, str] = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        # mtime=0 and no file name in the header: the same tar always gives the same blob.
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def decompress(blob: bytes, media_type: str) -> bytes:
    if media_type.endswith("+gzip") or media_type.endswith(".tar.gzip"):
        return gzip.decompress(blob)
    if media_type.endswith("+zstd"):
        # decompressobj copes with frames that do not record their content size.
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    if media_type.endswith(".tar") or media_type.endswith(".tar.v1") or "diff.tar" in media_type:
        return blob
    raise ValueError(f"unsupported layer media type {media_type!r}")


class _GoStylePaxTarInfo(tarfile.TarInfo):
    """A TarInfo whose PAX records carry raw bytes, as Go's archive/tar writes them.

    CPython's writer prefixes a `hdrcharset=BINARY` record as soon as one value is not UTF-8 (a binary
    xattr such as security.capability); Go never does, and real images come from Go. Values that hold
    raw bytes are passed in as str decoded with surrogateescape.
    """

    @classmethod
    def _create_pax_generic_header(cls, pax_headers, type, encoding):  # noqa: A002 - CPython's signature
        records = b""
        for keyword, value in pax_headers.items():
            records += _pax_record(keyword.encode("utf-8"), value.encode("utf-8", "surrogateescape"))
        info = {"name": "././@PaxHeader", "type": type, "size": len(records), "magic": tarfile.POSIX_MAGIC}
        return cls._create_header(info, tarfile.USTAR_FORMAT, "ascii", "replace") + cls._create_payload(
            records
        )


def _pax_record(keyword: bytes, value: bytes) -> bytes:
    # A record is "LEN KEY=VALUE\n" where LEN counts its own digits too.
    body = b" " + keyword + b"=" + value + b"\n"
    length = len(body)
    while len(str(length).encode()) + len(body) != length:
        length = len(str(length).encode()) + len(body)
    return str(length).encode() + body


@dataclass
class _Entry:
    info: tarfile.TarInfo
    data: bytes | None


class TarBuilder:
    """Collects entries in call order (order matters for layer semantics) and renders a PAX tar.

    `mtime` is an int (whole seconds, in the ustar header) or a decimal string such as
    "1600000000.123456789" (exact sub-second time, written as a PAX record like Go does).
    `xattrs` maps names ("user.x", "security.capability") to bytes values (SCHILY.xattr.* records).
    Paths are written as given, without a leading "/" or "./".
    """

    def __init__(self) -> None:
        self._entries: list[_Entry] = []

    def _add(
        self,
        path: str,
        kind: bytes,
        *,
        mode: int,
        uid: int,
        gid: int,
        mtime: int | str,
        xattrs: dict[str, bytes] | None = None,
        linkname: str = "",
        data: bytes | None = None,
        devmajor: int = 0,
        devminor: int = 0,
    ) -> TarBuilder:
        info = _GoStylePaxTarInfo(path)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.uname = info.gname = ""
        info.linkname = linkname
        info.devmajor, info.devminor = devmajor, devminor
        info.size = len(data) if data is not None else 0
        if isinstance(mtime, str):
            info.mtime = int(mtime.split(".")[0])
            info.pax_headers["mtime"] = mtime
        else:
            info.mtime = mtime
        for name, value in (xattrs or {}).items():
            info.pax_headers["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
        self._entries.append(_Entry(info, data))
        return self

    def file(
        self,
        path: str,
        data: bytes = b"",
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: int | str = DEFAULT_MTIME,
        xattrs: dict[str, bytes] | None = None,
    ) -> TarBuilder:
        return self._add(
            path, tarfile.REGTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime, xattrs=xattrs, data=data
        )

    def dir(
        self,
        path: str,
        *,
        mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
        mtime: int | str = DEFAULT_MTIME,
        xattrs: dict[str, bytes] | None = None,
    ) -> TarBuilder:
        return self._add(
            path.rstrip("/") + "/", tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime, xattrs=xattrs
        )

    def symlink(
        self, path: str, target: str, *, uid: int = 0, gid: int = 0, mtime: int | str = DEFAULT_MTIME
    ) -> TarBuilder:
        return self._add(path, tarfile.SYMTYPE, mode=0o777, uid=uid, gid=gid, mtime=mtime, linkname=target)

    def hardlink(self, path: str, target: str, *, mtime: int | str = DEFAULT_MTIME) -> TarBuilder:
        """`target` is the path of an existing entry (this layer or a lower one), relative to the root."""
        return self._add(path, tarfile.LNKTYPE, mode=0o644, uid=0, gid=0, mtime=mtime, linkname=target)

    def chardev(
        self,
        path: str,
        major: int,
        minor: int,
        *,
        mode: int = 0o666,
        uid: int = 0,
        gid: int = 0,
        mtime: int | str = DEFAULT_MTIME,
    ) -> TarBuilder:
        return self._add(
            path, tarfile.CHRTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime, devmajor=major, devminor=minor
        )

    def blockdev(
        self,
        path: str,
        major: int,
        minor: int,
        *,
        mode: int = 0o660,
        uid: int = 0,
        gid: int = 0,
        mtime: int | str = DEFAULT_MTIME,
    ) -> TarBuilder:
        return self._add(
            path, tarfile.BLKTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime, devmajor=major, devminor=minor
        )

    def fifo(
        self, path: str, *, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int | str = DEFAULT_MTIME
    ) -> TarBuilder:
        return self._add(path, tarfile.FIFOTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime)

    def whiteout(self, path: str) -> TarBuilder:
        """Hide `path` (and everything under it) of the lower layers."""
        parent, _, name = path.rstrip("/").rpartition("/")
        marker = f"{parent}/{WHITEOUT_PREFIX}{name}" if parent else WHITEOUT_PREFIX + name
        return self.file(marker, mode=0o644)

    def opaque(self, directory: str) -> TarBuilder:
        """Hide every lower-layer child of `directory`; children of this layer stay."""
        return self.file(f"{directory.rstrip('/')}/{OPAQUE_MARKER}", mode=0o644)

    def build(self) -> bytes:
        out = io.BytesIO()
        with tarfile.open(
            fileobj=out, mode="w", format=tarfile.PAX_FORMAT, tarinfo=_GoStylePaxTarInfo
        ) as tar:
            for entry in self._entries:
                tar.addfile(entry.info, io.BytesIO(entry.data) if entry.data is not None else None)
        return out.getvalue()


@dataclass(frozen=True)
class _Layer:
    blob: bytes
    media_type: str
    diff_id: str
    comment: str


class OCILayoutBuilder:
    """Stacks layer tars into an OCI image layout with one tagged manifest (amd64/linux)."""

    def __init__(self, layout_dir: Path, tag: str) -> None:
        self.layout_dir = Path(layout_dir)
        self.tag = tag
        self._layers: list[_Layer] = []
        self.manifest_digest: str | None = None

    def add_layer(self, tar_bytes: bytes, *, compression: Compression = "gzip", comment: str = "") -> None:
        self._layers.append(
            _Layer(
                compress(tar_bytes, compression),
                LAYER_MEDIA_TYPES[compression],
                sha256_digest(tar_bytes),
                comment,
            )
        )

    def _write_blob(self, data: bytes) -> dict:
        digest = sha256_digest(data)
        path = self.layout_dir / "blobs" / "sha256" / digest.split(":", 1)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return {"digest": digest, "size": len(data)}

    def write(self) -> None:
        """Write blobs, config, manifest and index; an existing index gains (or replaces) this tag."""
        config = {
            "created": DEFAULT_CREATED,
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in self._layers]},
            "history": [
                {
                    "created": DEFAULT_CREATED,
                    "created_by": "dadi tests/imagebuilder.py",
                    "comment": layer.comment,
                }
                for layer in self._layers
            ],
        }
        layer_descriptors = [
            {"mediaType": layer.media_type, **self._write_blob(layer.blob)} for layer in self._layers
        ]
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, **self._write_blob(_canonical_json(config))},
            "layers": layer_descriptors,
        }
        manifest_descriptor = {
            "mediaType": MANIFEST_MEDIA_TYPE,
            **self._write_blob(_canonical_json(manifest)),
        }
        manifest_descriptor["annotations"] = {"org.opencontainers.image.ref.name": self.tag}
        self.manifest_digest = manifest_descriptor["digest"]

        index_path = self.layout_dir / "index.json"
        others = []
        if index_path.exists():
            others = [
                m
                for m in json.loads(index_path.read_text())["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != self.tag
            ]
        index = {
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": [*others, manifest_descriptor],
        }
        index_path.write_bytes(_canonical_json(index))
        (self.layout_dir / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def _canonical_json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class LayoutImage:
    """One tagged image read back from a layout: its manifest, config and (compressed) layer blobs."""

    manifest_digest: str
    manifest: dict
    config: dict
    config_bytes: bytes
    layer_media_types: list[str]
    layer_blobs: list[bytes]

    def layer_tars(self) -> list[bytes]:
        return [decompress(b, t) for b, t in zip(self.layer_blobs, self.layer_media_types, strict=True)]


def read_layout_image(layout_dir: Path, tag: str) -> LayoutImage:
    layout_dir = Path(layout_dir)

    def blob(digest: str) -> bytes:
        return (layout_dir / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()

    index = json.loads((layout_dir / "index.json").read_text())
    for descriptor in index["manifests"]:
        if descriptor.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            break
    else:
        raise KeyError(f"no manifest tagged {tag!r} in {layout_dir}")
    manifest = json.loads(blob(descriptor["digest"]))
    config_bytes = blob(manifest["config"]["digest"])
    return LayoutImage(
        manifest_digest=descriptor["digest"],
        manifest=manifest,
        config=json.loads(config_bytes),
        config_bytes=config_bytes,
        layer_media_types=[layer["mediaType"] for layer in manifest["layers"]],
        layer_blobs=[blob(layer["digest"]) for layer in manifest["layers"]],
    )


def write_docker_archive(layout_dir: Path, tag: str, out_file: Path, *, repo_tag: str | None = None) -> Path:
    """Write the tagged image of an OCI layout as a `docker save` archive (what `docker-archive:` reads).

    Layout of the archive: manifest.json ([{Config, RepoTags, Layers}]), `<config hex>.json`, and one
    uncompressed `<diff id hex>/layer.tar` per layer. `repo_tag` defaults to `dadi-test/<tag>:latest`.
    """
    image = read_layout_image(layout_dir, tag)
    config_name = image.manifest["config"]["digest"].split(":", 1)[1] + ".json"
    members: list[tuple[str, bytes | None]] = [(config_name, image.config_bytes)]
    layer_names = []
    for tar_bytes in image.layer_tars():
        layer_dir = hashlib.sha256(tar_bytes).hexdigest()
        layer_names.append(f"{layer_dir}/layer.tar")
        members += [(layer_dir + "/", None), (f"{layer_dir}/layer.tar", tar_bytes)]
    docker_manifest = [
        {"Config": config_name, "RepoTags": [repo_tag or f"dadi-test/{tag}:latest"], "Layers": layer_names}
    ]
    members.append(("manifest.json", _canonical_json(docker_manifest)))

    out_file = Path(out_file)
    with tarfile.open(out_file, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return out_file
