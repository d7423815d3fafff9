"""The layer blob format: writing a blob as a stream, and strict parsing of its header, footer and tables.

A layer blob is what the registry stores for one layer (spec: docs/FORMAT.md):

    header (HEADER_SIZE) | chunk data | tables (msgpack) | footer (FOOTER_SIZE)

The chunk data is the layer's changed blocks packed in disk order (the "packed stream"), cut into chunks of
`chunk_size` uncompressed bytes, each lz4-compressed on its own (or stored raw when lz4 does not shrink it).
The tables map disk blocks to packed-stream offsets (extents) and packed-stream offsets to stored chunks.

Parsing is strict because every byte of a blob may come from an untrusted machine: any input either parses
to tables whose invariants hold (so a reader can index them without further checks) or raises FormatError
saying what was wrong and where. Nothing here allocates more than the input's size or one chunk_size.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, BinaryIO

import lz4.block
import msgpack
import xxhash

from dadi.errors import FormatError
from dadi.format.model import BLOCK_SIZE, BlobInfo, BlockRange, Chunk, Extent, LayerTables

# Version 2 adds the read hints (metadata and file ranges) to the tables; a blob written without hints
# is version 1, byte for byte what it was before hints existed. The converter writes version 2.
FORMAT_VERSION = 2
HINTLESS_VERSION = 1
SUPPORTED_VERSIONS = (1, 2)
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.dadi"  # why: dadi/image/mediatypes.py

KiB = 1 << 10
MiB = 1 << 20
# Chosen by tools/bench/chunk_size.py; the figures and the reasoning are in docs/FORMAT.md.
DEFAULT_CHUNK_SIZE = 64 * KiB

HEADER_MAGIC = b"DADIBLK\x00"
FOOTER_MAGIC = b"DADIEND\x00"
TABLES_MAGIC = b"DADITBL\x00"

# Geometry limits. They keep every allocation a reader makes bounded (one chunk is at most MAX_CHUNK_SIZE)
# and keep offsets within u64.
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 64 * KiB
MAX_CHUNK_SIZE = 16 * MiB
MAX_DISK_SIZE = 1 << 60  # 1 EiB, ext4's limit with 4 KiB blocks
# A 64 GiB disk full of changed data in 16 KiB chunks needs ~250 MB of tables; more is corruption.
MAX_TABLES_SIZE = 1 << 30

# header: magic, version, flags, block_size, chunk_size, reserved u32, disk_size, 32 reserved bytes
_HEADER = struct.Struct("<8sHHIIIQ32s")
# footer: magic, version, flags, block_size, chunk_size, reserved u32, disk_size,
#         tables_offset, tables_size, tables sha256
_FOOTER = struct.Struct("<8sHHIIIQQQ32s")
HEADER_SIZE = _HEADER.size  # 64
FOOTER_SIZE = _FOOTER.size  # 80

_SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Header:
    """The blob's fixed-size header: format version and disk geometry."""

    version: int
    flags: int
    block_size: int
    chunk_size: int
    disk_size: int


@dataclass(frozen=True, slots=True)
class Footer:
    """The blob's fixed-size footer: the header's geometry again, and where the tables are."""

    version: int
    flags: int
    block_size: int
    chunk_size: int
    disk_size: int
    tables_offset: int
    tables_size: int
    tables_sha256: bytes

    @property
    def tables_digest(self) -> str:
        return "sha256:" + self.tables_sha256.hex()


def _check_geometry(where: str, block_size: int, chunk_size: int, disk_size: int) -> None:
    """Raise FormatError unless block, chunk and disk sizes are ones a reader can work with safely."""
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or block_size & (block_size - 1):
        raise FormatError(
            f"{where}: block_size {block_size} is not a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]"
        )
    if not (block_size <= chunk_size <= MAX_CHUNK_SIZE) or chunk_size & (chunk_size - 1):
        raise FormatError(
            f"{where}: chunk_size {chunk_size} is not a power of two in [block_size {block_size}, {MAX_CHUNK_SIZE}]"
        )
    if not (0 < disk_size <= MAX_DISK_SIZE) or disk_size % block_size:
        raise FormatError(
            f"{where}: disk_size {disk_size} is not a positive multiple of block_size {block_size} "
            f"up to {MAX_DISK_SIZE}"
        )


def _check_version(where: str, version: int) -> None:
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_VERSIONS))
        raise FormatError(f"{where}: unsupported format version {version} (supported: {supported})")


# --- header and footer -------------------------------------------------------------------------------


def pack_header(header: Header) -> bytes:
    return _HEADER.pack(
        HEADER_MAGIC, header.version, header.flags, header.block_size, header.chunk_size, 0,
        header.disk_size, bytes(32),
    )  # fmt: skip


def parse_header(data: bytes) -> Header:
    """Parse the HEADER_SIZE bytes at offset 0 of a blob."""
    if len(data) != HEADER_SIZE:
        raise FormatError(f"header: expected {HEADER_SIZE} bytes at blob offset 0, got {len(data)}")
    magic, version, flags, block_size, chunk_size, reserved, disk_size, reserved_tail = _HEADER.unpack(data)
    if magic != HEADER_MAGIC:
        raise FormatError(f"header: bad magic {magic!r} at blob offset 0 (expected {HEADER_MAGIC!r})")
    _check_version("header", version)
    if flags:
        raise FormatError(f"header: unknown flags {flags:#06x} at blob offset 10")
    if reserved or any(reserved_tail):
        raise FormatError("header: reserved bytes at blob offsets 20-23 and 32-63 are not zero")
    _check_geometry("header", block_size, chunk_size, disk_size)
    return Header(version, flags, block_size, chunk_size, disk_size)


def pack_footer(footer: Footer) -> bytes:
    return _FOOTER.pack(
        FOOTER_MAGIC, footer.version, footer.flags, footer.block_size, footer.chunk_size, 0,
        footer.disk_size, footer.tables_offset, footer.tables_size, footer.tables_sha256,
    )  # fmt: skip


def tables_offset(blob_size: int, tables_size: int) -> int:
    """Where the tables start in a blob of `blob_size` bytes: for readers holding the manifest annotations."""
    if not 0 < tables_size <= MAX_TABLES_SIZE:
        raise FormatError(f"tables size {tables_size} is not in [1, {MAX_TABLES_SIZE}]")
    offset = blob_size - FOOTER_SIZE - tables_size
    if offset < HEADER_SIZE:
        raise FormatError(
            f"tables of {tables_size} bytes do not fit in a blob of {blob_size} bytes "
            f"after the {HEADER_SIZE}-byte header and before the {FOOTER_SIZE}-byte footer"
        )
    return offset


def parse_footer(data: bytes, blob_size: int) -> Footer:
    """Parse the last FOOTER_SIZE bytes of a blob of `blob_size` bytes."""
    where = f"footer at blob offset {blob_size - FOOTER_SIZE}"
    if len(data) != FOOTER_SIZE:
        raise FormatError(f"{where}: expected {FOOTER_SIZE} bytes, got {len(data)}")
    if blob_size < HEADER_SIZE + FOOTER_SIZE:
        raise FormatError(f"blob of {blob_size} bytes is shorter than a header and a footer")
    (magic, version, flags, block_size, chunk_size, reserved, disk_size, t_offset, t_size, t_sha256) = (
        _FOOTER.unpack(data)
    )
    if magic != FOOTER_MAGIC:
        raise FormatError(f"{where}: bad magic {magic!r} (expected {FOOTER_MAGIC!r})")
    _check_version(where, version)
    if flags:
        raise FormatError(f"{where}: unknown flags {flags:#06x}")
    if reserved:
        raise FormatError(f"{where}: reserved bytes 20-23 are not zero")
    _check_geometry(where, block_size, chunk_size, disk_size)
    try:
        expected_offset = tables_offset(blob_size, t_size)
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    if t_offset != expected_offset:
        raise FormatError(
            f"{where}: tables offset {t_offset} + size {t_size} does not end at the footer "
            f"(expected offset {expected_offset})"
        )
    return Footer(version, flags, block_size, chunk_size, disk_size, t_offset, t_size, t_sha256)


# --- tables ------------------------------------------------------------------------------------------
# msgpack array: [magic, version, [block_size, chunk_size, disk_size, packed_size],
#                 [[block, count, offset, zero], ...], [[offset, length, raw_length, xxh3, sha256, compressed], ...]]
# and in version 2 two more items, the read hints: [[block, count], ...] of metadata, and
# [[[block, count], ...], ...] with one entry per regular file.
# Arrays only, ints and bytes only: msgpack then has exactly one encoding, so equal tables are equal bytes.


def encode_tables(tables: LayerTables) -> bytes:
    """The deterministic msgpack encoding of the tables section, in the version they were made in."""
    version = tables.version
    if version == HINTLESS_VERSION and (tables.metadata or tables.files):
        raise ValueError("format version 1 tables cannot carry read hints")
    obj = [
        TABLES_MAGIC,
        version,
        [tables.block_size, tables.chunk_size, tables.disk_size, tables.packed_size],
        [[e.block, e.count, e.offset, e.zero] for e in tables.extents],
        [[c.offset, c.length, c.raw_length, c.xxh3, c.sha256, c.compressed] for c in tables.chunks],
    ]
    if version >= 2 and tables.dropped_hints is not None:
        obj.extend(tables.dropped_hints)
    elif version >= 2:
        obj.append([list(r) for r in tables.metadata])
        obj.append([[list(r) for r in ranges] for ranges in tables.files])
    return msgpack.packb(obj, use_bin_type=True)


def _list(where: str, value: Any, length: int | None = None) -> list:
    if type(value) is not list:
        raise FormatError(f"{where}: expected an array, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise FormatError(f"{where}: expected an array of {length} items, got {len(value)}")
    return value


def _uint(where: str, value: Any, limit: int = (1 << 64) - 1) -> int:
    # type() rather than isinstance(): msgpack booleans are Python bools, which are ints.
    if type(value) is not int:
        raise FormatError(f"{where}: expected an unsigned integer, got {type(value).__name__}")
    if not 0 <= value <= limit:
        raise FormatError(f"{where}: {value} is outside [0, {limit}]")
    return value


def _bool(where: str, value: Any) -> bool:
    if type(value) is not bool:
        raise FormatError(f"{where}: expected a boolean, got {type(value).__name__}")
    return value


def _check_digest(where: str, data: bytes, expected_digest: str) -> None:
    if not _SHA256_DIGEST.fullmatch(expected_digest):
        raise FormatError(f"{where}: expected digest {expected_digest!r} is not 'sha256:' and 64 hex digits")
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != expected_digest:
        raise FormatError(f"{where}: digest mismatch: got {actual}, expected {expected_digest}")


def parse_tables(
    data: bytes, *, blob_size: int | None = None, expected_digest: str | None = None
) -> LayerTables:
    """Parse and check the tables section; with `blob_size`, also check the chunks end where the tables start."""
    if blob_size is not None:
        where = f"tables at blob offset {blob_size - FOOTER_SIZE - len(data)}"
    else:
        where = "tables"
    if expected_digest is not None:
        _check_digest(where, data, expected_digest)
    if not data:
        raise FormatError(f"{where}: short input (0 bytes)")
    if len(data) > MAX_TABLES_SIZE:
        raise FormatError(f"{where}: {len(data)} bytes is more than the limit of {MAX_TABLES_SIZE}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except msgpack.ExtraData as e:
        raise FormatError(f"{where}: {len(data) - len(e.extra)} bytes of tables followed by "
                          f"{len(e.extra)} trailing bytes") from None  # fmt: skip
    except (ValueError, msgpack.UnpackException) as e:
        # ValueError covers truncation ("incomplete input"), bad type bytes, nesting too deep, bad ext data.
        raise FormatError(
            f"{where}: not valid msgpack ({e or type(e).__name__}), {len(data)} bytes"
        ) from None
    top = _list(where, obj)
    if len(top) < 2:
        raise FormatError(f"{where}: short input: expected [magic, version, ...], got {len(top)} items")
    magic, version = top[0], top[1]
    if type(magic) is not bytes or magic != TABLES_MAGIC:
        raise FormatError(f"{where}: bad magic {magic!r} (expected {TABLES_MAGIC!r})")
    _check_version(where, _uint(f"{where}: version", version))
    _list(where, top, 5 if version == HINTLESS_VERSION else 7)
    tables = _check_tables(where, top[2], top[3], top[4], blob_size, len(data))
    if version == HINTLESS_VERSION:
        return tables
    return _with_hints(where, dataclasses.replace(tables, version=version), top[5], top[6])


def _with_hints(where: str, tables: LayerTables, metadata_obj: Any, files_obj: Any) -> LayerTables:
    """The tables with their hints; malformed hints are dropped (and said why), never fatal: the blocks
    are all there without them, and a reader needs them only to fetch more at once."""
    disk_blocks = tables.disk_size // tables.block_size
    try:
        metadata = _check_ranges(f"{where}: metadata hints", metadata_obj, disk_blocks)
        files = tuple(
            _check_ranges(f"{where}: file hint {i}", ranges, disk_blocks, allow_empty=False)
            for i, ranges in enumerate(_list(f"{where}: file hints", files_obj))
        )
    except FormatError as e:
        return dataclasses.replace(tables, hints_problem=str(e), dropped_hints=(metadata_obj, files_obj))
    return dataclasses.replace(tables, metadata=metadata, files=files)


def _check_ranges(where: str, obj: Any, disk_blocks: int, *, allow_empty: bool = True) -> tuple[BlockRange, ...]:
    ranges = []
    end = 0
    for i, row_obj in enumerate(_list(where, obj)):
        row = _list(f"{where}: range {i}", row_obj, 2)
        block = _uint(f"{where}: range {i}: block", row[0])
        count = _uint(f"{where}: range {i}: count", row[1])
        if count == 0 or block < end or block + count > disk_blocks:
            raise FormatError(f"{where}: range {i} (block {block}, {count} blocks) is empty, out of order, "
                              f"overlaps the one before or extends past the disk's {disk_blocks} blocks")
        ranges.append((block, count))
        end = block + count
    if not ranges and not allow_empty:
        raise FormatError(f"{where}: no ranges")
    return tuple(ranges)


def _check_tables(
    where: str, geometry_obj: Any, extents_obj: Any, chunks_obj: Any, blob_size: int | None, tables_size: int
) -> LayerTables:
    geometry = _list(f"{where}: geometry", geometry_obj, 4)
    block_size, chunk_size, disk_size, packed_size = (
        _uint(f"{where}: geometry[{i}]", v) for i, v in enumerate(geometry)
    )
    _check_geometry(f"{where}: geometry", block_size, chunk_size, disk_size)
    if packed_size > disk_size or packed_size % block_size:
        raise FormatError(
            f"{where}: packed_size {packed_size} is not a multiple of block_size {block_size} "
            f"up to disk_size {disk_size}"
        )
    extents = _check_extents(
        where, _list(f"{where}: extent table", extents_obj), block_size, disk_size, packed_size
    )
    chunks = _check_chunks(
        where, _list(f"{where}: chunk table", chunks_obj), chunk_size, packed_size, blob_size, tables_size
    )
    return LayerTables(block_size, chunk_size, disk_size, packed_size, extents, chunks)


def _check_extents(
    where: str, rows: list, block_size: int, disk_size: int, packed_size: int
) -> tuple[Extent, ...]:
    """Extents sorted, non-overlapping, on the disk, and data extents tiling the packed stream in order."""
    disk_blocks = disk_size // block_size
    extents = []
    end_block = 0  # first block after the previous extent
    packed = 0  # where the next data extent must start in the packed stream
    for i, row_obj in enumerate(rows):
        here = f"{where}: extent {i}"
        row = _list(here, row_obj, 4)
        block = _uint(f"{here}: block", row[0])
        count = _uint(f"{here}: count", row[1])
        offset = _uint(f"{here}: offset", row[2])
        zero = _bool(f"{here}: zero flag", row[3])
        if count == 0:
            raise FormatError(f"{here}: empty (count 0) at block {block}")
        if block < end_block:
            what = "overlaps" if block >= extents[-1].block else "is not sorted after"
            raise FormatError(f"{here}: {what} extent {i - 1} (block {block})")
        if block + count > disk_blocks:
            raise FormatError(
                f"{here}: blocks {block}-{block + count - 1} extend past the disk's {disk_blocks} blocks"
            )
        if zero:
            if offset != 0:
                raise FormatError(
                    f"{here}: zero extent at block {block} has packed offset {offset}, expected 0"
                )
        else:
            if offset != packed:
                raise FormatError(
                    f"{here}: packed offset {offset} at block {block} does not continue the packed stream "
                    f"(expected {packed})"
                )
            packed += count * block_size
            if packed > packed_size:
                raise FormatError(f"{here}: data runs past packed_size {packed_size} (to {packed})")
        extents.append(Extent(block, count, offset, zero))
        end_block = block + count
    if packed != packed_size:
        raise FormatError(
            f"{where}: data extents cover {packed} bytes of the packed stream, packed_size is {packed_size}"
        )
    return tuple(extents)


def _check_chunks(
    where: str, rows: list, chunk_size: int, packed_size: int, blob_size: int | None, tables_size: int
) -> tuple[Chunk, ...]:
    """Chunks contiguous from the header to the tables, raw lengths as chunk_size cuts the packed stream."""
    expected_count = -(-packed_size // chunk_size)
    if len(rows) != expected_count:
        raise FormatError(
            f"{where}: {len(rows)} chunks, but packed_size {packed_size} in chunks of {chunk_size} needs {expected_count}"
        )
    data_end = None if blob_size is None else blob_size - FOOTER_SIZE - tables_size
    chunks = []
    position = HEADER_SIZE
    for i, row_obj in enumerate(rows):
        here = f"{where}: chunk {i}"
        row = _list(here, row_obj, 6)
        offset = _uint(f"{here}: offset", row[0])
        length = _uint(f"{here}: length", row[1])
        raw_length = _uint(f"{here}: raw_length", row[2])
        xxh3 = _uint(f"{here}: xxh3", row[3])
        sha256 = row[4]
        compressed = _bool(f"{here}: compressed flag", row[5])
        if type(sha256) is not bytes or len(sha256) != 32:
            raise FormatError(f"{here}: sha256 is not 32 bytes ({type(sha256).__name__})")
        if offset != position:
            raise FormatError(
                f"{here}: at blob offset {offset}, not contiguous with the previous chunk (expected {position})"
            )
        expected_raw = min(chunk_size, packed_size - i * chunk_size)
        if raw_length != expected_raw:
            raise FormatError(
                f"{here} at blob offset {offset}: raw_length {raw_length}, expected {expected_raw} "
                f"(chunk_size {chunk_size}, packed_size {packed_size})"
            )
        # A compressed chunk is shorter than its raw bytes (else the writer stores it raw), which is well
        # inside lz4's bound; so no stored length can make a reader allocate more than chunk_size.
        if compressed and not 0 < length < raw_length:
            raise FormatError(
                f"{here} at blob offset {offset}: compressed length {length} is not in [1, raw_length {raw_length})"
            )
        if not compressed and length != raw_length:
            raise FormatError(
                f"{here} at blob offset {offset}: stored raw but length {length} != raw_length {raw_length}"
            )
        position = offset + length
        if data_end is not None and position > data_end:
            raise FormatError(
                f"{here} at blob offset {offset}: ends at {position}, past the chunk data's end {data_end}"
            )
        chunks.append(Chunk(offset, length, raw_length, xxh3, sha256, compressed))
    if data_end is not None and position != data_end:
        raise FormatError(
            f"{where}: chunk data ends at blob offset {position}, but the tables start at {data_end}"
        )
    return tuple(chunks)


# --- local blobs and chunks --------------------------------------------------------------------------


def _read_exact(f: BinaryIO, offset: int, size: int, what: str) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise FormatError(f"{what}: short read at blob offset {offset}: got {len(data)} of {size} bytes")
    return data


def read_blob_tables(f: BinaryIO, blob_size: int | None = None) -> LayerTables:
    """Read and cross-check header, footer and tables of a local, seekable blob file."""
    if blob_size is None:
        blob_size = f.seek(0, 2)
    if blob_size < HEADER_SIZE + FOOTER_SIZE:
        raise FormatError(f"blob of {blob_size} bytes is shorter than a header and a footer")
    header = parse_header(_read_exact(f, 0, HEADER_SIZE, "header"))
    footer = parse_footer(_read_exact(f, blob_size - FOOTER_SIZE, FOOTER_SIZE, "footer"), blob_size)
    header_geometry = (header.version, header.block_size, header.chunk_size, header.disk_size)
    footer_geometry = (footer.version, footer.block_size, footer.chunk_size, footer.disk_size)
    if header_geometry != footer_geometry:
        raise FormatError(
            f"footer (version, block_size, chunk_size, disk_size) {footer_geometry} "
            f"differs from the header's {header_geometry}"
        )
    data = _read_exact(f, footer.tables_offset, footer.tables_size, "tables")
    tables = parse_tables(data, blob_size=blob_size, expected_digest=footer.tables_digest)
    if tables.version != header.version:
        raise FormatError(f"tables of format version {tables.version} in a version {header.version} blob")
    tables_geometry = (tables.block_size, tables.chunk_size, tables.disk_size)
    if tables_geometry != header_geometry[1:]:
        raise FormatError(
            f"tables (block_size, chunk_size, disk_size) {tables_geometry} differ from the header's "
            f"{header_geometry[1:]}"
        )
    return tables


_VERIFIERS: dict[str, Callable[[bytes, Chunk], bool]] = {
    "sha256": lambda stored, chunk: hashlib.sha256(stored).digest() == chunk.sha256,
    "xxh3": lambda stored, chunk: xxhash.xxh3_64_intdigest(stored) == chunk.xxh3,
    "none": lambda stored, chunk: True,
}


def decode_chunk(stored: bytes | memoryview, chunk: Chunk, *, verify: str = "sha256") -> bytes:
    """Check the stored bytes of `chunk` (verify: "sha256", "xxh3" or "none") and return its raw bytes."""
    try:
        verifier = _VERIFIERS[verify]
    except KeyError:
        raise ValueError(f"verify must be one of {sorted(_VERIFIERS)}, not {verify!r}") from None
    where = f"chunk at blob offset {chunk.offset}"
    if len(stored) != chunk.length:
        raise FormatError(f"{where}: got {len(stored)} stored bytes, expected {chunk.length}")
    if not verifier(stored, chunk):
        raise FormatError(f"{where}: {verify} mismatch, the stored bytes are corrupt")
    if not chunk.compressed:
        return bytes(stored)
    try:
        raw = lz4.block.decompress(stored, uncompressed_size=chunk.raw_length)
    except lz4.block.LZ4BlockError as e:
        raise FormatError(f"{where}: lz4 cannot decompress it ({e})") from None
    if len(raw) != chunk.raw_length:
        raise FormatError(f"{where}: decompressed to {len(raw)} bytes, expected {chunk.raw_length}")
    return raw


def read_packed(
    f: BinaryIO, tables: LayerTables, packed_offset: int, length: int, *, verify: str = "sha256"
) -> bytes:
    """Bytes [packed_offset, packed_offset + length) of the packed stream of a local blob file."""
    if packed_offset < 0 or length < 0 or packed_offset + length > tables.packed_size:
        raise ValueError(
            f"packed range [{packed_offset}, {packed_offset + length}) is outside the packed stream "
            f"of {tables.packed_size} bytes"
        )
    if length == 0:
        return b""
    first = tables.chunk_of(packed_offset)
    last = tables.chunk_of(packed_offset + length - 1)
    parts = []
    for chunk in tables.chunks[first : last + 1]:
        stored = _read_exact(f, chunk.offset, chunk.length, f"chunk at blob offset {chunk.offset}")
        parts.append(decode_chunk(stored, chunk, verify=verify))
    start = packed_offset - first * tables.chunk_size
    return b"".join(parts)[start : start + length]


# --- writing -----------------------------------------------------------------------------------------


# Chunks handed to the executor and not yet written: enough to keep a few threads busy, little memory.
_MAX_CHUNKS_IN_FLIGHT = 8


def _pack_chunk(raw: bytes | memoryview) -> tuple[bytes | memoryview, int, bool, int, bytes]:
    """(stored bytes, raw length, compressed?, xxh3-64, sha256) of one chunk; safe to run in a thread."""
    packed = lz4.block.compress(raw, store_size=False)
    compressed = len(packed) < len(raw)
    stored = packed if compressed else raw
    return stored, len(raw), compressed, xxhash.xxh3_64_intdigest(stored), hashlib.sha256(stored).digest()


class BlobWriter:
    """Writes one layer blob to `out` as a stream: header, then chunks as the data arrives, then tables, footer.

    Only `out.write` is used (no seek, no tell), so `out` may be a pipe or a hashing sink. At most one
    chunk of data is buffered; the blob's sha256 is computed while writing.
    """

    def __init__(
        self,
        out: BinaryIO,
        *,
        disk_size: int,
        block_size: int = BLOCK_SIZE,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        executor: Executor | None = None,
        hints: bool = False,
    ):
        """`executor` (a thread pool) compresses and hashes chunks in parallel; the output is the same.
        `hints`: write format version 2, whose tables carry the read hints given to `finish`."""
        try:
            _check_geometry("BlobWriter", block_size, chunk_size, disk_size)
        except FormatError as e:
            raise ValueError(str(e)) from None
        self._out = out
        self._block_size = block_size
        self._chunk_size = chunk_size
        self._disk_size = disk_size
        self._disk_blocks = disk_size // block_size
        self._sha256 = hashlib.sha256()
        self._size = 0  # bytes written to out
        self._pending = bytearray()  # packed-stream bytes not yet cut into a chunk (< chunk_size)
        self._packed_size = 0
        self._extents: list[Extent] = []
        self._chunks: list[Chunk] = []
        self._finished = False
        self._executor = executor
        self._version = FORMAT_VERSION if hints else HINTLESS_VERSION
        # Chunks being packed by the executor, oldest first; written in this order.
        self._in_flight: collections.deque[Future] = collections.deque()
        header = Header(self._version, 0, block_size, chunk_size, disk_size)
        self._write(pack_header(header))

    def _write(self, data: bytes | memoryview) -> None:
        self._sha256.update(data)
        self._size += len(data)
        view = memoryview(data)
        while view:
            written = self._out.write(view)
            # Raw files and pipes may write less than asked; buffered ones and sinks return all or None.
            if written is None or written >= len(view):
                break
            view = view[written:]

    def _check_next(self, block: int, count: int) -> None:
        if self._finished:
            raise ValueError("BlobWriter: already finished")
        if block < 0 or count <= 0:
            raise ValueError(f"BlobWriter: bad extent at block {block} with {count} blocks")
        end_block = self._extents[-1].block + self._extents[-1].count if self._extents else 0
        if block < end_block:
            raise ValueError(
                f"BlobWriter: block {block} is not after the previous extent, which ends at block {end_block}"
            )
        if block + count > self._disk_blocks:
            raise ValueError(
                f"BlobWriter: blocks {block}-{block + count - 1} extend past the disk's {self._disk_blocks} blocks"
            )

    def add_data(self, block: int, data: bytes | memoryview) -> None:
        """Add changed blocks starting at disk block `block`; len(data) is a positive multiple of block_size."""
        view = memoryview(data).cast("B")  # lengths in bytes, also for views of wider items
        if len(view) % self._block_size:
            raise ValueError(
                f"BlobWriter: data of {len(view)} bytes is not a multiple of block_size {self._block_size}"
            )
        count = len(view) // self._block_size
        self._check_next(block, count)
        last = self._extents[-1] if self._extents else None
        if last is not None and not last.zero and last.block + last.count == block:
            self._extents[-1] = Extent(last.block, last.count + count, last.offset)
        else:
            self._extents.append(Extent(block, count, self._packed_size))
        self._packed_size += len(view)
        self._feed(view)

    def add_zero(self, block: int, count: int) -> None:
        """Add `count` all-zero blocks starting at disk block `block`: they take no space in the chunk data."""
        self._check_next(block, count)
        last = self._extents[-1] if self._extents else None
        if last is not None and last.zero and last.block + last.count == block:
            self._extents[-1] = Extent(last.block, last.count + count, 0, True)
        else:
            self._extents.append(Extent(block, count, 0, True))

    def _feed(self, view: memoryview) -> None:
        """Cut packed-stream bytes into chunks without copying whole chunks more than once."""
        size = self._chunk_size
        if self._pending:
            take = size - len(self._pending)
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < size:
                return
            self._emit_chunk(bytes(self._pending))
            self._pending.clear()
        while len(view) >= size:
            self._emit_chunk(view[:size])
            view = view[size:]
        self._pending += view

    def _emit_chunk(self, raw: bytes | memoryview) -> None:
        if self._executor is None:
            self._write_chunk(*_pack_chunk(raw))
            return
        # A copy: the caller may reuse its buffer once add_data returns.
        self._in_flight.append(self._executor.submit(_pack_chunk, bytes(raw)))
        while len(self._in_flight) > _MAX_CHUNKS_IN_FLIGHT:
            self._write_chunk(*self._in_flight.popleft().result())

    def _drain(self) -> None:
        while self._in_flight:
            self._write_chunk(*self._in_flight.popleft().result())

    def _write_chunk(self, stored: bytes | memoryview, raw_length: int, compressed: bool, xxh3: int,
                     sha256: bytes) -> None:
        self._chunks.append(Chunk(self._size, len(stored), raw_length, xxh3, sha256, compressed))
        self._write(stored)

    def finish(self, metadata: Sequence[BlockRange] = (), files: Sequence[Sequence[BlockRange]] = ()) -> BlobInfo:
        """Write the last chunk, the tables and the footer; `out` is left open. `metadata` and `files`
        are the read hints (dadi.convert.ext4map), only for a writer made with hints=True."""
        if self._finished:
            raise ValueError("BlobWriter: already finished")
        if (metadata or files) and self._version == HINTLESS_VERSION:
            raise ValueError("BlobWriter: read hints need a writer made with hints=True")
        self._finished = True
        if self._pending:
            self._emit_chunk(bytes(self._pending))
            self._pending.clear()
        self._drain()
        tables = LayerTables(
            block_size=self._block_size,
            chunk_size=self._chunk_size,
            disk_size=self._disk_size,
            packed_size=self._packed_size,
            extents=tuple(self._extents),
            chunks=tuple(self._chunks),
            metadata=tuple(tuple(r) for r in metadata),
            files=tuple(tuple(tuple(r) for r in ranges) for ranges in files),
            version=self._version,
        )
        disk_blocks = self._disk_size // self._block_size
        try:  # what a reader would drop as malformed is a bug of the caller's
            _check_ranges("BlobWriter: metadata hints", [list(r) for r in tables.metadata], disk_blocks)
            for i, ranges in enumerate(tables.files):
                _check_ranges(f"BlobWriter: file hint {i}", [list(r) for r in ranges], disk_blocks, allow_empty=False)
        except FormatError as e:
            raise ValueError(str(e)) from None
        encoded = encode_tables(tables)
        tables_sha256 = hashlib.sha256(encoded).digest()
        footer = Footer(
            self._version, 0, self._block_size, self._chunk_size, self._disk_size,
            tables_offset=self._size, tables_size=len(encoded), tables_sha256=tables_sha256,
        )  # fmt: skip
        self._write(encoded)
        self._write(pack_footer(footer))
        return BlobInfo(
            digest="sha256:" + self._sha256.hexdigest(),
            size=self._size,
            tables_digest="sha256:" + tables_sha256.hex(),
            tables_size=len(encoded),
            tables=tables,
        )
