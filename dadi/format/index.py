"""The merged extent index of a layer stack: which layer serves each byte of the virtual disk.

A stack reads top-down: for every disk block the topmost layer whose extent table covers it serves it,
from that layer's packed stream (or as zeros for a zero extent); blocks no layer covers read as zeros.
`MergedIndex` flattens the stack once into sorted, non-overlapping segments kept in four flat arrays
(start block, end block, layer, packed byte offset of the start block). Every lookup is then a binary
search over `starts`.

The searches have two twins with identical signatures and results: the C module `dadi._native` and
`_PythonKernel` below, the reference (bisect over the same arrays). `backend` names the one in use;
DADI_NATIVE=0 forces the Python twin, DADI_NATIVE=1 makes a missing native module an ImportError.
"""

from __future__ import annotations

import importlib
import os
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

from dadi.errors import FormatError
from dadi.format.model import BLOCK_SIZE, Extent

ZERO = -1  # the "layer" of bytes that read as zeros: holes and zero extents

# Extents must end below this so that block and byte arithmetic stays inside int64 in both twins.
_MAX_POSITION = 1 << 63
_NO_BLOCK_LIMIT = (1 << 64) - 1

# Segment tuples while building: (start block, end block, layer, packed byte offset of start block).
_Segment = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class Piece:
    """A run of bytes of the disk served by one source: a layer's packed stream, or zeros."""

    disk_offset: int
    length: int
    layer: int  # ZERO: the bytes read as zeros (packed_offset is 0 then)
    packed_offset: int  # byte offset of the piece's first byte in the layer's packed stream


class BlockLocations(NamedTuple):
    """Where each looked-up block lives: its layer (or ZERO) and its byte offset in that layer's packed
    stream (0 for ZERO)."""

    layers: array  # array('q')
    packed_offsets: array  # array('q')


def _native_buffer_format_ok(view: memoryview, signed: bool) -> bool:
    """True when `view` holds native 8-byte integers of the wanted signedness (the formats C accepts)."""
    wanted = ("q", "l") if signed else ("Q", "L")
    fmt = view.format
    if fmt[:1] in ("@", "=", "<"):
        fmt = fmt[1:]
    return view.ndim == 1 and view.itemsize == 8 and fmt in wanted and view.c_contiguous


class _PythonKernel:
    """The reference twin of dadi._native: the same entry points, argument checks and results."""

    @staticmethod
    def _array(obj: object, name: str, *, signed: bool, writable: bool = False) -> memoryview:
        try:
            view = memoryview(obj)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{name} must be a buffer of 8-byte integers, got {type(obj).__name__}") from None
        if not _native_buffer_format_ok(view, signed):
            kind = "int64 (array('q'))" if signed else "uint64 (array('Q'))"
            raise TypeError(f"{name} must be a contiguous 1-d buffer of {kind}, got format {view.format!r}")
        if writable and view.readonly:
            raise TypeError(f"{name} must be a writable buffer")
        return view

    @staticmethod
    def _table(starts, ends, layers, offsets) -> tuple[memoryview, ...]:
        table = (
            _PythonKernel._array(starts, "starts", signed=False),
            _PythonKernel._array(ends, "ends", signed=False),
            _PythonKernel._array(layers, "layers", signed=True),
            _PythonKernel._array(offsets, "offsets", signed=True),
        )
        if len({len(column) for column in table}) != 1:
            raise ValueError("starts, ends, layers and offsets must have the same length, got "
                             + ", ".join(str(len(column)) for column in table))
        return table

    @staticmethod
    def find_segments(starts, ends, first_block: int, end_block: int) -> tuple[int, int]:
        """Index range [i, j) of the segments that overlap blocks [first_block, end_block)."""
        starts_view = _PythonKernel._array(starts, "starts", signed=False)
        ends_view = _PythonKernel._array(ends, "ends", signed=False)
        if len(starts_view) != len(ends_view):
            raise ValueError(f"starts and ends must have the same length, got {len(starts_view)}, "
                             f"{len(ends_view)}")
        for name, value in (("first_block", first_block), ("end_block", end_block)):
            if not 0 <= value <= _NO_BLOCK_LIMIT:
                raise OverflowError(f"{name} must be in 0..2**64-1, got {value}")
        first = bisect_right(ends_view, first_block)
        stop = bisect_left(starts_view, end_block)
        return first, max(first, stop)

    @staticmethod
    def lookup_blocks(starts, ends, layers, offsets, block_size: int, limit: int,
                      blocks, out_layers, out_offsets) -> None:
        """For each blocks[i] write its layer and packed byte offset to out_layers[i], out_offsets[i]."""
        starts, ends, layers, offsets = _PythonKernel._table(starts, ends, layers, offsets)
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if not 0 <= limit <= _NO_BLOCK_LIMIT:
            raise OverflowError(f"limit must be in 0..2**64-1, got {limit}")
        blocks = _PythonKernel._array(blocks, "blocks", signed=False)
        out_layers = _PythonKernel._array(out_layers, "out_layers", signed=True, writable=True)
        out_offsets = _PythonKernel._array(out_offsets, "out_offsets", signed=True, writable=True)
        if not len(blocks) == len(out_layers) == len(out_offsets):
            raise ValueError(f"blocks, out_layers and out_offsets must have the same length, got "
                             f"{len(blocks)}, {len(out_layers)}, {len(out_offsets)}")
        for i, block in enumerate(blocks):
            if block >= limit:
                raise ValueError(f"block {block} (at position {i}) is past the end of the disk "
                                 f"({limit} blocks)")
            k = bisect_right(starts, block) - 1
            if k >= 0 and block < ends[k] and layers[k] != ZERO:
                out_layers[i] = layers[k]
                out_offsets[i] = offsets[k] + (block - starts[k]) * block_size
            else:
                out_layers[i] = ZERO
                out_offsets[i] = 0


def _load_native() -> ModuleType | None:
    """dadi._native unless DADI_NATIVE=0; None when it is missing (an ImportError if DADI_NATIVE=1)."""
    choice = os.environ.get("DADI_NATIVE", "")
    if choice == "0":
        return None
    try:
        native = importlib.import_module("dadi._native")
    except ImportError:
        if choice == "1":
            raise
        return None
    if not hasattr(native, "lookup_blocks"):  # a stale build from before the index existed
        if choice == "1":
            raise ImportError("dadi._native is an old build without lookup_blocks; run `make native`")
        return None
    return native


_native = _load_native()
_kernel = _native if _native is not None else _PythonKernel
backend: str = "native" if _native is not None else "python"


def _clip(segment: _Segment, start: int, end: int, block_size: int) -> _Segment:
    """The part [start, end) of a segment; the packed offset moves with the start."""
    old_start, _, layer, offset = segment
    if layer == ZERO:
        return (start, end, ZERO, 0)
    return (start, end, layer, offset + (start - old_start) * block_size)


def _layer_segments(layer: int, extents: Sequence[Extent], block_size: int,
                    disk_blocks: int | None) -> list[_Segment]:
    """One layer's extent table as segments, after checking it is sorted, non-overlapping and in range."""
    segments: list[_Segment] = []
    previous_end = 0
    for number, extent in enumerate(extents):
        where = f"layer {layer}, extent {number} (block {extent.block}, count {extent.count})"
        if extent.block < 0 or extent.count <= 0:
            raise FormatError(f"{where}: block must be >= 0 and count > 0")
        if extent.block < previous_end:
            raise FormatError(f"{where}: overlaps or precedes the previous extent, which ends at block "
                              f"{previous_end}; extents must be sorted and non-overlapping")
        end = extent.block + extent.count
        if disk_blocks is not None and end > disk_blocks:
            raise FormatError(f"{where}: ends past the disk ({disk_blocks} blocks)")
        if end * block_size >= _MAX_POSITION:
            raise FormatError(f"{where}: ends past the largest supported disk (2**63 bytes)")
        if extent.zero:
            segments.append((extent.block, end, ZERO, 0))
        else:
            if extent.offset < 0 or extent.offset + extent.count * block_size >= _MAX_POSITION:
                raise FormatError(f"{where}: packed offset {extent.offset} out of range")
            segments.append((extent.block, end, layer, extent.offset))
        previous_end = end
    return segments


def _overlay(lower: list[_Segment], upper: list[_Segment], block_size: int) -> list[_Segment]:
    """`upper` laid over `lower`: upper segments win, lower ones survive only where upper has none."""
    merged: list[_Segment] = []
    rest = iter(lower)
    current = next(rest, None)
    for segment in upper:
        start, end = segment[0], segment[1]
        while current is not None and current[1] <= start:
            merged.append(current)
            current = next(rest, None)
        if current is not None and current[0] < start:
            merged.append(_clip(current, current[0], start, block_size))
        merged.append(segment)
        while current is not None and current[1] <= end:
            current = next(rest, None)
        if current is not None and current[0] < end:
            current = _clip(current, end, current[1], block_size)
    if current is not None:
        merged.append(current)
        merged.extend(rest)
    return merged


def _coalesce(segments: list[_Segment], block_size: int) -> list[_Segment]:
    """Adjacent segments that continue each other (same layer and packed stream, or both zeros) as one."""
    coalesced: list[_Segment] = []
    for segment in segments:
        if coalesced:
            start, end, layer, offset = coalesced[-1]
            if end == segment[0] and layer == segment[2] and (
                layer == ZERO or offset + (end - start) * block_size == segment[3]
            ):
                coalesced[-1] = (start, segment[1], layer, offset)
                continue
        coalesced.append(segment)
    return coalesced


def _as_block_buffer(blocks: object) -> memoryview:
    """Block numbers as a 'Q' memoryview; plain iterables of ints are copied into an array('Q')."""
    try:
        view = memoryview(blocks)  # type: ignore[arg-type]
    except TypeError:
        try:
            return memoryview(array("Q", blocks))  # type: ignore[arg-type]
        except OverflowError:
            raise ValueError("block numbers must be in 0..2**64-1") from None
    if not _native_buffer_format_ok(view, signed=False):
        raise TypeError(f"blocks must be a contiguous 1-d buffer of uint64 (array('Q')), "
                        f"got format {view.format!r} with itemsize {view.itemsize}")
    return view


class MergedIndex:
    """The merged, read-only extent index of a layer stack (index 0 = bottom layer)."""

    def __init__(self, layers: Sequence[Sequence[Extent]], *, block_size: int = BLOCK_SIZE,
                 disk_size: int | None = None):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if disk_size is not None and (disk_size < 0 or disk_size % block_size):
            raise ValueError(f"disk_size must be a non-negative multiple of block_size {block_size}, "
                             f"got {disk_size}")
        self.block_size = block_size
        self.disk_size = disk_size
        self._layer_count = len(layers)
        disk_blocks = None if disk_size is None else disk_size // block_size
        merged: list[_Segment] = []
        for layer, extents in enumerate(layers):
            merged = _overlay(merged, _layer_segments(layer, extents, block_size, disk_blocks), block_size)
        merged = _coalesce(merged, block_size)
        self._block_limit = _NO_BLOCK_LIMIT if disk_blocks is None else disk_blocks
        self._starts = array("Q", [segment[0] for segment in merged])
        self._ends = array("Q", [segment[1] for segment in merged])
        self._layers = array("q", [segment[2] for segment in merged])
        self._offsets = array("q", [segment[3] for segment in merged])

    @property
    def segments(self) -> int:
        """Number of merged segments (zero-extent segments included, holes not)."""
        return len(self._starts)

    @property
    def layers(self) -> int:
        """Number of layers in the stack."""
        return self._layer_count

    def segment_arrays(self) -> tuple[array, array, array, array]:
        """The flat arrays behind the index, for native readers: start blocks and end blocks (array('Q'),
        [start, end)), layers (array('q'), ZERO for zeros) and the packed byte offset of each start block
        (array('q')), one entry per merged segment in disk order."""
        return self._starts, self._ends, self._layers, self._offsets

    def iter_segments(self) -> Iterator[tuple[int, int, int, int]]:
        """(disk_offset, length, layer, packed_offset) in bytes for every mapped segment, in disk order."""
        block_size = self.block_size
        for start, end, layer, offset in zip(self._starts, self._ends, self._layers, self._offsets,
                                             strict=True):
            yield start * block_size, (end - start) * block_size, layer, offset

    def lookup(self, offset: int, length: int) -> list[Piece]:
        """Pieces that tile the bytes [offset, offset + length) in order, holes as ZERO pieces."""
        if offset < 0 or length < 0:
            raise ValueError(f"offset and length must be >= 0, got offset {offset}, length {length}")
        end = offset + length
        if self.disk_size is not None and end > self.disk_size:
            raise ValueError(f"range [{offset}, {end}) ends past the disk ({self.disk_size} bytes)")
        if length == 0:
            return []
        block_size = self.block_size
        first_block, end_block = offset // block_size, -(-end // block_size)
        if first_block > _NO_BLOCK_LIMIT:  # beyond anything mapped (only without a disk size)
            return [Piece(offset, length, ZERO, 0)]
        first, stop = _kernel.find_segments(self._starts, self._ends, first_block,
                                            min(end_block, _NO_BLOCK_LIMIT))
        pieces: list[Piece] = []
        position = offset
        for k in range(first, stop):
            segment_offset = self._starts[k] * block_size
            piece_start = max(segment_offset, offset)
            piece_end = min(self._ends[k] * block_size, end)
            if piece_start > position:
                _append(pieces, position, piece_start - position, ZERO, 0)
            layer = self._layers[k]
            packed = 0 if layer == ZERO else self._offsets[k] + piece_start - segment_offset
            _append(pieces, piece_start, piece_end - piece_start, layer, packed)
            position = piece_end
        if position < end:
            _append(pieces, position, end - position, ZERO, 0)
        return pieces

    def lookup_blocks(self, blocks: object, out: BlockLocations | None = None) -> BlockLocations:
        """Layer and packed byte offset of every block in `blocks` (a uint64 buffer such as array('Q'),
        or an iterable of ints). `out` may supply the two result arrays to fill (array('q'), same length).
        ValueError for a block past the disk."""
        view = _as_block_buffer(blocks)
        if out is None:
            out = BlockLocations(array("q", bytes(8 * len(view))), array("q", bytes(8 * len(view))))
        _kernel.lookup_blocks(self._starts, self._ends, self._layers, self._offsets, self.block_size,
                              self._block_limit, view, out.layers, out.packed_offsets)
        return out


def _append(pieces: list[Piece], disk_offset: int, length: int, layer: int, packed_offset: int) -> None:
    """Add a piece, merging it into the previous one when it continues the same source."""
    if pieces:
        last = pieces[-1]
        if last.layer == layer and (layer == ZERO or last.packed_offset + last.length == packed_offset):
            pieces[-1] = Piece(last.disk_offset, last.length + length, layer, last.packed_offset)
            return
    pieces.append(Piece(disk_offset, length, layer, packed_offset))
