"""The node-daemon side of remote snapshots: a dadi view of an image's bottom layers, on a loop device.

A container's snapshot over dadi layers is a view in the node daemon (a separate process, started
here as `dadi mount` starts it when none runs), attached to a loop device by this process. The view,
the loop device and any mount live in the daemon and the kernel, so they outlive a snapshotter
restart; what was attached is returned as a `state` dict that the store keeps (name, loop, lower).

    rw view  (rw_mode "dev", Prepare):       writable view -> loop device; containerd mounts it ext4
    ro view  (View, or rw_mode "overlayfs"): read-only view -> read-only loop device; for overlayfs
                                             mounted ext4 ro at LOWER, an overlay's lowerdir
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path

from dadi.errors import DadiError
from dadi.node import loopdev
from dadi.node.control import DaemonNotRunning, ensure_daemon, request
from dadi.node.mounting import DEFAULT_READ_AHEAD, _run, _set_read_ahead

log = logging.getLogger(__name__)


def attach_view(node_root: Path, name: str, image: str, layers: list[str], *, rw: bool,
                lower: Path | None, plain_http: bool, authfile: str | None, prefetch: bool,
                io_timeout: float) -> dict:
    """Make view `name` of `image`'s bottom `layers` (digests, bottom first) and attach it.

    Returns the state to keep: {"view", "loop"[, "lower"]}. Undoes what it did when a step fails.
    """
    ensure_daemon(node_root)
    view = request(node_root, {
        "op": "add_view", "name": name, "image": image, "layers": list(layers), "rw": rw,
        "plain_http": plain_http, "authfile": authfile, "prefetch": prefetch, "io_timeout": io_timeout,
    })
    state: dict = {"view": name}
    try:
        # Direct I/O and 4 KiB sectors as `dadi mount` does (see dadi/node/mounting.py for why).
        state["loop"] = loopdev.attach(view["path"], read_only=not rw)
        _set_read_ahead(state["loop"], DEFAULT_READ_AHEAD)
        if lower is not None:
            lower.mkdir(parents=True, exist_ok=True)
            _run(["mount", "-t", "ext4", "-o", "ro,noload", state["loop"], str(lower)],
                 f"mounting view {name} at {lower}")
            state["lower"] = str(lower)
        request(node_root, {"op": "attach", "name": name, "loop": state["loop"],
                            "mountpoint": state.get("lower")})
    except BaseException:
        detach_view(node_root, state)
        raise
    return state


def detach_view(node_root: Path, state: dict) -> None:
    """Unmount, free the loop device, remove the view and its writable layer; what is gone already is fine."""
    lower = state.get("lower")
    if lower and os.path.ismount(lower):
        result = subprocess.run(["umount", lower], capture_output=True, text=True)
        if result.returncode != 0 and os.path.ismount(lower):
            raise DadiError(f"umount {lower}: {result.stderr.strip()}")
    loop = state.get("loop")
    if loop and loopdev.backing_file(loop) is not None:
        with contextlib.suppress(DadiError):  # as `losetup -d` was: the view goes on being removed
            loopdev.detach(loop)
    if state.get("view"):
        remove_daemon_view(node_root, state["view"])


def remove_daemon_view(node_root: Path, name: str) -> None:
    try:
        request(node_root, {"op": "remove_view", "name": name, "discard": True})
    except DaemonNotRunning:
        log.warning("no node daemon under %s: view %s is left to its next start", node_root, name)
    except DadiError as e:
        if f"no view named {name!r}" not in str(e):
            raise


def daemon_views(node_root: Path) -> list[dict] | None:
    """The daemon's views, or None when no daemon runs (nothing is started for asking)."""
    with contextlib.suppress(DaemonNotRunning):
        return request(node_root, {"op": "list"})["views"]
    return None


def writable_usage_dir(node_root: Path, name: str) -> Path:
    """Where the daemon keeps a rw view's private writable layer (dadi/node/daemon.py's layout)."""
    return Path(node_root) / "views" / name / "writable"
