"""Strict parsing of OCI / Docker schema2 descriptors, manifests, indexes and image configs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dadi.digests import check_digest, sha256_digest
from dadi.errors import ImageError
from dadi.image import mediatypes as mt
from dadi.registry.platform import select_platform as platform_entry


def _string_map(annotations: Any, where: str) -> dict[str, str]:
    if annotations is None:
        return {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise ImageError(f"{where}: annotations must map strings to strings")
    return dict(annotations)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise ImageError(f"{where}: a descriptor must be a JSON object")
        media_type = obj.get("mediaType")
        size = obj.get("size")
        if not isinstance(media_type, str):
            raise ImageError(f"{where}: descriptor without a mediaType")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{where}: descriptor size must be a non-negative integer, got {size!r}")
        digest = check_digest(obj.get("digest"), f"{where}: descriptor digest")
        annotations = _string_map(obj.get("annotations"), where)
        platform = obj.get("platform")
        if platform is not None and not isinstance(platform, dict):
            raise ImageError(f"{where}: platform must be a JSON object")
        return cls(media_type, digest, size, annotations, platform)

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            obj["annotations"] = dict(sorted(self.annotations.items()))
        if self.platform is not None:
            obj["platform"] = self.platform
        return obj


def load_json(raw: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImageError(f"{where}: not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ImageError(f"{where}: expected a JSON object")
    return obj


def is_index(obj: dict[str, Any], media_type: str | None) -> bool:
    """An index or manifest list, by its media type, or (none given) by having manifests and no layers."""
    media_type = obj.get("mediaType") or media_type
    if media_type:
        return media_type in mt.INDEX_TYPES
    return "manifests" in obj and "layers" not in obj


def dump_json(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, no spaces): the same image always gets the same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str]
    raw: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)

    @classmethod
    def parse(cls, raw: bytes, where: str, media_type: str | None = None) -> ImageManifest:
        obj = load_json(raw, where)
        if is_index(obj, media_type):
            raise ImageError(f"{where}: is an image index; select a platform manifest first")
        media_type = obj.get("mediaType") or media_type or mt.OCI_MANIFEST
        if media_type not in mt.MANIFEST_TYPES:
            raise ImageError(f"{where}: unsupported manifest media type {media_type!r}")
        if obj.get("schemaVersion") != 2:
            raise ImageError(f"{where}: unsupported schemaVersion {obj.get('schemaVersion')!r}")
        config = Descriptor.from_json(obj.get("config"), f"{where}: config")
        layers_json = obj.get("layers")
        if not isinstance(layers_json, list):
            raise ImageError(f"{where}: 'layers' must be a list")
        layers = tuple(Descriptor.from_json(d, f"{where}: layer {i}") for i, d in enumerate(layers_json))
        return cls(media_type, config, layers, _string_map(obj.get("annotations"), where), raw)


def select_platform(index_raw: bytes, where: str, platform: str = "linux/amd64") -> Descriptor:
    """The manifest descriptor of an index that matches os/architecture[/variant]."""
    entry = platform_entry(load_json(index_raw, where), platform, where)
    return Descriptor.from_json(entry, f"{where}: manifest for {platform}")


@dataclass(frozen=True)
class ImageConfig:
    raw: bytes
    obj: dict[str, Any]

    @classmethod
    def parse(cls, raw: bytes, where: str) -> ImageConfig:
        obj = load_json(raw, where)
        rootfs = obj.get("rootfs")
        if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
            raise ImageError(f"{where}: config without rootfs of type 'layers'")
        diff_ids = rootfs.get("diff_ids")
        if not isinstance(diff_ids, list):
            raise ImageError(f"{where}: config rootfs.diff_ids must be a list")
        for i, d in enumerate(diff_ids):
            check_digest(d, f"{where}: rootfs.diff_ids[{i}]")
        return cls(raw, obj)

    @property
    def diff_ids(self) -> list[str]:
        return list(self.obj["rootfs"]["diff_ids"])
