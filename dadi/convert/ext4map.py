"""Where a layer's file system metadata and its regular files lie on the working disk: the read hints.

A node that knows these fetches every metadata block of an image in a few large requests at mount
(path lookups, stat and open then never wait on the network) and fetches a small file whole on its
first miss, instead of one request per block the kernel happens to ask for (docs/FORMAT.md "Hints").

- Metadata: `e2image -r` copies exactly the metadata blocks of a file system into a sparse file
  (superblocks, group descriptors, bitmaps, used inode tables, directories, extent tree blocks,
  symlink and xattr blocks), so its data regions are the metadata ranges. e2fsprogs' own walk, not ours.
- Files: the extents of every in-use regular file, read from the inode tables and extent trees
  (`file_extents`). Only the on-disk structures mke2fs and debugfs write for our feature set are
  understood (extents, 64bit, flex_bg); a file stored otherwise (inline data, block maps) is skipped:
  hints are an optimisation, and a missing one costs a round trip, never a wrong byte.

Both are then cut to the blocks the layer changed (`layer_hints`): a layer's tables describe its own blocks.
"""

from __future__ import annotations

import bisect
import os
import struct
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from dadi.convert.blockdiff import data_regions
from dadi.convert.workdisk import e2fs_env
from dadi.errors import DadiError

Range = tuple[int, int]  # (first block, block count)

# Bump when the hints for the same disk change: it is part of the converter's cache key.
HINTS_VERSION = 2

_SUPERBLOCK_OFFSET = 1024
_EXT4_MAGIC = 0xEF53
_INCOMPAT_64BIT = 0x80
_BG_INODE_UNINIT = 0x1
_S_IFMT, _S_IFREG = 0o170000, 0o100000
_EXTENTS_FL, _INLINE_DATA_FL = 0x80000, 0x10000000
_EXTENT_MAGIC = 0xF30A
_MAX_EXTENT_DEPTH = 5  # ext4's own limit
_UNINIT_LEN = 32768  # ee_len above this: an unwritten (preallocated, reads as zeros) extent


class Ext4MapError(DadiError):
    """The working disk's ext4 structures are not what this module understands."""


def metadata_ranges(disk: Path) -> list[Range]:
    """Block ranges holding the metadata reads need, by e2image -r (sorted, non-overlapping): all of
    it but what only allocation and online resizing read (a read-only view never does; a writable one
    reads its few blocks when it writes): the block and inode bitmaps, and the GDT blocks reserved for
    resizing, which on our 64 GiB disk alone are 4 MiB, ten times the inodes of 1,400 files."""
    with tempfile.TemporaryDirectory(prefix="dadi-e2image-", dir=disk.parent) as tmp:
        image = Path(tmp) / "metadata.img"
        result = subprocess.run(["e2image", "-r", str(disk), str(image)], capture_output=True, text=True,
                                env={**os.environ, **e2fs_env()})
        if result.returncode != 0:
            raise Ext4MapError(f"e2image -r {disk} failed ({result.returncode}): {result.stderr.strip()}")
        fd = os.open(image, os.O_RDONLY)
        try:
            regions = data_regions(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
    with open(disk, "rb") as f:
        fs = _Ext4(f)
        unread = fs.bitmap_blocks() | fs.reserved_gdt_blocks()
    block = fs.block_size
    ranges = _merge((offset // block, -(-(offset + length) // block) - offset // block) for offset, length in regions)
    return subtract(ranges, unread)


def subtract(ranges: list[Range], blocks: set[int]) -> list[Range]:
    """`ranges` without the given blocks."""
    out = []
    for start, count in ranges:
        run_start = start
        for block in range(start, start + count):
            if block in blocks:
                if block > run_start:
                    out.append((run_start, block - run_start))
                run_start = block + 1
        if start + count > run_start:
            out.append((run_start, start + count - run_start))
    return out


def file_extents(disk: Path) -> list[list[Range]]:
    """The data block ranges of every in-use regular file with extents, in inode order."""
    with open(disk, "rb") as f:
        return _Ext4(f).regular_files()


class _Ext4:
    def __init__(self, f):
        self.f = f
        sb = self._pread(_SUPERBLOCK_OFFSET, 1024)
        if struct.unpack_from("<H", sb, 56)[0] != _EXT4_MAGIC:
            raise Ext4MapError("no ext4 superblock at byte 1024")
        blocks_lo, = struct.unpack_from("<I", sb, 4)
        self.first_data_block, log_block = struct.unpack_from("<II", sb, 20)
        self.block_size = 1024 << log_block
        self.blocks_per_group, = struct.unpack_from("<I", sb, 32)
        self.inodes_per_group, = struct.unpack_from("<I", sb, 40)
        self.first_inode, = struct.unpack_from("<I", sb, 84)  # below it: reserved (journal, resize), not files
        self.inode_size, = struct.unpack_from("<H", sb, 88)
        incompat, = struct.unpack_from("<I", sb, 96)
        self.reserved_gdt, = struct.unpack_from("<H", sb, 0xCE)
        wide = incompat & _INCOMPAT_64BIT
        self.desc_size = struct.unpack_from("<H", sb, 254)[0] if wide else 32
        blocks_hi = struct.unpack_from("<I", sb, 0x150)[0] if wide else 0
        self.blocks = blocks_lo | blocks_hi << 32
        if not self.blocks_per_group or not self.inodes_per_group or self.inode_size < 128 or self.desc_size < 32:
            raise Ext4MapError("ext4 superblock with a zero group size or a short inode or descriptor")
        self.groups = -(-(self.blocks - self.first_data_block) // self.blocks_per_group)

    def _pread(self, offset: int, size: int) -> bytes:
        data = os.pread(self.f.fileno(), size, offset)
        if len(data) != size:
            raise Ext4MapError(f"short read of {size} bytes at byte {offset} of the working disk")
        return data

    def _descriptors(self) -> list[bytes]:
        table = self._pread((self.first_data_block + 1) * self.block_size, self.groups * self.desc_size)
        return [table[g * self.desc_size:(g + 1) * self.desc_size] for g in range(self.groups)]

    def reserved_gdt_blocks(self) -> set[int]:
        """The primary copy of the GDT blocks reserved for online resizing (the resize inode's)."""
        gdt_blocks = -(-self.groups * self.desc_size // self.block_size)
        first = self.first_data_block + 1 + gdt_blocks
        return set(range(first, first + self.reserved_gdt))

    def bitmap_blocks(self) -> set[int]:
        """Every group's block bitmap and inode bitmap block."""
        blocks = set()
        for d in self._descriptors():
            block_bitmap, inode_bitmap = struct.unpack_from("<II", d, 0)
            if self.desc_size >= 64:
                block_bitmap |= struct.unpack_from("<I", d, 0x20)[0] << 32
                inode_bitmap |= struct.unpack_from("<I", d, 0x24)[0] << 32
            blocks.update((block_bitmap, inode_bitmap))
        return blocks

    def regular_files(self) -> list[list[Range]]:
        files = []
        for group, d in enumerate(self._descriptors()):
            table, = struct.unpack_from("<I", d, 8)
            flags, = struct.unpack_from("<H", d, 0x12)
            unused, = struct.unpack_from("<H", d, 0x1C)
            if self.desc_size >= 64:
                table |= struct.unpack_from("<I", d, 0x28)[0] << 32
                unused |= struct.unpack_from("<H", d, 0x32)[0] << 16
            if flags & _BG_INODE_UNINIT:
                continue
            used = max(0, self.inodes_per_group - unused)
            if not used:
                continue
            inodes = self._pread(table * self.block_size, used * self.inode_size)
            for slot in range(used):
                if group * self.inodes_per_group + slot + 1 < self.first_inode:
                    continue
                ranges = self._file_ranges(inodes[slot * self.inode_size:(slot + 1) * self.inode_size])
                if ranges:
                    files.append(ranges)
        return files

    def _file_ranges(self, inode: bytes) -> list[Range]:
        mode, = struct.unpack_from("<H", inode, 0)
        links, = struct.unpack_from("<H", inode, 0x1A)
        dtime, = struct.unpack_from("<I", inode, 0x14)
        flags, = struct.unpack_from("<I", inode, 0x20)
        if mode & _S_IFMT != _S_IFREG or not links or dtime or flags & _INLINE_DATA_FL or not flags & _EXTENTS_FL:
            return []
        ranges: list[Range] = []
        self._walk(inode[0x28:0x28 + 60], _MAX_EXTENT_DEPTH, ranges)
        return _merge(ranges)

    def _walk(self, node: bytes, depth_left: int, out: list[Range]) -> None:
        magic, entries, _, depth = struct.unpack_from("<HHHH", node, 0)
        if magic != _EXTENT_MAGIC or depth > depth_left or 12 + 12 * entries > len(node):
            return  # not an extent tree we understand: no hint for this file
        for i in range(entries):
            at = 12 + 12 * i
            if depth == 0:
                _, length, start_hi, start_lo = struct.unpack_from("<IHHI", node, at)
                if length <= _UNINIT_LEN:  # unwritten extents read as zeros and are not in the packed stream
                    start = start_hi << 32 | start_lo
                    if length and start + length <= self.blocks:
                        out.append((start, length))
            else:
                _, leaf_lo, leaf_hi = struct.unpack_from("<IIH", node, at)
                leaf = leaf_hi << 32 | leaf_lo
                if leaf < self.blocks:
                    self._walk(self._pread(leaf * self.block_size, self.block_size), depth - 1, out)


def _merge(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, with touching and overlapping ranges joined."""
    merged: list[list[int]] = []
    for block, count in sorted(ranges):
        if merged and block <= merged[-1][0] + merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], block + count - merged[-1][0])
        else:
            merged.append([block, count])
    return [(block, count) for block, count in merged]


def clip(ranges: list[Range], changed: list[Range]) -> list[Range]:
    """The parts of `ranges` inside the sorted, non-overlapping `changed` ranges."""
    starts = [block for block, _ in changed]
    out = []
    for block, count in ranges:
        end = block + count
        i = max(0, bisect.bisect_right(starts, block) - 1)
        while i < len(changed) and changed[i][0] < end:
            lo, hi = max(block, changed[i][0]), min(end, changed[i][0] + changed[i][1])
            if lo < hi:
                out.append((lo, hi - lo))
            i += 1
    return _merge(out)


def layer_hints(disk: Path, runs: list[tuple[int, int, bool]]) -> tuple[list[Range], list[list[Range]]]:
    """(metadata ranges, per-file ranges) of the blocks this layer stores data for (`runs` from
    dadi.convert.blockdiff.changed_extents); files with no such block are left out, files sorted by block."""
    changed = [(block, count) for block, count, zero in runs if not zero]
    metadata = clip(metadata_ranges(disk), changed)
    files = [ranges for ranges in (clip(f, changed) for f in file_extents(disk)) if ranges]
    files.sort()
    return metadata, files
