"""Which blocks of the working disk a layer changed: per-block hashes before and after applying it.

The working disk is a sparse file of tens of GiB holding a few hundred MiB of data, so only the data
regions the file system reports (SEEK_DATA/SEEK_HOLE) are read. Each 4 KiB block is hashed with
xxh3-64; all-zero blocks are not stored, since a hole and a block of zeros read the same. A block
whose hash changed is data for the layer blob; a block that held data before and is zero (or a hole)
now becomes a zero extent, which the blob stores without bytes.

xxh3-64 is not collision resistant, but nothing here is adversarial: both sides of the comparison are
bytes this process wrote itself. A collision would drop a changed block, so the odds matter: with
2^64 values and 10^6 blocks per layer, about 1 in 10^13 per layer.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import xxhash

from dadi.format.model import BLOCK_SIZE

_READ_SLICE = 8 << 20
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_ZERO_HASH = xxhash.xxh3_64_intdigest(_ZERO_BLOCK)

# (first block, block count, zero) - the shape BlobWriter consumes.
Run = tuple[int, int, bool]


class BlockHashes:
    """xxh3-64 of every non-zero block of a disk, by block number."""

    __slots__ = ("by_block",)

    def __init__(self, by_block: dict[int, int]):
        self.by_block = by_block

    @classmethod
    def empty(cls) -> BlockHashes:
        """The hashes of a disk that is all zeros."""
        return cls({})

    def __len__(self) -> int:
        return len(self.by_block)


def data_regions(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the regions of a sparse file that hold data, block aligned."""
    regions = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        start -= start % BLOCK_SIZE
        end += -end % BLOCK_SIZE
        end = min(end, size - size % BLOCK_SIZE)
        if regions and regions[-1][0] + regions[-1][1] >= start:
            prev_start = regions[-1][0]
            regions[-1] = (prev_start, max(end, prev_start + regions[-1][1]) - prev_start)
        elif end > start:
            regions.append((start, end - start))
        offset = max(end, start + BLOCK_SIZE)
    return regions


def _hash_region(fd: int, offset: int, length: int, out: dict[int, int]) -> None:
    hash_block = xxhash.xxh3_64_intdigest
    done = 0
    while done < length:
        want = min(length - done, _READ_SLICE)
        data = os.pread(fd, want, offset + done)
        if len(data) != want:
            raise OSError(f"short read at offset {offset + done}: {len(data)} of {want} bytes")
        view = memoryview(data)
        block = (offset + done) // BLOCK_SIZE
        for pos in range(0, want, BLOCK_SIZE):
            digest = hash_block(view[pos:pos + BLOCK_SIZE])
            if digest == _ZERO_HASH and view[pos:pos + BLOCK_SIZE] == _ZERO_BLOCK:
                block += 1
                continue
            out[block] = digest
            block += 1
        done += want


def hash_disk(path: Path) -> BlockHashes:
    """Hash every non-zero block of the disk file at `path`."""
    by_block: dict[int, int] = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for offset, length in data_regions(f.fileno(), size):
            _hash_region(f.fileno(), offset, length, by_block)
    return BlockHashes(by_block)


def _runs(blocks: list[int], zero: bool) -> list[Run]:
    runs: list[Run] = []
    for block in blocks:
        if runs and runs[-1][0] + runs[-1][1] == block:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, zero)
        else:
            runs.append((block, 1, zero))
    return runs


def changed_extents(path: Path, before: BlockHashes) -> tuple[list[Run], BlockHashes]:
    """The runs of blocks that differ from `before` (sorted by block), and the disk's new hashes."""
    after = hash_disk(path)
    old, new = before.by_block, after.by_block
    changed = sorted(block for block, digest in new.items() if old.get(block) != digest)
    zeroed = sorted(block for block in old if block not in new)
    # The two sets are disjoint and each is already coalesced, so sorting their runs is enough.
    return sorted(_runs(changed, False) + _runs(zeroed, True)), after
