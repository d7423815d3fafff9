"""The snapshotter's logic, without gRPC: containerd's snapshot calls on the store, directories and views.

Three kinds of snapshots live under ROOT:

- ordinary layers and containers over them, as containerd's overlayfs snapshotter makes them:
  ROOT/snapshots/ID/fs (the layer's files, or a container's upper dir) and ROOT/snapshots/ID/work;
  Prepare returns a bind mount (no parent) or an overlay mount (lowerdir = the parents' fs dirs);
- remote layers: a Prepare whose labels mark a dadi layer (dadi.snapshotter.labels) is committed at
  once under its target chain id and answered ALREADY_EXISTS, so containerd downloads nothing;
  nothing is on local disk;
- containers (and views) over remote layers: a node-daemon view of the image's bottom layers, up to
  the parent (dadi.snapshotter.views). rw_mode "dev": a writable view on a loop device, mounted ext4
  by containerd; "overlayfs": a read-only view mounted under ROOT/snapshots/ID/lower plus an overlay
  upper/work dir there. Views (read-only snapshots) are a read-only view mounted ext4 read-only.

Mounts are computed from the store, so they are the same after a restart. Committing a container that
runs over remote layers is refused (its changes live in a block-level writable layer or over a mount
of a view; neither is a layer containerd can diff yet).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from dadi.errors import DadiError
from dadi.snapshotter import filters, views
from dadi.snapshotter.config import SnapshotterConfig
from dadi.snapshotter.labels import TARGET, LabelError, remote_layer
from dadi.snapshotter.store import (
    KIND_ACTIVE,
    KIND_COMMITTED,
    KIND_NAMES,
    KIND_VIEW,
    Snapshot,
    SnapshotError,
    Store,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: list[str] = field(default_factory=list)


class DadiSnapshotter:
    def __init__(self, root: Path, config: SnapshotterConfig):
        self.root = Path(root).resolve()
        self.config = config
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.root / "metadata.db")
        # Daemon view names: unique per snapshotter root, so two snapshotters may share one daemon.
        self.view_prefix = "ctd-" + hashlib.sha256(str(self.root).encode()).hexdigest()[:8] + "-"

    def close(self) -> None:
        self.store.close()

    def _dir(self, snap: Snapshot) -> Path:
        return self.snapshots_dir / str(snap.id)

    # -- create --------------------------------------------------------------------------------------

    def prepare(self, ns: str, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(ns, key, parent, labels, readonly=False)

    def view(self, ns: str, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(ns, key, parent, labels, readonly=True)

    def _create(self, ns: str, key: str, parent: str, labels: dict[str, str], readonly: bool) -> list[Mount]:
        with self.store.lock:
            below = self.store.get(ns, parent) if parent else None
            if below is not None and below.kind != KIND_COMMITTED:
                raise SnapshotError("invalid", f"parent {parent!r} is not a committed snapshot")
            try:
                remote = remote_layer(labels)
            except LabelError as e:
                raise SnapshotError("precondition", str(e)) from None
            if remote is not None and not readonly:
                return self._record_remote(ns, parent, below, labels, remote)
            if below is not None and below.remote:
                return self._create_over_remote(ns, key, parent, labels, readonly)
            return self._create_ordinary(ns, key, parent, labels, readonly)

    def _record_remote(self, ns, parent, below, labels, remote) -> list[Mount]:
        if below is not None and not below.remote:
            raise SnapshotError("precondition", f"dadi layer {remote.target} over an ordinary layer "
                                f"({parent}): a dadi image's layers are all dadi layers")
        existing = self.store.find(ns, remote.target)
        if existing is None:
            self.store.create(ns, remote.target, parent, KIND_COMMITTED, {**labels, TARGET: remote.target},
                              remote=remote.as_record())
            log.info("remote layer %s (%s of %s) recorded", remote.target, remote.layer, remote.image)
        raise SnapshotError("exists", f"target snapshot {remote.target!r} already exists (a remote dadi layer)")

    def _create_ordinary(self, ns, key, parent, labels, readonly) -> list[Mount]:
        snap = self.store.create(ns, key, parent, KIND_VIEW if readonly else KIND_ACTIVE, labels)
        try:
            for sub in ("fs", "work"):
                (self._dir(snap) / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.store.remove(ns, key)
            raise DadiError(f"snapshot {key!r}: creating {self._dir(snap)}: {e}") from e
        return self._mounts(snap)

    def _create_over_remote(self, ns, key, parent, labels, readonly) -> list[Mount]:
        mode = "view" if readonly else self.config.rw_mode
        snap = self.store.create(ns, key, parent, KIND_VIEW if readonly else KIND_ACTIVE, labels,
                                 state={"mode": mode})
        chain = list(reversed(self.store.parents(snap)))  # bottom first
        name = f"{self.view_prefix}{snap.id}"
        lower = self._dir(snap) / "lower" if mode == "overlayfs" else None
        try:
            if mode == "overlayfs":
                for sub in ("fs", "work"):
                    (self._dir(snap) / sub).mkdir(parents=True, exist_ok=True)
            state = views.attach_view(
                self.config.node_root, name, chain[-1].remote["image"], [s.remote["layer"] for s in chain],
                rw=(mode == "dev"), lower=lower, plain_http=self.config.plain_http,
                authfile=self.config.authfile, prefetch=self.config.prefetch, io_timeout=self.config.io_timeout)
        except BaseException:
            self.store.remove(ns, key)
            shutil.rmtree(self._dir(snap), ignore_errors=True)
            raise
        snap = self.store.set_state(snap, {"mode": mode, **state})
        log.info("snapshot %s: %s view %s of %d dadi layer(s) on %s", key, mode, name, len(chain), state["loop"])
        return self._mounts(snap)

    # -- mounts --------------------------------------------------------------------------------------

    def mounts(self, ns: str, key: str) -> list[Mount]:
        with self.store.lock:
            snap = self.store.get(ns, key)
            if snap.kind == KIND_COMMITTED:
                raise SnapshotError("invalid", f"snapshot {key!r} is committed: it has no mounts")
            return self._mounts(snap)

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        mode = snap.state.get("mode")
        if mode is not None:
            if "loop" not in snap.state:
                raise SnapshotError("precondition", f"snapshot {snap.key!r} was not fully made (crashed?)")
            if mode == "dev":
                # noinit_itable: the image's inode tables are lazily initialised; zeroing them would
                # write gigabytes into the writable layer.
                return [Mount("ext4", snap.state["loop"], ["rw", "noinit_itable"])]
            if mode == "view":
                return [Mount("ext4", snap.state["loop"], ["ro", "noload"])]
            upper = self._dir(snap)
            return [Mount("overlay", "overlay", [f"workdir={upper / 'work'}", f"upperdir={upper / 'fs'}",
                                                 f"lowerdir={snap.state['lower']}"])]
        parents = self.store.parents(snap)
        if any(p.remote for p in parents):
            raise SnapshotError("precondition", f"snapshot {snap.key!r}: ordinary layers over dadi layers")
        fs = self._dir(snap) / "fs"
        if not parents:
            return [Mount("bind", str(fs), ["ro" if snap.kind == KIND_VIEW else "rw", "rbind"])]
        lowers = ":".join(str(self._dir(p) / "fs") for p in parents)
        if snap.kind == KIND_VIEW:
            if len(parents) == 1:
                return [Mount("bind", lowers, ["ro", "rbind"])]
            return [Mount("overlay", "overlay", [f"lowerdir={lowers}"])]
        return [Mount("overlay", "overlay", [f"workdir={self._dir(snap) / 'work'}", f"upperdir={fs}",
                                             f"lowerdir={lowers}"])]

    # -- commit, remove ------------------------------------------------------------------------------

    def commit(self, ns: str, name: str, key: str, labels: dict[str, str]) -> None:
        with self.store.lock:
            snap = self.store.get(ns, key)
            if snap.state.get("mode"):
                raise SnapshotError("precondition", f"snapshot {key!r} runs over dadi layers: committing "
                                    "it is not supported (its changes are not an ordinary layer)")
            self.store.commit(ns, name, key, labels)

    def remove(self, ns: str, key: str) -> None:
        with self.store.lock:
            snap = self.store.get(ns, key)
            if self.store.has_children(snap):
                raise SnapshotError("precondition", f"cannot remove snapshot {key!r}: it has children")
            if snap.state.get("view"):
                views.detach_view(self.config.node_root, snap.state)
            self.store.remove(ns, key)
            shutil.rmtree(self._dir(snap), ignore_errors=True)
            log.info("snapshot %s removed", key)

    # -- info ----------------------------------------------------------------------------------------

    def stat(self, ns: str, key: str) -> Snapshot:
        return self.store.get(ns, key)

    def update(self, ns: str, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        """containerd's Update: only labels change; `paths` "labels" or "labels.KEY" (none: all labels)."""
        with self.store.lock:
            snap = self.store.get(ns, key)
            new = dict(snap.labels)
            if not paths:
                new = dict(labels)
            for path in paths:
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels."):
                    label = path[len("labels."):]
                    if labels.get(label):
                        new[label] = labels[label]
                    else:
                        new.pop(label, None)
                else:
                    raise SnapshotError("invalid", f"cannot update {path!r} of snapshot {key!r}: only labels")
            return self.store.set_labels(snap, new)

    def usage(self, ns: str, key: str) -> tuple[int, int]:
        """(bytes, inodes) this snapshot holds on local disk."""
        snap = self.store.get(ns, key)
        if snap.remote:
            return 0, 0  # its data is in the node daemon's shared chunk cache
        paths = [self._dir(snap) / "fs"]
        if snap.state.get("mode") == "dev":
            paths = [views.writable_usage_dir(self.config.node_root, snap.state.get("view", ""))]
        size = inodes = 0
        for path in paths:
            for dirpath, dirnames, filenames in os.walk(path):
                for name in dirnames + filenames:
                    try:
                        st = os.lstat(os.path.join(dirpath, name))
                    except OSError:
                        continue
                    size += st.st_blocks * 512
                    inodes += 1
        return size, inodes

    def list(self, ns: str, filter_texts: list[str]) -> list[Snapshot]:
        holds = filters.matcher(filter_texts, lambda s: {
            "name": s.key, "parent": s.parent, "kind": KIND_NAMES[s.kind], "labels": s.labels})
        return [s for s in self.store.list(ns) if holds(s)]

    # -- cleanup -------------------------------------------------------------------------------------

    def cleanup(self) -> dict:
        """Remove what a crash left: snapshot directories and daemon views the store does not know."""
        with self.store.lock:
            known = self.store.list()
            ids = {str(s.id) for s in known}
            removed_dirs = []
            for path in self.snapshots_dir.iterdir():
                if path.name not in ids:
                    lower = path / "lower"
                    if os.path.ismount(lower):
                        subprocess.run(["umount", "-l", str(lower)], capture_output=True)
                    shutil.rmtree(path, ignore_errors=True)
                    removed_dirs.append(path.name)
            removed_views = []
            wanted = {s.state.get("view") for s in known}
            for view in views.daemon_views(self.config.node_root) or []:
                if view["name"].startswith(self.view_prefix) and view["name"] not in wanted:
                    views.detach_view(self.config.node_root, {"view": view["name"], "loop": view.get("loop"),
                                                              "lower": view.get("mountpoint")})
                    removed_views.append(view["name"])
        if removed_dirs or removed_views:
            log.info("cleanup: removed directories %s, views %s", removed_dirs, removed_views)
        return {"directories": removed_dirs, "views": removed_views}
