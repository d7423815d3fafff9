"""Apply one OCI layer tar to the working ext4 disk in user space: one debugfs batch per layer.

The tar is read once, sequentially (`read_layer`). Regular file contents and xattr values are spooled
to files (dadi.convert.spool); the entries' metadata is kept. Then (`apply_contents`) the layer is
planned against the TreeModel and written as one debugfs batch, in this order:

1. whiteouts and opaque directories delete from the LOWER state (so they never touch an entry of this
   layer, whatever the tar order);
2. every other entry, as the layer finally means it (a later entry for the same path wins; an entry
   that turns a path into a non-directory drops the earlier entries below it, as extraction would),
   sorted by (parent directory, name): a directory always exists before its children, and the batch
   changes directory once per directory;
3. hard links, after everything they may point to exists;
4. the mtime of every directory this layer declared or implied, last, so that nothing after it moves.

Every command works on a bare name inside its parent directory (`cd` first): `mknod` only works that
way, and it keeps lines short. Paths are checked against the TreeModel: a component `..` that climbs out,
a parent (or hard link target) that is a symlink, a hard link to a missing file or a directory, or a
name no debugfs command can carry is refused with LayerError naming the tar entry.

Times: debugfs stamps "now" on what it creates; `set_current_time` makes "now" the entry's mtime, so
atime, ctime, crtime and mtime all equal the tar's mtime (sub-second and out-of-range parts are set
with `sif`). Deleted inodes get a dtime from that same clock. Everything is a function of the input.
"""

from __future__ import annotations

import base64
import decimal
import os
import tarfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dadi.convert.debugfs import BatchError, DebugfsBatch, UnquotableName, quote
from dadi.convert.spool import Spool, memory_budget
from dadi.convert.tree import (
    BLOCKDEV,
    CHARDEV,
    DIR,
    FIFO,
    FILE,
    ROOT,
    SYMLINK,
    TreeModel,
    join,
    parent_of,
)
from dadi.convert.workdisk import FIXED_TIME, e2fs_env
from dadi.errors import LayerError

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_COPY_BUFFER = 1 << 20
# tarfile's stream mode copies the rest of its buffer on every read, headers included: a small buffer
# keeps that cheap (1 MiB made reading the Debian base layer 25% slower than 64 KiB).
_TAR_BUFFER = 64 << 10
_MAX_NAME = 255  # ext4's limit on one path component, in bytes
# ext4 stores seconds as a signed 32-bit value plus two epoch bits: 1901-12-13 .. 2446-05-10.
_MIN_TIME = -(1 << 31)
_MAX_TIME = (1 << 34) - (1 << 31) - 1
_S_IFMT = {FILE: 0o100000, DIR: 0o040000, SYMLINK: 0o120000, CHARDEV: 0o020000, BLOCKDEV: 0o060000,
           FIFO: 0o010000}
# As root, a spool file can carry any mode into `write` (which copies it); otherwise a mode without
# owner-read (debugfs could not open it) or with setuid/setgid (chmod may drop them) is set with `sif`.
_SPOOL_CARRIES_ANY_MODE = os.geteuid() == 0


@dataclass
class ApplyStats:
    """What applying one layer did; `entries` is the number of tar members read."""

    entries: int = 0
    files: int = 0
    file_bytes: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0
    whiteouts: int = 0
    removed: int = 0
    commands: int = 0
    source_bytes: int = 0  # the layer blob's bytes as stored (compressed)
    read_seconds: float = 0.0
    debugfs_seconds: float = 0.0


class _Entry:
    """One tar member, as far as the applier needs it."""

    __slots__ = ("name", "path", "kind", "perm", "uid", "gid", "mtime", "nsec", "spool", "target",
                 "major", "minor", "xattrs", "hardlink")

    def __init__(self, name: str, path: str, kind: str):
        self.name = name
        self.path = path
        self.kind = kind
        self.perm = 0o644
        self.uid = 0
        self.gid = 0
        self.mtime = 0
        self.nsec = 0
        self.spool: bytes | None = None
        self.target = ""  # symlink target as stored, or the hard link's normalised target path
        self.major = 0
        self.minor = 0
        self.xattrs: list[tuple[str, bytes]] = []
        self.hardlink = False


def apply_layer(disk: Path, tree: TreeModel, tar_stream: BinaryIO, *, layer: str, workdir: Path) -> ApplyStats:
    """Apply an uncompressed OCI layer tar to the ext4 image `disk`; updates `tree` to match.

    On error (LayerError) both the disk and the tree are left half-changed: start over from a copy.
    """
    workdir = Path(workdir)
    with Spool(workdir / "spool", memory_budget()) as spool:
        contents = read_layer(tar_stream, layer=layer, spool=spool)
        return apply_contents(disk, tree, contents, cmdfile=workdir / "debugfs.cmds")


def read_layer(tar_stream: BinaryIO, *, layer: str, spool: Spool) -> LayerContents:
    """Read a layer tar once, spooling file contents: the part that does not need the disk.

    The converter runs this for the next layer while debugfs applies the current one.
    """
    started = time.monotonic()
    contents = LayerContents(layer, spool)
    contents.read(tar_stream)
    contents.stats.read_seconds = time.monotonic() - started
    return contents


def apply_contents(disk: Path, tree: TreeModel, contents: LayerContents, *, cmdfile: Path) -> ApplyStats:
    """Plan a read layer against `tree` and run it as one debugfs batch on `disk`."""
    stats = contents.stats
    planner = _Planner(tree, contents.layer, stats)
    planner.plan(contents)
    stats.commands = len(planner.batch)
    started = time.monotonic()
    try:
        planner.batch.run(Path(disk), cmdfile, env=e2fs_env(FIXED_TIME))
    except BatchError as e:
        raise LayerError(contents.layer, e.first_origin, str(e)) from e
    stats.debugfs_seconds = time.monotonic() - started
    return stats


# -- reading the tar ---------------------------------------------------------------------------------


def normalise(name: str) -> str:
    """'./a/b', 'a/b/', '/a/b' -> 'a/b'; '.' or '/' -> '' (the root). ValueError if '..' climbs out."""
    parts: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise ValueError("'..' climbs out of the root")
            parts.pop()
        else:
            parts.append(comp)
    return "/".join(parts)


def _pax_mtime(tarinfo: tarfile.TarInfo) -> tuple[int, int]:
    """Seconds and nanoseconds; the PAX record keeps digits a float would lose."""
    raw = tarinfo.pax_headers.get("mtime")
    if raw is None:
        return int(tarinfo.mtime), 0
    try:
        value = decimal.Decimal(raw)
    except decimal.InvalidOperation:
        return int(tarinfo.mtime), 0
    seconds = int(value.to_integral_value(rounding=decimal.ROUND_FLOOR))
    nsec = int((value - seconds) * 1_000_000_000)
    return seconds, min(nsec, 999_999_999)


def _xattrs(tarinfo: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    out = []
    for key, value in tarinfo.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            # tarfile decodes PAX values as UTF-8 with surrogate escapes: this gives the raw bytes back.
            out.append((key[len("SCHILY.xattr."):], value.encode("utf-8", "surrogateescape")))
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):], errors="surrogateescape")
            out.append((name, base64.b64decode(value + "=" * (-len(value) % 4))))
    out.sort()
    return out


class LayerContents:
    """A layer tar read once: entries (contents spooled to files), whiteout targets, opaque directories."""

    def __init__(self, layer: str, spool: Spool):
        self.layer = layer
        self.spool = spool
        self.stats = ApplyStats()
        self.entries: list[_Entry] = []
        self.whiteouts: list[tuple[str, str]] = []  # (path to delete, tar name)
        self.opaques: list[tuple[str, str]] = []  # (directory, tar name)
        self.xattr_files: dict[bytes, bytes] = {}  # xattr value -> spool file holding it

    def read(self, stream: BinaryIO) -> None:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", bufsize=_TAR_BUFFER)
        except tarfile.TarError as e:
            raise LayerError(self.layer, None, f"not a tar archive: {e}") from e
        name = None
        try:
            with tar:
                while True:
                    tarinfo = _next_member(tar, after=name)
                    if tarinfo is None:
                        break
                    name = tarinfo.name
                    self.stats.entries += 1
                    self._member(tar, tarinfo)
                    # Stream mode keeps every TarInfo otherwise: a big layer would hold them all.
                    tar.members.clear()
        except tarfile.TarError as e:
            raise LayerError(self.layer, name, f"broken tar archive after this entry: {e}") from e
        except OSError as e:
            raise LayerError(self.layer, name, f"reading or spooling failed: {e}") from e

    def _member(self, tar: tarfile.TarFile, tarinfo: tarfile.TarInfo) -> None:
        name = tarinfo.name
        try:
            path = normalise(name)
        except ValueError as e:
            raise LayerError(self.layer, name, f"refused: {e}") from None
        parent, _, base = path.rpartition("/")
        if base.startswith(_WHITEOUT):
            self.stats.whiteouts += 1
            if base == _OPAQUE:
                self.opaques.append((parent, name))
            elif not base.startswith(".wh..wh."):  # other .wh..wh. names are aufs bookkeeping
                if base in (".wh.", ".wh..", ".wh..."):
                    raise LayerError(self.layer, name, "refused: whiteout of '', '.' or '..'")
                self.whiteouts.append((join(parent, base[len(_WHITEOUT):]), name))
            return
        kind = _kind_of(tarinfo)
        if kind is None:
            raise LayerError(self.layer, name, f"unsupported tar entry type {tarinfo.type!r}")
        entry = _Entry(name, path, kind)
        entry.perm = tarinfo.mode & 0o7777
        entry.uid = tarinfo.uid
        entry.gid = tarinfo.gid
        entry.mtime, entry.nsec = _pax_mtime(tarinfo)
        if tarinfo.pax_headers:
            entry.xattrs = _xattrs(tarinfo)
        if tarinfo.islnk():
            entry.hardlink = True
            try:
                entry.target = normalise(tarinfo.linkname)
            except ValueError as e:
                raise LayerError(self.layer, name, f"refused hard link to {tarinfo.linkname!r}: {e}") from None
        elif kind == SYMLINK:
            if not tarinfo.linkname:
                raise LayerError(self.layer, name, "symlink with an empty target")
            entry.target = tarinfo.linkname
        elif kind in (CHARDEV, BLOCKDEV):
            entry.major, entry.minor = tarinfo.devmajor, tarinfo.devminor
        elif kind == FILE:
            entry.spool = self._spool(tar, tarinfo)
        for _, value in entry.xattrs:
            if value not in self.xattr_files:
                self.xattr_files[value] = self._write_spool(value)
        self.entries.append(entry)

    def _spool(self, tar: tarfile.TarFile, tarinfo: tarfile.TarInfo) -> bytes:
        path = self.spool.new_path(tarinfo.size)
        source = tar.extractfile(tarinfo)
        assert source is not None  # regular members always have a file object
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            remaining = tarinfo.size
            while remaining > 0:
                chunk = source.read(min(remaining, _COPY_BUFFER))
                if not chunk:
                    raise tarfile.ReadError(f"unexpected end of data in {tarinfo.name!r}")
                os.write(fd, chunk)
                remaining -= len(chunk)
            perm = tarinfo.mode & 0o7777
            if _spool_carries_mode(perm):
                os.fchmod(fd, perm)
        finally:
            os.close(fd)
        self.stats.files += 1
        self.stats.file_bytes += tarinfo.size
        return os.fsencode(path)

    def _write_spool(self, data: bytes) -> bytes:
        path = self.spool.new_path(len(data))
        with open(path, "wb") as f:
            f.write(data)
        return os.fsencode(path)


def _next_member(tar: tarfile.TarFile, *, after: str | None) -> tarfile.TarInfo | None:
    """The next member, or None at the end of the archive.

    Some writers (umoci insert, for one) stop right after the last member's data, without its padding
    or the two zero blocks that end a tar. tarfile reports that as "unexpected end of data" before it
    reads the next header; every byte of the last member was read by then (a short member fails in
    `_spool`), so nothing is lost by taking it as the end, as umoci and Go's archive/tar do.
    """
    try:
        return tar.next()
    except tarfile.ReadError as e:
        if after is not None and str(e) == "unexpected end of data":
            return None
        raise


def _kind_of(tarinfo: tarfile.TarInfo) -> str | None:
    if tarinfo.isreg():
        return FILE
    if tarinfo.isdir():
        return DIR
    if tarinfo.issym():
        return SYMLINK
    if tarinfo.islnk():
        return FILE  # refined when the target is known
    if tarinfo.ischr():
        return CHARDEV
    if tarinfo.isblk():
        return BLOCKDEV
    if tarinfo.isfifo():
        return FIFO
    return None


def _spool_carries_mode(perm: int) -> bool:
    return _SPOOL_CARRIES_ANY_MODE or perm & 0o6400 == 0o400


def _ext4_time(seconds: int, nsec: int) -> tuple[int, int]:
    """(low 32 bits, extra field) of an ext4 timestamp, clamped to what ext4 can store."""
    seconds = min(max(seconds, _MIN_TIME), _MAX_TIME)
    low = seconds & 0xFFFFFFFF
    signed_low = low - (1 << 32) if low >= 1 << 31 else low
    epoch = (seconds - signed_low) >> 32
    return low, (nsec << 2) | (epoch & 3)


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


# -- planning the batch ------------------------------------------------------------------------------


def _final_intents(entries: list[_Entry]) -> dict[str, _Entry]:
    """What the layer means for each path once all its entries are extracted in tar order."""
    intent: dict[str, _Entry] = {}
    dirs: set[str] = set()
    for entry in entries:
        path = entry.path
        # An earlier non-directory at an ancestor is replaced by the (implicit) directory this needs.
        ancestor = parent_of(path) if path else None
        while ancestor:
            if ancestor in dirs:
                break  # its own ancestors were checked when it was added
            earlier = intent.get(ancestor)
            if earlier is not None and (earlier.kind != DIR or earlier.hardlink):
                del intent[ancestor]
            ancestor = parent_of(ancestor)
        previous = intent.get(path)
        if previous is not None and previous.kind == DIR and not previous.hardlink and (
            entry.kind != DIR or entry.hardlink
        ):
            prefix = path + "/" if path else ""
            for below in [p for p in intent if p.startswith(prefix) and p != path]:
                del intent[below]
                dirs.discard(below)
            dirs.discard(path)
        intent[path] = entry
        if entry.kind == DIR and not entry.hardlink:
            dirs.add(path)
    return intent


def _order(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent, name


class _Planner:
    """Turns the layer's entries into debugfs commands, keeping the TreeModel in step."""

    def __init__(self, tree: TreeModel, layer: str, stats: ApplyStats):
        self.tree = tree
        self.layer = layer
        self.stats = stats
        self.batch = DebugfsBatch()
        self.cwd: str | None = None
        self.now: int | None = None
        self.ready: set[str] = {ROOT}  # directories known to exist as directories in this batch
        self.dir_times: dict[str, tuple[int, int]] = {}  # directories whose mtime is set at the end
        self.origin: str | None = None  # tar entry the commands being written are for

    # -- low-level command helpers ---------------------------------------------------------------

    def _cmd(self, line: bytes) -> None:
        self.batch.add(line, self.origin)

    def _q(self, name: str, prefix: bytes = b"") -> bytes:
        """One path component, quoted (`prefix` b"./" for commands that parse options)."""
        raw = _enc(name)
        if len(raw) > _MAX_NAME:
            raise LayerError(self.layer, self.origin, f"name {name!r} is longer than {_MAX_NAME} bytes")
        try:
            return quote(prefix + raw)
        except UnquotableName as e:
            raise LayerError(self.layer, self.origin, str(e)) from None

    def _qpath(self, path: str) -> bytes:
        try:
            return quote(b"/" + _enc(path))
        except UnquotableName as e:
            raise LayerError(self.layer, self.origin, str(e)) from None

    def _cd(self, directory: str) -> None:
        if self.cwd == directory:
            return
        line = b"cd " + self._qpath(directory)
        try:
            self._cmd(line)
        except UnquotableName:
            # A path too long for one batch line: walk there one component at a time.
            self._cmd(b"cd /")
            for comp in directory.split("/"):
                self._cmd(b"cd " + self._q(comp))
        self.cwd = directory

    def _set_clock(self, seconds: int) -> None:
        # debugfs takes a clock of 0 to mean "the real time", which would make the output depend on
        # the day: 0 and earlier become 1, later than 2038 the last 32-bit second; `sif` then sets
        # the exact mtime.
        seconds = min(max(seconds, 1), (1 << 31) - 1)
        if self.now != seconds:
            self._cmd(b"set_current_time @%d" % seconds)
            self.now = seconds

    def _here(self, path: str) -> bytes:
        """The argument naming `path` from inside its parent (cd'ed to): './name' ('.' for the root).

        The './' keeps getopt-parsing commands (ea_set, ea_rm) from taking '-name' as an option.
        """
        if path == ROOT:
            self._cd(ROOT)
            return b"."
        parent, _, name = path.rpartition("/")
        self._cd(parent)
        return self._q(name, b"./")

    def _sif(self, arg: bytes, field: bytes, value: int | bytes) -> None:
        if isinstance(value, int):
            value = b"%d" % value
        self._cmd(b"sif %s %s %s" % (arg, field, value))

    def _set_mtime(self, arg: bytes, seconds: int, nsec: int, *, always: bool) -> None:
        low, extra = _ext4_time(seconds, nsec)
        in_clock_range = 0 < seconds < 1 << 31
        if always or not in_clock_range:
            self._sif(arg, b"mtime", b"@%d" % low)
        if always or extra or not in_clock_range:
            self._sif(arg, b"mtime_extra", extra)

    def _set_xattrs(self, arg: bytes, inode: int, xattrs: list[tuple[str, bytes]], files: dict) -> None:
        old = self.tree.xattrs.get(inode, ())
        new_names = tuple(name for name, _ in xattrs)
        for name in old:
            if name not in new_names:
                self._cmd(b"ea_rm %s %s" % (arg, self._q(name)))
        for name, value in xattrs:
            self._cmd(b"ea_set -f %s %s %s" % (quote(files[value]), arg, self._q(name)))
        self.tree.set_xattr_names(inode, new_names)

    # -- tree operations -------------------------------------------------------------------------

    def _lower_node(self, path: str) -> tuple[str, int] | None:
        """The entry at `path` if every ancestor is a real directory; None otherwise (nothing to delete)."""
        ancestor = parent_of(path) if path else None
        while ancestor:
            if self.tree.kind(ancestor) != DIR:
                return None
            ancestor = parent_of(ancestor)
        return self.tree.get(path)

    def _remove(self, path: str) -> None:
        """Delete `path` and, for a directory, everything below it."""
        for victim in self.tree.walk_post_order(path):
            kind, inode = self.tree.entries[victim]
            arg = self._here(victim)
            last_link = self.tree.links(inode) == 1
            if last_link and inode in self.tree.xattrs:
                # debugfs frees an inode's blocks but not its xattr block: empty it first.
                for name in self.tree.xattrs[inode]:
                    self._cmd(b"ea_rm %s %s" % (arg, self._q(name)))
            if kind == DIR:
                self._cmd(b"rmdir " + arg)
                self.ready.discard(victim)
                self.dir_times.pop(victim, None)
            else:
                self._cmd(b"rm " + arg)
            self.tree.remove_one(victim)
            self.stats.removed += 1

    def _mkdir_implicit(self, path: str) -> None:
        self._cd(parent_of(path))
        self._set_clock(FIXED_TIME)
        self._cmd(b"mkdir " + self._q(path.rpartition("/")[2]))  # ext2fs_mkdir: 0755 root:root
        self.tree.add(path, DIR)
        self.dir_times[path] = (FIXED_TIME, 0)
        self.stats.dirs += 1

    def _ensure_dir(self, directory: str) -> None:
        """Make every component of `directory` a directory; refuse to pass through a symlink."""
        if directory in self.ready:
            return
        current = ""
        for comp in directory.split("/"):
            current = join(current, comp)
            if current in self.ready:
                continue
            node = self.tree.get(current)
            if node is None:
                self._mkdir_implicit(current)
            elif node[0] == SYMLINK:
                raise LayerError(self.layer, self.origin, f"refused: parent {current!r} is a symlink")
            elif node[0] != DIR:
                # This layer puts entries below a lower non-directory: the layer's tree has a
                # directory there (overlay semantics), so the lower file goes.
                self._remove(current)
                self._mkdir_implicit(current)
            self.ready.add(current)

    # -- the plan --------------------------------------------------------------------------------

    def plan(self, reader: LayerContents) -> None:
        entries, xattr_files = reader.entries, reader.xattr_files
        self._set_clock(FIXED_TIME)
        # 1. Deletions, against the lower layers only.
        for directory, name in reader.opaques:
            self.origin = name
            if self._lower_node(directory) is not None and self.tree.kind(directory) == DIR:
                for child in sorted(self.tree.children[directory]):
                    self._remove(join(directory, child))
        for path, name in reader.whiteouts:
            self.origin = name
            if self._lower_node(path) is not None:
                self._remove(path)
        # 2. Everything but hard links, parents before children.
        intents = _final_intents(entries)
        links = []
        for path in sorted(intents, key=_order):
            entry = intents[path]
            if entry.hardlink:
                links.append(entry)
            else:
                self.origin = entry.name
                self._add(entry, xattr_files)
        # 3. Hard links, once everything they may point to exists.
        for entry in links:
            self.origin = entry.name
            self._link(entry, intents)
        # 4. Directory mtimes, last: nothing after this changes them.
        self.origin = None
        for path in sorted(self.dir_times, key=_order):
            seconds, nsec = self.dir_times[path]
            self._set_mtime(self._here(path), seconds, nsec, always=True)
        self._set_clock(FIXED_TIME)  # the superblock's write time

    def _add(self, entry: _Entry, xattr_files: dict[bytes, bytes]) -> None:
        path = entry.path
        if path == ROOT:
            self._update_dir(entry, self.tree.entries[ROOT][1], xattr_files)
            return
        self._ensure_dir(parent_of(path))
        existing = self.tree.get(path)
        if entry.kind == DIR and existing is not None and existing[0] == DIR:
            self._update_dir(entry, existing[1], xattr_files)
            return
        if existing is not None:
            self._remove(path)
        parent, _, base = path.rpartition("/")
        self._cd(parent)
        self._set_clock(entry.mtime)
        name = self._q(base)
        arg = self._q(base, b"./")
        kind = entry.kind
        mode_set = False
        if kind == FILE:
            self._cmd(b"write %s %s" % (quote(entry.spool), name))
            if not _spool_carries_mode(entry.perm):
                self._sif(arg, b"mode", b"0%o" % (_S_IFMT[FILE] | entry.perm))
            mode_set = True
        elif kind == DIR:
            self._cmd(b"mkdir " + name)
            self.dir_times[path] = (entry.mtime, entry.nsec)
            self.stats.dirs += 1
        elif kind == SYMLINK:
            self._cmd(b"symlink %s %s" % (name, self._q_target(entry.target)))
            mode_set = True  # symlinks are 0777 whatever the tar says, as on Linux
            self.stats.symlinks += 1
        elif kind in (CHARDEV, BLOCKDEV):
            self._mknod_device(name, arg, kind, entry.major, entry.minor)
            self.stats.devices += 1
        elif kind == FIFO:
            self._cmd(b"mknod %s p" % name)
            self.stats.devices += 1
        if not mode_set and not (kind == DIR and entry.perm == 0o755):
            # mknod creates mode 000, mkdir 0755.
            self._sif(arg, b"mode", b"0%o" % (_S_IFMT[kind] | entry.perm))
        if entry.uid:
            self._sif(arg, b"uid", entry.uid)
        if entry.gid:
            self._sif(arg, b"gid", entry.gid)
        if kind != DIR:
            self._set_mtime(arg, entry.mtime, entry.nsec, always=False)
        inode = self.tree.add(path, kind)
        if entry.xattrs:
            self._set_xattrs(arg, inode, entry.xattrs, xattr_files)
        if kind == DIR:
            self.ready.add(path)

    def _mknod_device(self, name: bytes, arg: bytes, kind: str, major: int, minor: int) -> None:
        if major < 256 and minor < 256:
            self._cmd(b"mknod %s %s %d %d" % (name, kind.encode(), major, minor))
            return
        # debugfs' mknod refuses numbers above 65535 (and majors above 4095 do not fit ext4's
        # encoding): create the node as 0:0 and store the kernel's "new" encoding in i_block[1].
        if major >= 1 << 12 or minor >= 1 << 20:
            raise LayerError(self.layer, self.origin, f"device number {major}:{minor} does not fit ext4")
        self._cmd(b"mknod %s %s 0 0" % (name, kind.encode()))
        encoded = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
        self._sif(arg, b"block[1]", encoded)

    def _q_target(self, target: str) -> bytes:
        try:
            return quote(_enc(target))
        except UnquotableName as e:
            raise LayerError(self.layer, self.origin, f"symlink target: {e}") from None

    def _update_dir(self, entry: _Entry, inode: int, xattr_files: dict[bytes, bytes]) -> None:
        """An existing directory keeps its children; only its metadata changes."""
        arg = self._here(entry.path)
        self._sif(arg, b"mode", b"0%o" % (_S_IFMT[DIR] | entry.perm))
        self._sif(arg, b"uid", entry.uid)
        self._sif(arg, b"gid", entry.gid)
        self._set_xattrs(arg, inode, entry.xattrs, xattr_files)
        self.dir_times[entry.path] = (entry.mtime, entry.nsec)
        self.ready.add(entry.path)

    def _link(self, entry: _Entry, intents: dict[str, _Entry]) -> None:
        target = entry.target
        seen = {entry.path}
        # A link to a path that this layer also makes a hard link means that link's final target.
        while target in intents and intents[target].hardlink and target != entry.path:
            if target in seen:
                raise LayerError(self.layer, entry.name, "hard links form a loop")
            seen.add(target)
            target = intents[target].target
        if target == entry.path:
            return  # a link to itself: the path keeps what it has
        ancestor = parent_of(target) if target else None
        while ancestor:
            kind = self.tree.kind(ancestor)
            if kind == SYMLINK:
                raise LayerError(self.layer, entry.name,
                                 f"refused: hard link target {target!r} passes through symlink {ancestor!r}")
            if kind != DIR:
                raise LayerError(self.layer, entry.name, f"hard link to missing file {target!r}")
            ancestor = parent_of(ancestor)
        self._ensure_dir(parent_of(entry.path))
        existing = self.tree.get(entry.path)
        node = self.tree.get(target)
        if node is not None and existing is not None and existing[1] == node[1]:
            return  # already a link to that inode
        if existing is not None:
            self._remove(entry.path)
            node = self.tree.get(target)  # the removal may have taken the target with it
        if node is None:
            raise LayerError(self.layer, entry.name, f"hard link to missing file {target!r}")
        if node[0] == DIR:
            raise LayerError(self.layer, entry.name, f"hard link to directory {target!r}")
        parent, _, base = entry.path.rpartition("/")
        self._cd(parent)
        self._cmd(b"ln %s %s" % (self._qpath(target), self._q(base)))
        self.tree.add(entry.path, node[0], node[1])
        # debugfs `ln` leaves i_links_count alone; keep it right at every step (a later `rm` counts on it).
        self._sif(self._q(base, b"./"), b"links_count", self.tree.links(node[1]))
        self.stats.hardlinks += 1
