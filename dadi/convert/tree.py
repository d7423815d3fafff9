"""The namespace of the working disk as the applier sees it, kept in Python across layers.

debugfs cannot be asked cheaply what a path is (one process per query), yet every tar entry needs to
know: does this path exist, is it a directory or a symlink, which inode does it share with its hard
links, what xattr names does that inode carry (to remove stale ones). The model answers all of that.

Invariant: after a successful `apply_layer`, the model describes exactly the disk's tree. Inode ids are
the model's own (not ext4 inode numbers): they only say which paths share an inode. After a failed
apply, the model and the disk are both garbage: the caller starts over from a cached chain.

Paths are relative to the root, without leading or trailing slash, components joined by "/"; the root
is "". Names that are not valid UTF-8 are kept as str with surrogate escapes (os.fsdecode).
"""

from __future__ import annotations

import msgpack

from dadi.errors import DadiError

# Kinds of entries (one letter, as in `find -type`).
FILE = "f"
DIR = "d"
SYMLINK = "l"
CHARDEV = "c"
BLOCKDEV = "b"
FIFO = "p"
KINDS = frozenset((FILE, DIR, SYMLINK, CHARDEV, BLOCKDEV, FIFO))

ROOT = ""
ROOT_INODE = 2  # the model's id for the root directory (ext4's too, by coincidence of taste)
_FORMAT = 1


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _enc(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class TreeModel:
    """Path -> (kind, inode id); directory children; link counts above one; xattr names per inode."""

    __slots__ = ("entries", "children", "nlink", "xattrs", "next_inode")

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, int]] = {}
        self.children: dict[str, set[str]] = {}
        self.nlink: dict[int, int] = {}  # only inodes with more than one link
        self.xattrs: dict[int, tuple[str, ...]] = {}  # only inodes with xattrs
        self.next_inode = ROOT_INODE + 1

    @classmethod
    def empty(cls) -> TreeModel:
        """What mke2fs leaves: the root directory and lost+found."""
        tree = cls()
        tree.entries[ROOT] = (DIR, ROOT_INODE)
        tree.children[ROOT] = set()
        tree.add("lost+found", DIR)
        return tree

    # -- queries ---------------------------------------------------------------------------------

    def get(self, path: str) -> tuple[str, int] | None:
        return self.entries.get(path)

    def kind(self, path: str) -> str | None:
        entry = self.entries.get(path)
        return entry[0] if entry else None

    def links(self, inode: int) -> int:
        return self.nlink.get(inode, 1)

    def walk_post_order(self, path: str) -> list[str]:
        """`path` and everything below it, children before their directory."""
        out: list[str] = []
        stack = [(path, False)]
        while stack:
            current, expanded = stack.pop()
            names = self.children.get(current)
            if expanded or not names:
                out.append(current)
                continue
            stack.append((current, True))
            for name in sorted(names, reverse=True):
                stack.append((join(current, name), False))
        return out

    # -- changes ---------------------------------------------------------------------------------

    def new_inode(self) -> int:
        inode = self.next_inode
        self.next_inode += 1
        return inode

    def add(self, path: str, kind: str, inode: int | None = None) -> int:
        """Record a new entry (its parent must be a directory here); returns its inode id."""
        if inode is None:
            inode = self.new_inode()
        else:
            self.nlink[inode] = self.links(inode) + 1
        self.entries[path] = (kind, inode)
        self.children[parent_of(path)].add(path.rpartition("/")[2])
        if kind == DIR:
            self.children[path] = set()
        return inode

    def remove_one(self, path: str) -> bool:
        """Forget one entry (a directory must be empty); True if that was its inode's last link."""
        kind, inode = self.entries.pop(path)
        self.children[parent_of(path)].discard(path.rpartition("/")[2])
        if kind == DIR:
            del self.children[path]
        links = self.links(inode) - 1
        if links > 1:
            self.nlink[inode] = links
        else:
            self.nlink.pop(inode, None)
        if links <= 0:
            self.xattrs.pop(inode, None)
            return True
        return False

    def set_xattr_names(self, inode: int, names: tuple[str, ...]) -> None:
        if names:
            self.xattrs[inode] = names
        else:
            self.xattrs.pop(inode, None)

    # -- persistence -----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Deterministic msgpack: the same tree always gives the same bytes."""
        doc = {
            "format": _FORMAT,
            "entries": [[_enc(p), k, i] for p, (k, i) in sorted(self.entries.items())],
            "nlink": sorted(self.nlink.items()),
            "xattrs": [[i, [_enc(n) for n in names]] for i, names in sorted(self.xattrs.items())],
            "next_inode": self.next_inode,
        }
        return msgpack.packb(doc, use_bin_type=True)

    @classmethod
    def from_bytes(cls, raw: bytes) -> TreeModel:
        try:
            doc = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            if doc.get("format") != _FORMAT:
                raise DadiError(f"tree model format {doc.get('format')!r} is not supported ({_FORMAT})")
            tree = cls()
            for raw_path, kind, inode in doc["entries"]:
                path = _dec(raw_path)
                if kind not in KINDS:
                    raise DadiError(f"tree model: unknown kind {kind!r} for {path!r}")
                tree.entries[path] = (kind, inode)
                if kind == DIR:
                    tree.children.setdefault(path, set())
            for path in tree.entries:
                if path != ROOT:
                    tree.children[parent_of(path)].add(path.rpartition("/")[2])
            tree.nlink = {int(i): int(n) for i, n in doc["nlink"]}
            tree.xattrs = {int(i): tuple(_dec(n) for n in names) for i, names in doc["xattrs"]}
            tree.next_inode = int(doc["next_inode"])
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
            raise DadiError(f"tree model is corrupt: {e}") from e
        if tree.entries.get(ROOT, (None,))[0] != DIR:
            raise DadiError("tree model is corrupt: no root directory")
        return tree

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TreeModel):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]
