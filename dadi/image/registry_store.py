"""Images in an OCI registry (`docker://HOST/REPO:TAG` or `@DIGEST`), as source and as target."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from dadi.errors import ImageError
from dadi.image.base import ImageSource, ImageTarget
from dadi.image.manifest import Descriptor, ImageManifest
from dadi.registry import RegistryClient, RegistryRef


class RegistrySource(ImageSource):
    def __init__(self, ref: RegistryRef, client: RegistryClient, platform: str = "linux/amd64"):
        self.ref = ref
        self.client = client
        self.platform = platform
        self.description = f"docker://{ref}"

    def get_manifest(self) -> ImageManifest:
        reference = self.ref.digest or self.ref.tag or "latest"
        fetched = self.client.get_manifest(self.ref.repository, reference, platform=self.platform)
        return ImageManifest.parse(fetched.body, f"{self.description}: manifest {fetched.digest}", fetched.media_type)

    def _open_raw(self, desc: Descriptor) -> BinaryIO:
        return self.client.open_blob(self.ref.repository, desc.digest)

    def read_range(self, desc: Descriptor, offset: int, length: int) -> bytes:
        return self.client.get_blob(self.ref.repository, desc.digest, offset=offset, length=length)


class RegistryTarget(ImageTarget):
    def __init__(self, ref: RegistryRef, client: RegistryClient):
        if ref.digest:
            raise ImageError(f"docker://{ref}: a target needs a tag, not a digest")
        self.ref = ref
        self.client = client
        self.description = f"docker://{ref}"

    def has_blob(self, digest: str) -> bool:
        return self.client.head_blob(self.ref.repository, digest) is not None

    def put_blob(self, digest: str, size: int, path: Path | None = None, data: bytes | None = None) -> str:
        source = data if data is not None else Path(path)
        return self.client.put_blob(self.ref.repository, digest, source, size)

    def put_manifest(self, raw: bytes, media_type: str) -> str:
        digest = self.client.put_manifest(self.ref.repository, self.ref.tag or "latest", raw, media_type)
        return f"{self.description}@{digest}"
