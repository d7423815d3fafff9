"""The snapshotter's metadata: one sqlite3 database, ROOT/metadata.db.

A row per snapshot: namespace (containerd's, from the gRPC metadata), key, parent key (same namespace),
kind, times, labels, and two JSON documents: `remote` for a committed dadi layer ({"layer": digest,
"image": ref}: nothing of it is on local disk) and `state` for what an active or view snapshot has
attached outside the process (the node daemon's view, its loop device, mount points), so that Mounts
and Remove work after a restart.

Invariants: (namespace, key) is unique; a parent is a committed snapshot of the same namespace; a
snapshot with children cannot be removed; `id` never changes (Commit renames the key; directories
are named after the id, ROOT/snapshots/ID). Every change is one transaction (autocommit statements),
so a crash leaves the database as before or after it; what a crash leaves outside the database
(directories, daemon views of rows that are gone) is what Cleanup removes.

Locking: one connection, shared by gRPC worker threads under `Store.lock`, which the snapshotter also
holds around the mounts and daemon calls that belong to a change.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

KIND_VIEW, KIND_ACTIVE, KIND_COMMITTED = 1, 2, 3
KIND_NAMES = {KIND_VIEW: "view", KIND_ACTIVE: "active", KIND_COMMITTED: "committed"}


class SnapshotError(Exception):
    """code: 'not_found', 'exists', 'precondition', 'invalid' (gRPC NOT_FOUND, ALREADY_EXISTS, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Snapshot:
    id: int
    namespace: str
    key: str
    parent: str
    kind: int
    created: float
    updated: float
    labels: dict[str, str] = field(default_factory=dict)
    remote: dict | None = None
    state: dict = field(default_factory=dict)


_COLUMNS = "id, namespace, key, parent, kind, created, updated, labels, remote, state"


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("""CREATE TABLE IF NOT EXISTS snapshots (
            id INTEGER PRIMARY KEY AUTOINCREMENT, namespace TEXT NOT NULL, key TEXT NOT NULL,
            parent TEXT NOT NULL, kind INTEGER NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
            labels TEXT NOT NULL, remote TEXT, state TEXT NOT NULL, UNIQUE (namespace, key))""")

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @staticmethod
    def _row(row) -> Snapshot:
        return Snapshot(row[0], row[1], row[2], row[3], row[4], row[5], row[6], json.loads(row[7]),
                        json.loads(row[8]) if row[8] else None, json.loads(row[9]))

    def _one(self, where: str, args: tuple) -> Snapshot | None:
        with self.lock:
            row = self.db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE {where}", args).fetchone()
        return self._row(row) if row else None

    def get(self, namespace: str, key: str) -> Snapshot:
        snap = self.find(namespace, key)
        if snap is None:
            raise SnapshotError("not_found", f"snapshot {key!r} does not exist")
        return snap

    def find(self, namespace: str, key: str) -> Snapshot | None:
        return self._one("namespace = ? AND key = ?", (namespace, key))

    def by_id(self, sid: int) -> Snapshot:
        snap = self._one("id = ?", (sid,))
        if snap is None:
            raise SnapshotError("not_found", f"snapshot #{sid} does not exist")
        return snap

    def list(self, namespace: str | None = None) -> list[Snapshot]:
        with self.lock:
            if namespace is None:
                rows = self.db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY id").fetchall()
            else:
                rows = self.db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE namespace = ? ORDER BY id",
                                       (namespace,)).fetchall()
        return [self._row(r) for r in rows]

    def has_children(self, snap: Snapshot) -> bool:
        with self.lock:
            return self.db.execute("SELECT 1 FROM snapshots WHERE namespace = ? AND parent = ? LIMIT 1",
                                   (snap.namespace, snap.key)).fetchone() is not None

    def parents(self, snap: Snapshot) -> list[Snapshot]:
        """The committed snapshots below `snap`, nearest first."""
        out = []
        parent = snap.parent
        while parent:
            below = self.get(snap.namespace, parent)
            out.append(below)
            parent = below.parent
        return out

    def create(self, namespace: str, key: str, parent: str, kind: int, labels: dict[str, str], *,
               remote: dict | None = None, state: dict | None = None) -> Snapshot:
        if not key:
            raise SnapshotError("invalid", "a snapshot needs a key")
        with self.lock:
            if self.find(namespace, key) is not None:
                raise SnapshotError("exists", f"snapshot {key!r} already exists")
            if parent:
                below = self.find(namespace, parent)
                if below is None:
                    raise SnapshotError("not_found", f"parent snapshot {parent!r} does not exist")
                if below.kind != KIND_COMMITTED:
                    raise SnapshotError("invalid", f"parent {parent!r} is not a committed snapshot")
            now = time.time()
            cursor = self.db.execute(
                "INSERT INTO snapshots (namespace, key, parent, kind, created, updated, labels, remote, state) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (namespace, key, parent, kind, now, now, _json(labels), _json(remote) if remote else None,
                 _json(state or {})))
            return self.by_id(cursor.lastrowid)

    def commit(self, namespace: str, name: str, key: str, labels: dict[str, str]) -> Snapshot:
        """Active `key` becomes committed `name` (containerd: the commit's labels are the new labels)."""
        with self.lock:
            snap = self.get(namespace, key)
            if snap.kind != KIND_ACTIVE:
                raise SnapshotError("precondition", f"snapshot {key!r} is not active")
            if self.find(namespace, name) is not None:
                raise SnapshotError("exists", f"snapshot {name!r} already exists")
            self.db.execute("UPDATE snapshots SET key = ?, kind = ?, labels = ?, updated = ? WHERE id = ?",
                            (name, KIND_COMMITTED, _json(labels), time.time(), snap.id))
            return self.by_id(snap.id)

    def set_labels(self, snap: Snapshot, labels: dict[str, str]) -> Snapshot:
        with self.lock:
            self.db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                            (_json(labels), time.time(), snap.id))
            return self.by_id(snap.id)

    def set_state(self, snap: Snapshot, state: dict) -> Snapshot:
        with self.lock:
            self.db.execute("UPDATE snapshots SET state = ? WHERE id = ?", (_json(state), snap.id))
            return self.by_id(snap.id)

    def remove(self, namespace: str, key: str) -> Snapshot:
        with self.lock:
            snap = self.get(namespace, key)
            if self.has_children(snap):
                raise SnapshotError("precondition", f"cannot remove snapshot {key!r}: it has children")
            self.db.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
            return snap


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True)
