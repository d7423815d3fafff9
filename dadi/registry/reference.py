"""Registry image references: `HOST[:PORT]/REPO[:TAG]` and `HOST/REPO[:TAG]@sha256:...`.

This is the part of a `docker://` reference after the transport prefix, parsed with the rules of the
distribution project's reference grammar, including Docker Hub's shorthand: a name without a registry
host is on Docker Hub, whose API lives at registry-1.docker.io, and a one-component Hub name is under
"library/".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dadi.errors import ImageError

DOCKER_HUB_HOST = "registry-1.docker.io"
# Names people write for Docker Hub; all of them mean the API host above.
_DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
DEFAULT_TAG = "latest"

# From distribution/reference/regexp.go.
_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST_RE = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$"
)
_MAX_NAME_LENGTH = 255


@dataclass(frozen=True)
class RegistryRef:
    """One image in one registry. `host` is where the API is (registry-1.docker.io for Docker Hub)."""

    host: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What goes after /manifests/ in the API: the digest when there is one (it pins the content)."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        host = "docker.io" if self.host == DOCKER_HUB_HOST else self.host
        text = f"{host}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _looks_like_host(component: str) -> bool:
    # The distribution rule: the first component is a registry host when it has a dot or a port,
    # or is "localhost"; otherwise "foo/bar" is a Docker Hub repository.
    return "." in component or ":" in component or component == "localhost" or component.startswith("[")


def parse_registry_ref(text: str) -> RegistryRef:
    """Parse `HOST[:PORT]/REPO[:TAG][@sha256:HEX]` (also accepting a leading `docker://`)."""
    original = text
    if text.startswith("docker://"):
        text = text[len("docker://") :]
    if not text:
        raise ImageError(f"{original!r}: empty image reference")
    if text != text.strip() or any(c.isspace() for c in text):
        raise ImageError(f"{original!r}: image reference contains whitespace")

    name, at, digest = text.partition("@")
    if at:
        if not _DIGEST_RE.match(digest):
            raise ImageError(
                f"{original!r}: {digest!r} is not a sha256 digest (sha256: and 64 lowercase hex digits)"
            )
    else:
        digest = None

    tag = None
    # A colon after the last slash separates the tag; one before it belongs to HOST:PORT.
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise ImageError(f"{original!r}: invalid tag {tag!r} (letters, digits, _ . -, at most 128)")

    first, slash, rest = name.partition("/")
    if slash and _looks_like_host(first):
        host, repository = first, rest
        if not _HOST_RE.match(host):
            raise ImageError(f"{original!r}: invalid registry host {host!r}")
    else:
        host, repository = "docker.io", name
    if host in _DOCKER_HUB_ALIASES:
        host = DOCKER_HUB_HOST
        if repository and "/" not in repository:
            repository = f"library/{repository}"

    if not repository:
        raise ImageError(f"{original!r}: no repository name after the registry host")
    for component in repository.split("/"):
        if not _COMPONENT_RE.match(component):
            raise ImageError(
                f"{original!r}: invalid repository component {component!r} "
                "(lowercase letters and digits, separated by '.', '_', '__' or '-')"
            )
    if len(repository) > _MAX_NAME_LENGTH:
        raise ImageError(f"{original!r}: repository name longer than {_MAX_NAME_LENGTH} characters")

    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return RegistryRef(host=host, repository=repository, tag=tag, digest=digest)
