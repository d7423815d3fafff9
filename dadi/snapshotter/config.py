"""The snapshotter's settings: defaults, a TOML file (`dadi snapshotter --config FILE`), command-line options.

Every key is optional; unknown keys are errors (a typo must not fall back to a default silently):

    rw_mode = "dev"               # "dev": each container gets a writable dadi view on a loop device,
                                  #   mounted as ext4 (block-level copy-on-write in the node daemon);
                                  # "overlayfs": a read-only view mounted ext4 under the root, with an
                                  #   overlayfs upper/work dir per container under the root
    daemon_root = "/var/lib/dadi" # the node daemon's root (started there if none runs; $DADI_ROOT)
    plain_http = false            # talk plain HTTP to the registries of dadi images
    authfile = "/root/.docker/config.json"  # registry credentials the daemon uses (docker config format)
    prefetch = true               # fetch the rest of an image in the background once a container runs
    io_timeout = 30.0             # seconds before a read the network cannot serve fails with EIO
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from dadi.errors import DadiError
from dadi.node.control import default_root

RW_MODES = ("dev", "overlayfs")


@dataclass(frozen=True)
class SnapshotterConfig:
    rw_mode: str = "dev"
    daemon_root: Path | None = None  # None: $DADI_ROOT or /var/lib/dadi
    plain_http: bool = False
    authfile: str | None = None
    prefetch: bool = True
    io_timeout: float = 30.0

    @property
    def node_root(self) -> Path:
        return Path(self.daemon_root) if self.daemon_root else default_root()

    def with_overrides(self, **values) -> SnapshotterConfig:
        """This config with the given settings replaced; None means "not given"."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


_TYPES = {"rw_mode": str, "daemon_root": str, "plain_http": bool, "authfile": str, "prefetch": bool,
          "io_timeout": (int, float)}


def load_config(path: Path | None) -> SnapshotterConfig:
    if path is None:
        return SnapshotterConfig()
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DadiError(f"snapshotter config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise DadiError(f"snapshotter config {path}: {e}") from e
    known = {f.name for f in fields(SnapshotterConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DadiError(f"snapshotter config {path}: unknown setting(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(known))}")
    for key, value in data.items():
        wanted = _TYPES[key]
        if not isinstance(value, wanted) or (wanted is not bool and isinstance(value, bool)):
            raise DadiError(f"snapshotter config {path}: {key} = {value!r} is not a {_type_name(wanted)}")
    if "rw_mode" in data and data["rw_mode"] not in RW_MODES:
        raise DadiError(f"snapshotter config {path}: rw_mode = {data['rw_mode']!r}; "
                        f"it must be one of {', '.join(RW_MODES)}")
    if "io_timeout" in data and data["io_timeout"] <= 0:
        raise DadiError(f"snapshotter config {path}: io_timeout must be above 0 seconds")
    if "daemon_root" in data:
        data["daemon_root"] = Path(data["daemon_root"])
    if "io_timeout" in data:
        data["io_timeout"] = float(data["io_timeout"])
    return SnapshotterConfig(**data)


def _type_name(wanted) -> str:
    return {str: "string", bool: "boolean (true/false)"}.get(wanted, "number")
