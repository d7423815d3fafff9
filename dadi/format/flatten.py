"""Write a layer stack out as one raw disk file: the merged view, holes left sparse."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from dadi.format.blob import read_packed
from dadi.format.index import ZERO, MergedIndex
from dadi.format.model import LayerTables

# Copy in slices so a multi-GiB extent never sits in memory whole.
_SLICE = 4 << 20


def flatten(out_path: Path, layers: Sequence[tuple[LayerTables, BinaryIO]], *, progress=None) -> int:
    """Write the merged view of layers (bottom first) into a new sparse file; returns data bytes written."""
    if not layers:
        raise ValueError("flatten needs at least one layer")
    disk_size = layers[0][0].disk_size
    block_size = layers[0][0].block_size
    for tables, _ in layers:
        if (tables.disk_size, tables.block_size) != (disk_size, block_size):
            raise ValueError("layers of one image must share disk size and block size")
    index = MergedIndex([t.extents for t, _ in layers], block_size=block_size, disk_size=disk_size)
    written = 0
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, disk_size)
        for disk_offset, length, layer, packed_offset in index.iter_segments():
            if layer == ZERO:
                continue  # the new file already reads as zeros there
            tables, blob = layers[layer]
            done = 0
            while done < length:
                n = min(_SLICE, length - done)
                data = read_packed(blob, tables, packed_offset + done, n)
                os.pwrite(fd, data, disk_offset + done)
                done += n
                if progress is not None:
                    progress.advance(n)
            written += length
    finally:
        os.close(fd)
    return written
