"""The in-memory model of a layer blob's tables, shared by the writer, the parser and the merged index.

Units: disk positions are in blocks of `block_size` bytes; packed-stream and blob positions in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BLOCK_SIZE = 4096
GiB = 1 << 30
DEFAULT_DISK_SIZE = 64 * GiB


BlockRange = tuple[int, int]  # (first disk block, block count)


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of changed disk blocks, in the layer's packed stream unless it is all zeros."""

    block: int  # first disk block
    count: int  # number of blocks
    offset: int  # byte offset of the first block in the packed stream; 0 for zero extents
    zero: bool = False  # all-zero blocks: carry no data, read as zeros


@dataclass(frozen=True, slots=True)
class Chunk:
    """One independently stored piece of the packed stream (the offset/length table's row)."""

    offset: int  # byte offset of the stored bytes in the blob
    length: int  # stored length in the blob
    raw_length: int  # uncompressed length: chunk_size, except for the last chunk
    xxh3: int  # xxh3-64 of the stored bytes: a cheap re-check of a local cache
    sha256: bytes  # sha256 of the stored bytes (32 bytes): trust for bytes from other machines
    compressed: bool  # lz4 block format; False when lz4 did not shrink the chunk and it is stored raw


@dataclass(frozen=True, slots=True)
class LayerTables:
    """Everything a reader needs to find any byte of the layer: geometry, extents, chunks."""

    block_size: int
    chunk_size: int  # uncompressed bytes per chunk (the last may be shorter)
    disk_size: int  # virtual disk size in bytes
    packed_size: int  # bytes of non-zero block data in the packed stream
    extents: tuple[Extent, ...]  # sorted by block, non-overlapping
    chunks: tuple[Chunk, ...]  # in packed-stream order
    # Read hints (format version 2, docs/FORMAT.md "Hints"): where the layer's file system metadata and
    # each regular file's data lie, as (first block, count) ranges of blocks this layer stores. They only
    # steer what a node fetches together; bytes are still found through the extents and checked by hash.
    metadata: tuple[BlockRange, ...] = ()  # sorted, non-overlapping
    files: tuple[tuple[BlockRange, ...], ...] = ()  # one entry per file: its ranges, sorted, non-overlapping
    version: int = 1  # the format version these tables were written in (1: no hints)
    hints_problem: str = ""  # why the blob's hints were malformed and dropped ("": they were fine or absent)
    # Malformed hints as they were decoded, so that the tables still encode to the blob's own bytes.
    dropped_hints: Any = field(default=None, compare=False)

    def chunk_of(self, packed_offset: int) -> int:
        """Index of the chunk that holds this packed-stream byte."""
        return packed_offset // self.chunk_size


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What writing a blob produced: what the manifest and the registry need to know of it."""

    digest: str  # "sha256:<hex>" of the whole blob
    size: int
    tables_digest: str  # "sha256:<hex>" of the tables section
    tables_size: int
    tables: LayerTables
