"""OCI distribution (registry v2 API) client: references, credentials and auth, manifests and blobs.

Names are imported on first use (PEP 562): `requests` takes ~50 ms to import, and commands that never
talk to a registry (converting a local OCI layout, say) should not pay for it.
"""

import importlib

_EXPORTS = {
    "Credentials": "auth",
    "RegistryAuth": "auth",
    "basic_authorization": "auth",
    "default_authfile": "auth",
    "load_credentials": "auth",
    "MANIFEST_ACCEPT": "client",
    "BlobStream": "client",
    "Manifest": "client",
    "RegistryClient": "client",
    "parse_platform": "platform",
    "select_platform": "platform",
    "DOCKER_HUB_HOST": "reference",
    "RegistryRef": "reference",
    "parse_registry_ref": "reference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
