"""Image references in skopeo's transport syntax, and opening them as sources or targets.

    oci:DIR[:TAG]            an OCI image layout directory
    docker-archive:FILE      a `docker save` tarball (source only)
    docker://HOST/REPO:TAG   a registry (also @sha256:... for sources)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dadi.errors import ImageError
from dadi.image.base import ImageSource, ImageTarget


@dataclass(frozen=True)
class RegistryOptions:
    plain_http: bool = False
    authfile: str | None = None
    platform: str = "linux/amd64"


@dataclass(frozen=True)
class ImageRef:
    transport: str  # "oci", "docker-archive" or "docker"
    path: str  # directory, file, or registry reference
    tag: str | None = None

    def __str__(self) -> str:
        if self.transport == "docker":
            return f"docker://{self.path}"
        return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")


def parse_image_ref(text: str) -> ImageRef:
    if text.startswith("docker://"):
        rest = text[len("docker://") :]
        if not rest:
            raise ImageError(f"{text!r}: empty registry reference")
        return ImageRef("docker", rest)
    for transport in ("oci", "docker-archive"):
        prefix = transport + ":"
        if text.startswith(prefix):
            rest = text[len(prefix) :]
            path, _, tag = rest.partition(":")
            if not path:
                raise ImageError(f"{text!r}: no path after {prefix}")
            return ImageRef(transport, path, tag or None)
    raise ImageError(
        f"{text!r}: unknown image reference; use oci:DIR[:TAG], docker-archive:FILE or docker://HOST/REPO:TAG"
    )


def _registry(ref: ImageRef, options: RegistryOptions):
    from dadi.registry import RegistryClient, parse_registry_ref

    reg_ref = parse_registry_ref(ref.path)
    client = RegistryClient(reg_ref.host, plain_http=options.plain_http, authfile=options.authfile)
    return reg_ref, client


def open_source(ref: ImageRef, options: RegistryOptions = RegistryOptions()) -> ImageSource:
    if ref.transport == "oci":
        from dadi.image.oci_layout import OCILayoutSource

        return OCILayoutSource(Path(ref.path), ref.tag, options.platform)
    if ref.transport == "docker-archive":
        from dadi.image.docker_archive import DockerArchiveSource

        return DockerArchiveSource(Path(ref.path), ref.tag)
    from dadi.image.registry_store import RegistrySource

    reg_ref, client = _registry(ref, options)
    return RegistrySource(reg_ref, client, options.platform)


def open_target(ref: ImageRef, options: RegistryOptions = RegistryOptions()) -> ImageTarget:
    if ref.transport == "oci":
        from dadi.image.oci_layout import OCILayoutTarget

        if not ref.tag:
            raise ImageError(f"{ref}: a target layout needs a tag (oci:DIR:TAG)")
        return OCILayoutTarget(Path(ref.path), ref.tag)
    if ref.transport == "docker":
        from dadi.image.registry_store import RegistryTarget

        reg_ref, client = _registry(ref, options)
        return RegistryTarget(reg_ref, client)
    raise ImageError(f"{ref}: cannot write to a {ref.transport} reference")
