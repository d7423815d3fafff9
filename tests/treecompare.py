"""Compare two root filesystem trees entry by entry and describe every difference in one line each.

Test support: the end-to-end tests compare what `dadi export` produced (a mounted ext4 disk) with what
`umoci unpack` made of the same image, and expect no lines at all.

What is compared, per path (symlinks are never followed; the root itself is the entry "."):
presence; type; permission bits including setuid/setgid/sticky; uid; gid; for regular files size and
content sha256; symlink target; device major/minor; every xattr `listxattr` shows (user.*, trusted.*,
security.* including security.capability, system.posix_acl_*); which paths share an inode; mtime.

What is not: atime and ctime (no unpacker can set ctime, reading changes atime); directory sizes and
link counts (they depend on the filesystem and on lost+found, not on the image); block allocation
(holes). mtimes are compared to the nanosecond, symlinks and directories included: umoci unpack
keeps PAX nanoseconds (checked by tests/test_testimages.py) and ext4 with 256-byte inodes stores them.
Pass `mtime_resolution_ns=10**9` to compare whole seconds against a filesystem that keeps only those.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_KINDS = (
    (stat.S_ISREG, "file"),
    (stat.S_ISDIR, "dir"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISCHR, "chardev"),
    (stat.S_ISBLK, "blockdev"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
)


@dataclass(frozen=True)
class EntryFacts:
    """What the comparison knows about one path; `inode` only serves to find hardlink groups."""

    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int | None
    sha256: str | None
    link_target: str | None
    device: tuple[int, int] | None
    xattrs: dict[str, bytes]
    inode: tuple[int, int]


def _kind(st_mode: int) -> str:
    for test, name in _KINDS:
        if test(st_mode):
            return name
    return f"unknown({stat.S_IFMT(st_mode):o})"


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _xattrs_of(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # a filesystem without xattr support has none to compare
        return {}
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in names}


def entry_facts(path: str) -> EntryFacts:
    st = os.lstat(path)
    kind = _kind(st.st_mode)
    return EntryFacts(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        size=st.st_size if kind == "file" else None,
        sha256=_sha256_of(path) if kind == "file" else None,
        link_target=os.readlink(path) if kind == "symlink" else None,
        device=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chardev", "blockdev") else None,
        xattrs=_xattrs_of(path),
        inode=(st.st_dev, st.st_ino),
    )


def _is_ignored(rel: str, ignore: tuple[str, ...]) -> bool:
    return any(rel == prefix or rel.startswith(prefix + "/") for prefix in ignore)


def _walk(root: Path, ignore: tuple[str, ...]) -> Iterator[str]:
    """Relative paths under root, "." first, parents before children, never through a symlink."""
    yield "."
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        with os.scandir(os.path.join(root, rel_dir)) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if _is_ignored(rel, ignore):
                continue
            yield rel
            if entry.is_dir(follow_symlinks=False):
                pending.append(rel)


def tree_facts(root: Path, *, ignore: Iterable[str] = ("lost+found",)) -> dict[str, EntryFacts]:
    """Facts for every path of the tree, keyed by path relative to root ("." for root itself)."""
    ignore = tuple(p.strip("/") for p in ignore)
    return {rel: entry_facts(os.path.join(root, rel)) for rel in _walk(Path(root), ignore)}


def _mtime_text(ns: int) -> str:
    return f"{ns // 10**9}.{ns % 10**9:09d}"


def _entry_differences(
    rel: str, e: EntryFacts, a: EntryFacts, *, compare_mtime: bool, resolution: int
) -> list[str]:
    if e.kind != a.kind:
        return [f"{rel}: type {e.kind} != {a.kind}"]
    lines = []
    if e.mode != a.mode:
        lines.append(f"{rel}: mode {e.mode:04o} != {a.mode:04o}")
    if e.uid != a.uid:
        lines.append(f"{rel}: uid {e.uid} != {a.uid}")
    if e.gid != a.gid:
        lines.append(f"{rel}: gid {e.gid} != {a.gid}")
    if e.size != a.size:
        lines.append(f"{rel}: size {e.size} != {a.size}")
    elif e.sha256 != a.sha256:
        lines.append(f"{rel}: content sha256 {e.sha256} != {a.sha256}")
    if e.link_target != a.link_target:
        lines.append(f"{rel}: symlink target {e.link_target!r} != {a.link_target!r}")
    if e.device != a.device:
        lines.append(f"{rel}: device {e.device[0]}:{e.device[1]} != {a.device[0]}:{a.device[1]}")
    for name in sorted(e.xattrs.keys() | a.xattrs.keys()):
        if name not in a.xattrs:
            lines.append(f"{rel}: xattr {name} missing (expected {e.xattrs[name]!r})")
        elif name not in e.xattrs:
            lines.append(f"{rel}: xattr {name} unexpected ({a.xattrs[name]!r})")
        elif e.xattrs[name] != a.xattrs[name]:
            lines.append(f"{rel}: xattr {name} {e.xattrs[name]!r} != {a.xattrs[name]!r}")
    if compare_mtime and e.mtime_ns // resolution != a.mtime_ns // resolution:
        lines.append(f"{rel}: mtime {_mtime_text(e.mtime_ns)} != {_mtime_text(a.mtime_ns)}")
    return lines


def _hardlink_peers(facts: dict[str, EntryFacts], paths: set[str]) -> dict[str, frozenset[str]]:
    """For each non-directory in `paths`, the set of paths in `paths` sharing its inode (itself included)."""
    groups: dict[tuple[int, int], set[str]] = defaultdict(set)
    for rel in paths:
        if facts[rel].kind != "dir":
            groups[facts[rel].inode].add(rel)
    return {rel: frozenset(group) for group in groups.values() for rel in group}


def _hardlink_differences(expected: dict[str, EntryFacts], actual: dict[str, EntryFacts]) -> list[str]:
    # Only paths present with the same kind in both trees: the rest is reported already.
    common = {rel for rel in expected.keys() & actual.keys() if expected[rel].kind == actual[rel].kind}
    peers_e, peers_a = _hardlink_peers(expected, common), _hardlink_peers(actual, common)
    lines, reported = [], set()
    for rel in sorted(peers_e):
        if rel in reported or peers_e[rel] == peers_a[rel]:
            continue
        reported |= peers_e[rel] | peers_a[rel]
        others_e, others_a = sorted(peers_e[rel] - {rel}), sorted(peers_a[rel] - {rel})
        lines.append(f"{rel}: hardlinked with {others_e} != {others_a}")
    return lines


def compare_trees(
    expected: Path,
    actual: Path,
    *,
    ignore: Iterable[str] = ("lost+found",),
    ignore_mtime: Iterable[str] = (),
    mtime_resolution_ns: int = 1,
) -> list[str]:
    """Every difference between two trees, one readable line each ("etc/passwd: mode 0644 != 0600",
    expected value first); an empty list when they are the same.

    `ignore`: relative paths skipped with everything under them, in both trees. `ignore_mtime`:
    relative paths whose mtime the image does not define (none in tests/images.py's images).
    """
    ignore = tuple(ignore)
    no_mtime = {p.strip("/") or "." for p in ignore_mtime}
    expected_facts, actual_facts = tree_facts(expected, ignore=ignore), tree_facts(actual, ignore=ignore)
    lines = []
    for rel in sorted(expected_facts.keys() | actual_facts.keys()):
        e, a = expected_facts.get(rel), actual_facts.get(rel)
        if a is None:
            lines.append(f"{rel}: missing ({e.kind})")
        elif e is None:
            lines.append(f"{rel}: unexpected ({a.kind})")
        else:
            lines += _entry_differences(
                rel, e, a, compare_mtime=rel not in no_mtime, resolution=mtime_resolution_ns
            )
    return lines + _hardlink_differences(expected_facts, actual_facts)
