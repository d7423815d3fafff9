"""A layer's read hints in chunk terms: what a mount fetches first, and what to fetch along with a miss.

The tables' hints (format version 2, dadi.convert.ext4map) say which disk blocks of the layer hold file
system metadata and which hold each regular file. Here they become chunk indexes of the layer:

- `metadata_chunks`: fetched in a few large parallel requests from the mount on (with the chunks in
  the small gaps between them, so that they are few; `metadata_runs` cuts them into requests), so that
  path lookups, stat and open find the metadata local or on the wire instead of waiting on one round
  trip per block.
- `companions(missing)`: the chunks to fetch along with a read's missing chunks. A small file (up to
  `HintPolicy.whole_file_max` bytes) comes whole with its first miss: a process that opens a file
  reads it to its end, and one ranged request for all of it costs one round trip where the kernel's
  reads would cost one each. Inside a bigger file, the next `big_file_window` bytes of that file come
  along (reads of big files are mostly forward, and a library's mapped pages are faulted in clusters).
  A miss in a small file also brings the small files that follow it on the disk, up to
  `neighbour_window` bytes: the converter writes a layer's files in its tar's order, so they are
  mostly the same directory's, which a starting program reads together (a package's modules, a
  library's neighbours). A range request costs a round trip, and a MiB more on it little of a fast
  link; the window was chosen by replaying a start (tools/bench/hints_replay.py, docs/BENCHMARKS.md).

Hints steer only what is fetched together, never which bytes a read returns: every byte is still found
through the extents and checked against the chunk's sha256. So a hint that disagrees with the extents
(a range outside the layer's data, from a bug, an old converter or a lying registry) makes this layer's
hints void: a warning is logged, `problem` says why, and reads go through the block path alone.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

from dadi.format.model import BlockRange, LayerTables

log = logging.getLogger(__name__)

KiB, MiB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class HintPolicy:
    """How much a miss fetches with it. The defaults were chosen by tools/bench/hints_replay.py and checked
    with tools/bench/mount.py (docs/BENCHMARKS.md)."""

    whole_file_max: int = 2 * MiB  # a file up to this many bytes comes whole with its first miss
    big_file_window: int = 512 * KiB  # inside a bigger file, this many bytes after the miss come along
    neighbour_window: int = 1 * MiB  # with a small file's miss, the small files after it, up to this many bytes
    metadata_first: bool = True  # fetch the metadata at mount, beside the first reads


DEFAULT_HINT_POLICY = HintPolicy()


# Metadata chunks this close are fetched with the chunks between them: one ranged request instead of
# two. Directories and inode tables are scattered between file data; without this, a Debian image's
# metadata took ~200 requests.
METADATA_GAP_CHUNKS = 4


def _fill_gaps(chunks: list[int], gap: int) -> list[int]:
    out: list[int] = []
    for c in chunks:
        if out and c - out[-1] <= gap + 1:
            out.extend(range(out[-1] + 1, c))
        out.append(c)
    return out


class HintError(ValueError):
    """A hint names blocks the layer's extents do not store."""


class LayerHints:
    def __init__(self, tables: LayerTables, policy: HintPolicy = DEFAULT_HINT_POLICY, *, name: str = "layer"):
        self.policy = policy
        self.metadata_chunks: list[int] = []
        self.problem = tables.hints_problem
        self._small: dict[int, tuple[int, ...]] = {}  # chunk -> the chunks of the small files it holds
        self._big: dict[int, tuple[tuple[int, ...], int]] = {}  # chunk -> (its big file's chunks, position)
        self._small_files: list[tuple[tuple[int, ...], int]] = []  # (chunks, bytes) of small files, disk order
        self._file_at: dict[int, int] = {}  # chunk -> position in _small_files of the first small file in it
        self._chunk_bytes = [c.length for c in tables.chunks]
        if self.problem:
            log.warning("%s: read hints ignored, reads take the block path: %s", name, self.problem)
            return
        try:
            mapper = _ChunkMapper(tables)
            metadata = sorted(set().union(*(mapper.chunks(r) for r in tables.metadata)))
            small: dict[int, set[int]] = {}
            big: dict[int, tuple[tuple[int, ...], int]] = {}
            window = max(1, policy.big_file_window // tables.chunk_size)
            for ranges in tables.files:
                chunks = tuple(sorted(set().union(*(mapper.chunks(r) for r in ranges))))
                size = sum(count for _, count in ranges) * tables.block_size
                if size <= policy.whole_file_max:
                    for c in chunks:
                        small.setdefault(c, set()).update(chunks)
                    if chunks:
                        self._small_files.append((chunks, size))
                elif window:
                    for position, c in enumerate(chunks):
                        big.setdefault(c, (chunks, position))
        except HintError as e:
            self.problem = str(e)
            log.warning("%s: read hints disagree with the extents and are ignored, reads take the block path: %s",
                        name, e)
            return
        self.metadata_chunks = _fill_gaps(metadata, METADATA_GAP_CHUNKS)
        self._small_files.sort()
        for n, (chunks, _) in enumerate(self._small_files):
            for c in chunks:
                self._file_at.setdefault(c, n)
        self._small = {c: tuple(sorted(group)) for c, group in small.items()}
        self._big = big
        self._window = window

    @property
    def usable(self) -> bool:
        return not self.problem and bool(self.metadata_chunks or self._small or self._big)

    def metadata_runs(self, max_bytes: int) -> list[list[int]]:
        """`metadata_chunks` as runs of adjacent chunks, each at most `max_bytes` stored (or one chunk)."""
        runs: list[list[int]] = []
        size = 0
        for c in self.metadata_chunks:
            length = self._chunk_bytes[c]
            if runs and runs[-1][-1] == c - 1 and size + length <= max_bytes:
                runs[-1].append(c)
                size += length
            else:
                runs.append([c])
                size = length
        return runs

    def companions(self, missing: list[int]) -> list[int]:
        """Chunks to fetch along with `missing` (which are not among them), sorted."""
        out: set[int] = set()
        for i in missing:
            group = self._small.get(i)
            if group is not None:
                out.update(group)
                self._add_neighbours(i, out)
            big = self._big.get(i)
            if big is not None:
                chunks, position = big
                out.update(chunks[position + 1:position + 1 + self._window])
        out.difference_update(missing)
        return sorted(out)

    def _add_neighbours(self, chunk: int, out: set[int]) -> None:
        """The small files after the one at `chunk` on the disk, up to `neighbour_window` bytes of them."""
        n = self._file_at.get(chunk)
        if n is None:
            return
        budget = self.policy.neighbour_window
        for chunks, size in self._small_files[n + 1:]:
            if budget <= 0:
                break
            out.update(chunks)
            budget -= size


class _ChunkMapper:
    """Disk block ranges -> the chunks holding their bytes, through the layer's data extents."""

    def __init__(self, tables: LayerTables):
        self.tables = tables
        self.starts = [e.block for e in tables.extents]

    def chunks(self, block_range: BlockRange) -> set[int]:
        block, count = block_range
        end = block + count
        tables = self.tables
        out: set[int] = set()
        i = bisect.bisect_right(self.starts, block) - 1
        position = block
        while position < end:
            if i < 0 or i >= len(tables.extents):
                raise HintError(f"blocks {position}-{end - 1} are not in any extent of the layer")
            extent = tables.extents[i]
            if not extent.block <= position < extent.block + extent.count:
                if extent.block + extent.count <= position:
                    i += 1
                    continue
                raise HintError(f"blocks {position}-{min(end, extent.block) - 1} are not in any extent of the layer")
            if extent.zero:
                raise HintError(f"blocks {position}-{min(end, extent.block + extent.count) - 1} are a zero extent")
            stop = min(end, extent.block + extent.count)
            first = extent.offset + (position - extent.block) * tables.block_size
            last = extent.offset + (stop - extent.block) * tables.block_size - 1
            out.update(range(tables.chunk_of(first), tables.chunk_of(last) + 1))
            position = stop
            i += 1
        return out
