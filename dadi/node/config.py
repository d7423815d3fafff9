"""The node daemon's settings: defaults, overridden by a TOML file, overridden by command-line options.

The file is ROOT/daemon.toml unless `dadi daemon --config FILE` names another; every key is optional:

    cache_quota = "20GiB"          # evict blobs no view uses, least recently used first, above this
    prefetch_bandwidth = "200MiB/s"  # cap on background prefetch (on-demand reads are never capped)
    prefetch_delay = 2.0           # seconds after a mount before the background prefetch starts
    trace_seconds = 30.0           # how long `dadi mount --record-trace` records a view's reads
    metrics = "127.0.0.1:9464"     # serve Prometheus metrics at http://ADDR/metrics (default: off)
    supernodes = ["http://sn1:8900", "http://sn2:8900"]  # fetch through these before the registry
    p2p_listen = "0.0.0.0:8901"    # serve verified chunks to peers here, announce them to the supernodes
    native_reads = true            # serve read-only views' local chunks from C threads (dadi.node.nativeviews)
    whole_file_max = "2MiB"        # a miss in a file up to this size fetches the whole file ("0": off)
    neighbour_window = "1MiB"      # with it, the small files after it on the disk, up to this much ("0": off)
    metadata_first = true          # a mount fetches the image's file system metadata beside its first reads

Unknown keys are errors, so a typo does not silently fall back to a default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from dadi.errors import DadiError
from dadi.node.hints import HintPolicy
from dadi.units import parse_rate, parse_size

CONFIG_NAME = "daemon.toml"


@dataclass(frozen=True)
class DaemonConfig:
    cache_quota: int | None = None  # bytes; None: no quota
    prefetch_bandwidth: int | None = None  # bytes per second; None: as fast as the sources go
    prefetch_delay: float = 2.0
    trace_seconds: float = 30.0
    metrics: str | None = None  # HOST:PORT for /metrics; None: not served
    supernodes: tuple[str, ...] = ()  # URLs, tried before the registry (rendezvous hashing per piece)
    p2p_listen: str | None = None  # HOST:PORT to serve peers on (dadi.p2p.peernode); None: not served
    native_reads: bool = True  # read-only views through dadi.node.nativeviews when dadi._fastfs is built
    whole_file_max: int = HintPolicy.whole_file_max  # bytes; dadi.node.hints
    neighbour_window: int = HintPolicy.neighbour_window  # bytes; dadi.node.hints
    metadata_first: bool = HintPolicy.metadata_first

    def hint_policy(self) -> HintPolicy:
        return HintPolicy(whole_file_max=self.whole_file_max, neighbour_window=self.neighbour_window,
                          metadata_first=self.metadata_first)

    def with_overrides(self, **values) -> DaemonConfig:
        """This config with the given settings replaced; None means "not given" and keeps the current one."""
        return _checked(replace(self, **{k: v for k, v in values.items() if v is not None}), "options")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def load_config(path: Path, *, required: bool = False) -> DaemonConfig:
    """The settings in TOML file `path`; defaults when it does not exist (unless `required`)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        if required:
            raise DadiError(f"daemon config {path}: no such file") from None
        return DaemonConfig()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise DadiError(f"daemon config {path}: {e}") from e
    known = {f.name for f in fields(DaemonConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DadiError(f"daemon config {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {}
    try:
        if "cache_quota" in data:
            values["cache_quota"] = parse_size(data["cache_quota"])
        if "prefetch_bandwidth" in data:
            values["prefetch_bandwidth"] = parse_rate(data["prefetch_bandwidth"])
        for key in ("metrics", "p2p_listen"):
            if key in data:
                if not isinstance(data[key], str) or ":" not in data[key]:
                    raise ValueError(f"{key} must be \"HOST:PORT\", not {data[key]!r}")
                values[key] = data[key]
        if "supernodes" in data:
            urls = data["supernodes"]
            if not isinstance(urls, list) or not all(isinstance(u, str) and u.startswith(("http://", "https://"))
                                                     for u in urls):
                raise ValueError(f"supernodes must be a list of http(s):// URLs, not {urls!r}")
            values["supernodes"] = tuple(urls)
        for key in ("native_reads", "metadata_first"):
            if key in data:
                if not isinstance(data[key], bool):
                    raise ValueError(f"{key} must be true or false, not {data[key]!r}")
                values[key] = data[key]
        for key in ("whole_file_max", "neighbour_window"):
            if key in data:
                values[key] = parse_size(data[key])
        for key in ("prefetch_delay", "trace_seconds"):
            if key in data:
                if isinstance(data[key], bool) or not isinstance(data[key], int | float):
                    raise ValueError(f"{key} must be a number of seconds, not {data[key]!r}")
                values[key] = float(data[key])
    except ValueError as e:
        raise DadiError(f"daemon config {path}: {e}") from None
    return _checked(DaemonConfig(**values), f"daemon config {path}")


def _checked(config: DaemonConfig, where: str) -> DaemonConfig:
    if config.prefetch_bandwidth is not None and config.prefetch_bandwidth <= 0:
        raise DadiError(f"{where}: prefetch_bandwidth must be above 0")
    if config.prefetch_delay < 0 or config.trace_seconds <= 0:
        raise DadiError(f"{where}: prefetch_delay must be >= 0 and trace_seconds > 0")
    return config
