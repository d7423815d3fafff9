"""OCI distribution (registry v2 API) client: references, credentials and auth, manifests and blobs."""

from dadi.registry.auth import Credentials, RegistryAuth, default_authfile, load_credentials
from dadi.registry.client import MANIFEST_ACCEPT, BlobStream, Manifest, RegistryClient
from dadi.registry.platform import parse_platform, select_platform
from dadi.registry.reference import DOCKER_HUB_HOST, RegistryRef, parse_registry_ref

__all__ = [
    "DOCKER_HUB_HOST",
    "MANIFEST_ACCEPT",
    "BlobStream",
    "Credentials",
    "Manifest",
    "RegistryAuth",
    "RegistryClient",
    "RegistryRef",
    "default_authfile",
    "load_credentials",
    "parse_platform",
    "parse_registry_ref",
    "select_platform",
]
