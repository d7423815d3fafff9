"""Choosing one platform's manifest out of an OCI index or a Docker manifest list."""

from __future__ import annotations

from typing import Any

from dadi.errors import ImageError

# What `uname -m` and Go call the same architectures; indexes use Go's names.
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm"}
# The variant an index entry without one means (containerd's platforms.Normalize).
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


def parse_platform(text: str) -> tuple[str, str, str | None]:
    """ "os/arch[/variant]" -> (os, arch, variant or None), with architecture aliases normalised."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ImageError(f"platform {text!r}: expected OS/ARCH or OS/ARCH/VARIANT, e.g. linux/amd64")
    os_name, arch = parts[0].lower(), parts[1].lower()
    arch = _ARCH_ALIASES.get(arch, arch)
    variant = parts[2].lower() if len(parts) == 3 else None
    return os_name, arch, variant


def _describe(platform: dict) -> str:
    text = f"{platform.get('os', '?')}/{platform.get('architecture', '?')}"
    return text + (f"/{platform['variant']}" if platform.get("variant") else "")


def select_platform(index: Any, platform: str, where: str) -> dict:
    """The index entry (a descriptor) for platform; ImageError listing what the index offers if none."""
    os_name, arch, variant = parse_platform(platform)
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list):
        raise ImageError(f'{where}: an index without a "manifests" list')
    exact: list[dict] = []
    other_variants: list[dict] = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        entry_platform = entry.get("platform") or {}
        if entry_platform.get("os") != os_name or entry_platform.get("architecture") != arch:
            continue
        entry_variant = entry_platform.get("variant") or _DEFAULT_VARIANT.get(arch)
        wanted_variant = variant or _DEFAULT_VARIANT.get(arch)
        if entry_variant == wanted_variant:
            exact.append(entry)
        elif variant is None:
            other_variants.append(entry)
    # Asked for no variant: the default variant wins, else any variant of the architecture will do.
    chosen = exact or other_variants
    if not chosen and len(entries) == 1 and isinstance(entries[0], dict) and not entries[0].get("platform"):
        chosen = entries  # an index of one manifest that names no platform: the builder meant that one
    if not chosen:
        offered = sorted({_describe(e.get("platform") or {}) for e in entries if isinstance(e, dict)})
        raise ImageError(
            f"{where}: no manifest for platform {platform}; it has {', '.join(offered) or 'none'}"
        )
    return chosen[0]
