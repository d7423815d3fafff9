"""A view: one container's block device, assembled from an image's layers and an optional writable layer.

The read path: merged extent index -> the chunks each layer must supply -> decompressed-chunk memory
LRU, else the on-disk chunk cache (xxh3 re-check), else the fetcher (sha256 check, single-flight,
coalesced ranges) -> decompress -> the requested bytes. Holes and zero extents read as zeros; blocks
the container wrote come from its writable layer. Blocking work (pread, lz4, hashing) runs in worker
threads under the daemon's limiter, so the trio loop keeps serving other reads.

Every read has a deadline (`io_timeout`): when the network cannot supply a chunk in time the read
fails (the FUSE layer answers EIO) instead of leaving the container in D state. A read that needs a chunk
whose fetch failed for a read in the last FAIL_FAST_SECONDS fails at once: after an EIO the kernel asks
again by itself (the page it read ahead, then the page alone, then the loop driver's short-read retry),
and each of those asking the sources again would make the reader wait io_timeout once more.

Read-ahead: when reads follow each other through the disk (a file read from start to end), the view
fetches the chunks of the next window in the background, so that the next reads find them local. The
window starts at READ_AHEAD_MIN (or twice the read) and doubles with each sequential read up to
READ_AHEAD_MAX; a read further on inside the window read ahead also counts (the native read path answers
the reads in between without us), a read elsewhere closes it. One read-ahead runs at a time per view. Read-ahead bytes count as on-demand bytes (reads caused them) and also on their own.

Read hints (format version 2, dadi.node.hints): `fetch_metadata` brings every layer's file system
metadata local while the view mounts and starts, and a read that misses a chunk of a small file
fetches the rest of that file beside its own request ("companions"), so the process reading the file
waits one round trip for it, not one per kernel read. Both count as on-demand bytes and on their own.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from dadi.format.blob import decode_chunk
from dadi.format.index import ZERO, MergedIndex
from dadi.format.model import LayerTables
from dadi.node.hints import DEFAULT_HINT_POLICY, HintPolicy, LayerHints

log = logging.getLogger(__name__)

# Decompressed chunks kept in memory, shared by the views of a daemon.
DEFAULT_MEMORY_CACHE = 64 << 20
READ_AHEAD_MIN = 256 << 10  # disk bytes
READ_AHEAD_MAX = 4 << 20
# Seconds after a chunk's fetch failed during which reads needing it fail at once. The kernel's own
# retries of a failed read follow within milliseconds; a reader trying again later asks the sources.
FAIL_FAST_SECONDS = 0.25
# Metadata requests in flight at once per view. The daemon has 8 fetch threads: this leaves half of them
# to the reads of the starting container, whose misses come one after another.
METADATA_WORKERS = 4


@dataclass
class LayerBlob:
    """One layer of a view: the blob, its verified tables and its local cache."""

    digest: str
    size: int
    tables: LayerTables
    cache: Any  # dadi.node.chunkcache.BlobCache


@dataclass
class ViewStats:
    reads: int = 0
    read_errors: int = 0
    io_timeouts: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_on_demand: int = 0  # stored bytes fetched because a read needed them
    bytes_prefetched: int = 0
    bytes_read_ahead: int = 0  # part of bytes_on_demand: fetched ahead of sequential reads
    bytes_companions: int = 0  # part of bytes_on_demand: fetched along with a miss (the rest of its file)
    bytes_metadata: int = 0  # part of bytes_on_demand: the file system metadata a mount fetched first
    hints_ignored: int = 0  # layers whose read hints were malformed or disagreed with their extents
    chunk_hits: int = 0  # chunks reads found in memory or the local cache
    chunk_misses: int = 0  # chunks reads had to fetch
    sources: dict[str, int] = field(default_factory=dict)


class ChunkLRU:
    """Decompressed chunks by (blob digest, chunk index), bounded by bytes; thread safe."""

    def __init__(self, capacity: int = DEFAULT_MEMORY_CACHE):
        self.capacity = capacity
        self._items: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            raw = self._items.get(key)
            if raw is not None:
                self._items.move_to_end(key)
            return raw

    def put(self, key: tuple[str, int], raw: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = raw
            self._size += len(raw)
            while self._size > self.capacity and self._items:
                _, old = self._items.popitem(last=False)
                self._size -= len(old)


class ReadFailed(Exception):
    """A read could not be served: no source could supply a chunk it needs."""


class ReadTimeout(ReadFailed):
    """A read could not be served before its deadline."""


class View:
    def __init__(self, name: str, layers: list[LayerBlob], *, fetcher, limiter: trio.CapacityLimiter,
                 memory: ChunkLRU, writable=None, io_timeout: float = 30.0, gate=None, spawn=None,
                 trace=None, store_lock: threading.Lock | None = None,
                 on_stored: Callable[[str, list[int]], None] | None = None,
                 hint_policy: HintPolicy | None = DEFAULT_HINT_POLICY):
        """`gate` (dadi.node.prefetch.OnDemandGate) is told when reads wait on the network; `spawn`
        starts a background task (read-ahead; none without it); `trace` records what reads need;
        `on_stored(digest, indexes)` hears of fetched chunks once they are in the cache (the announcer);
        `hint_policy` says how the layers' read hints are used (None: not at all, the block path alone)."""
        self.name = name
        self.layers = layers
        self.fetcher = fetcher
        self.limiter = limiter
        self.memory = memory
        self.writable = writable
        self.io_timeout = io_timeout
        self.stats = ViewStats()
        self.gate = gate
        self.spawn = spawn
        self.trace = trace
        # Shared by every view of a daemon: views of one image share its blob caches, and a chunk two of
        # them fetched at once must be stored (and counted) once.
        self._store_lock = store_lock or threading.Lock()
        self.on_stored = on_stored
        self._next_offset = -1  # where a sequential read would start
        self._ahead_end = -1  # where the last read-ahead window ends
        self._window = 0  # read-ahead window, disk bytes; 0: reads are not sequential
        self._reading_ahead = False
        self._failed: dict[tuple[str, int], float] = {}  # (digest, chunk) -> until when reads fail at once
        tables = [layer.tables for layer in layers]
        self.block_size = tables[0].block_size
        self.disk_size = tables[0].disk_size
        self.index = MergedIndex([t.extents for t in tables], block_size=self.block_size, disk_size=self.disk_size)
        self.hints: dict[str, LayerHints] = {}
        for layer in layers if hint_policy is not None else ():
            hints = LayerHints(layer.tables, hint_policy, name=f"view {name}: layer {layer.digest}")
            if hints.problem:
                self.stats.hints_ignored += 1
            elif hints.usable:
                self.hints[layer.digest] = hints

    # -- reading ---------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of the disk, clipped at its end; ReadTimeout past the deadline."""
        length = max(0, min(length, self.disk_size - offset))
        if length == 0:
            return b""
        self.stats.reads += 1
        self._follow_sequence(offset, length)
        deadline = trio.current_time() + self.io_timeout
        try:
            if self.writable is None:
                data = await self._read_lower(offset, length, deadline)
            else:
                parts = []
                for run_offset, run_length, written in self.writable.runs(offset, length):
                    if written:
                        parts.append(await self._in_thread(self.writable.read, run_offset, run_length))
                    else:
                        parts.append(await self._read_lower(run_offset, run_length, deadline))
                data = b"".join(parts)
        except ReadTimeout:
            self.stats.io_timeouts += 1
            self.stats.read_errors += 1
            raise
        except ReadFailed:
            self.stats.read_errors += 1
            raise
        except Exception:
            self.stats.read_errors += 1
            raise
        self.stats.bytes_read += len(data)
        return data

    def _follow_sequence(self, offset: int, length: int) -> None:
        """Called as a read starts (the kernel sends the next read before the last one is answered)."""
        # Also sequential: a read further on inside the window read ahead. The reads in between found
        # their chunks local, and the native read path (dadi.node.nativeviews) answered them without us.
        sequential = offset == self._next_offset or self._next_offset < offset <= self._ahead_end
        self._next_offset = offset + length
        # At least twice the read: the kernel's reads of a file grow too (ext4's own read-ahead).
        self._window = min(max(self._window * 2, 2 * length, READ_AHEAD_MIN), READ_AHEAD_MAX) if sequential else 0
        if self._window and self.spawn is not None and not self._reading_ahead:
            self._reading_ahead = True
            self._ahead_end = offset + length + self._window
            self.spawn(self._read_ahead, offset + length, self._window)

    async def _read_ahead(self, start: int, length: int) -> None:
        """Fetch the chunks under disk bytes [start, start + length) that are not local; errors are dropped
        (the read that needs the bytes will fetch them itself, under its own deadline)."""
        try:
            length = max(0, min(length, self.disk_size - start))
            wanted: dict[int, set[int]] = {}
            for piece in self.index.lookup(start, length) if length else ():
                if piece.layer == ZERO:
                    continue
                tables = self.layers[piece.layer].tables
                first = tables.chunk_of(piece.packed_offset)
                last = tables.chunk_of(piece.packed_offset + piece.length - 1)
                wanted.setdefault(piece.layer, set()).update(range(first, last + 1))
            deadline = trio.current_time() + self.io_timeout
            for layer_index, indexes in wanted.items():
                layer = self.layers[layer_index]
                absent = [i for i in sorted(indexes) if self.memory.get((layer.digest, i)) is None]
                missing = await self._in_thread(layer.cache.missing, absent)
                if missing:
                    await self._fetch(layer, missing, deadline, "read_ahead")
        except Exception as e:
            log.debug("view %s: read-ahead at %d stopped: %s", self.name, start, e)
        finally:
            self._reading_ahead = False

    async def _read_lower(self, offset: int, length: int, deadline: float) -> bytes:
        parts = []
        for piece in self.index.lookup(offset, length):
            if piece.layer == ZERO:
                parts.append(bytes(piece.length))
            else:
                parts.append(await self._packed(piece.layer, piece.packed_offset, piece.length, deadline))
        return b"".join(parts)

    async def _packed(self, layer_index: int, packed_offset: int, length: int, deadline: float) -> bytes:
        layer = self.layers[layer_index]
        tables = layer.tables
        first = tables.chunk_of(packed_offset)
        last = tables.chunk_of(packed_offset + length - 1)
        raws = await self.chunks(layer, range(first, last + 1), deadline)
        start = packed_offset - first * tables.chunk_size
        return b"".join(raws)[start:start + length]

    async def chunks(self, layer: LayerBlob, indexes: range | list[int], deadline: float) -> list[bytes]:
        """The decompressed chunks `indexes` of a layer that a read needs, in order: memory, local
        cache, then network."""
        if self.trace is not None:
            self.trace.record(layer.digest, indexes)
        raws: dict[int, bytes] = {}
        for i in indexes:
            raw = self.memory.get((layer.digest, i))
            if raw is not None:
                raws[i] = raw
        wanted = [i for i in indexes if i not in raws]
        if wanted:
            local = await self._in_thread(self._read_local, layer, wanted)
            raws.update(local)
            missing = [i for i in wanted if i not in local]
            self.stats.chunk_hits += len(indexes) - len(missing)
            self.stats.chunk_misses += len(missing)
            if missing:
                if self.spawn is not None and layer.digest in self.hints:
                    companions = self.hints[layer.digest].companions(missing)
                    if companions:
                        # In parallel, not in the read's own request: the read waits only for its chunks.
                        self.spawn(self._fetch_companions, layer, companions, deadline)
                raws.update(await self._fetch(layer, missing, deadline, "on_demand"))
        return [raws[i] for i in indexes]

    async def make_local(self, layer: LayerBlob, indexes: list[int], deadline: float) -> None:
        """Fetch into the disk cache those of `indexes` it lacks, for prefetch: nothing is decoded and
        nothing goes to the memory LRU, which is the reads' (a prefetch of the whole image through it
        cost ~0.3 s of lz4 per 300 MB and evicted the chunks a starting container was reading)."""
        missing = await self._in_thread(layer.cache.missing, indexes)
        if missing:
            await self._fetch(layer, missing, deadline, "prefetch")

    async def _fetch_companions(self, layer: LayerBlob, indexes: list[int], deadline: float) -> None:
        """Fetch what the hints say comes with a miss (the rest of a small file); errors are dropped: a
        read that needs these bytes fetches them itself, under its own deadline."""
        try:
            absent = [i for i in indexes if self.memory.get((layer.digest, i)) is None]
            missing = await self._in_thread(layer.cache.missing, absent)
            if missing:
                await self._fetch(layer, missing, deadline, "companion")
        except Exception as e:
            log.debug("view %s: fetching %d chunks along with a miss stopped: %s", self.name, len(indexes), e)

    async def fetch_metadata(self) -> int:
        """Fetch every layer's file system metadata that is not local; returns the stored bytes fetched.
        The daemon runs this beside the mount and the first reads, not before them. Runs of chunks go
        out in disk order (superblock and group descriptors first), METADATA_WORKERS requests at a time,
        each run claimed only when its request starts: a read never queues behind metadata that is
        not on the wire yet, it fetches its own chunk. Failures are logged, not raised: without the
        metadata, lookups fetch it block by block as they would without hints."""
        before = self.stats.bytes_metadata
        deadline = trio.current_time() + self.io_timeout
        work: list[tuple[LayerBlob, list[int]]] = []
        for layer in self.layers:
            hints = self.hints.get(layer.digest)
            if hints is not None and hints.metadata_chunks:
                work += [(layer, run) for run in hints.metadata_runs(self.fetcher.max_request_bytes)]
        work.sort(key=lambda item: item[1][0])  # every layer's first blocks first: what a mount reads
        send, receive = trio.open_memory_channel(len(work))
        for item in work:
            send.send_nowait(item)
        send.close()

        async def worker() -> None:
            async for layer, run in receive:
                try:
                    absent = [i for i in run if self.memory.get((layer.digest, i)) is None]
                    missing = await self._in_thread(layer.cache.missing, absent)
                    if missing:
                        await self._fetch(layer, missing, deadline, "metadata")
                except Exception as e:
                    log.warning("view %s: metadata of layer %s not fetched ahead: %s", self.name, layer.digest, e)

        async with trio.open_nursery() as nursery:
            for _ in range(min(METADATA_WORKERS, len(work))):
                nursery.start_soon(worker)
        return self.stats.bytes_metadata - before

    def _read_local(self, layer: LayerBlob, indexes: list[int]) -> dict[int, bytes]:
        out = {}
        chunks = layer.tables.chunks
        for i in indexes:
            stored = layer.cache.read_stored(i)  # xxh3-checked; None if absent or damaged
            if stored is not None:
                raw = decode_chunk(stored, chunks[i], verify="none")
                self.memory.put((layer.digest, i), raw)
                out[i] = raw
        return out

    async def _fetch(self, layer: LayerBlob, indexes: list[int], deadline: float, purpose: str) -> dict[int, bytes]:
        if trio.current_time() >= deadline:
            raise ReadTimeout(f"{layer.digest}: no time left to fetch {len(indexes)} chunks")
        from dadi.node.fetch import FetchError, FetchTimeout

        on_demand = purpose == "on_demand"  # not a prefetch, read-ahead or companion: their failures fail no read
        if on_demand:
            self._fail_fast(layer.digest, indexes)
        pieces = self.fetcher.pieces
        if pieces is not None:
            indexes = round_to_pieces(layer, indexes, *pieces)
        try:
            with self.gate.busy() if self.gate is not None and purpose != "prefetch" else contextlib.nullcontext():
                stored = await self.fetcher.fetch(layer.digest, layer.tables.chunks, indexes, deadline=deadline,
                                                  purpose=purpose)
        except (FetchTimeout, FetchError) as e:
            if on_demand:
                self._remember_failure(layer.digest, indexes)
            if isinstance(e, FetchTimeout):
                raise ReadTimeout(str(e)) from e
            raise ReadFailed(str(e)) from e  # every source failed every retry: fail now, not at the deadline
        out = await self._in_thread(self._store, layer, stored, purpose)
        if self.on_stored is not None:
            self.on_stored(layer.digest, list(stored))
        return out

    def _fail_fast(self, digest: str, indexes: list[int]) -> None:
        """ReadFailed if a chunk of `indexes` failed to come for a read just now (FAIL_FAST_SECONDS)."""
        if not self._failed:
            return
        now = trio.current_time()
        for i in indexes:
            until = self._failed.get((digest, i))
            if until is not None and until > now:
                raise ReadFailed(f"{digest}: chunk {i} could not be fetched less than {FAIL_FAST_SECONDS} s "
                                 "ago (the kernel retrying a failed read?): failing at once")

    def _remember_failure(self, digest: str, indexes: list[int]) -> None:
        now = trio.current_time()
        if len(self._failed) > 4096:
            self._failed = {k: until for k, until in self._failed.items() if until > now}
        for i in indexes:
            self._failed[(digest, i)] = now + FAIL_FAST_SECONDS

    def _store(self, layer: LayerBlob, stored: dict[int, bytes], purpose: str) -> dict[int, bytes]:
        out = {}
        chunks = layer.tables.chunks
        for i, data in stored.items():
            # Concurrent reads of one chunk share its fetch (single-flight) and all get its bytes: only
            # the first to store it counts it, so the figures say what crossed the network.
            with self._store_lock:
                new = not layer.cache.has(i)
                if new:
                    layer.cache.put_stored(i, data)
            if new:
                if purpose == "prefetch":
                    self.stats.bytes_prefetched += len(data)
                else:
                    self.stats.bytes_on_demand += len(data)
                    if purpose == "read_ahead":
                        self.stats.bytes_read_ahead += len(data)
                    elif purpose == "companion":
                        self.stats.bytes_companions += len(data)
                    elif purpose == "metadata":
                        self.stats.bytes_metadata += len(data)
            if purpose == "on_demand":  # what a read waits for; the rest waits in the disk cache
                raw = decode_chunk(data, chunks[i], verify="none")  # the fetcher checked sha256
                self.memory.put((layer.digest, i), raw)
                out[i] = raw
        return out

    async def _in_thread(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    # -- writing ---------------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> int:
        if self.writable is None:
            raise PermissionError(f"view {self.name} is read-only")
        if offset + len(data) > self.disk_size:
            raise ValueError(f"write of {len(data)} bytes at {offset} ends past the disk")
        self.stats.writes += 1
        deadline = trio.current_time() + self.io_timeout
        block = self.block_size
        # Partial blocks at either end are completed from below (copy-up): read those first, here,
        # where lower reads may await the network; the layer's own write then runs in a thread.
        edges = {offset - offset % block, (offset + len(data) - 1) // block * block}
        lower = {}
        for edge in edges:
            partial = offset > edge or offset + len(data) < edge + block
            if partial:
                lower[edge] = await self._read_lower(edge, block, deadline)
        await self._in_thread(self.writable.write, offset, data, lambda o, n: lower[o][:n])
        return len(data)

    async def flush(self) -> None:
        if self.writable is not None:
            await self._in_thread(self.writable.flush)
        for layer in self.layers:
            await self._in_thread(layer.cache.flush)

    async def close(self) -> None:
        """Flush everything; the writable layer is released for the next mount of this name."""
        await self.flush()
        if self.writable is not None:
            await self._in_thread(self.writable.close)


def round_to_pieces(layer: LayerBlob, indexes: list[int], piece_size: int, share: float) -> list[int]:
    """`indexes`, and the chunks not cached of every piece they cover at least `share` of but not whole.

    A supernode makes a node that asks for most of a hot piece one of the piece's seeds, and makes other
    nodes wait for it to announce the piece (dadi/p2p/tracker.py); but a node announces only the pieces
    it holds whole. Chunks do not line up with pieces, so a read's run of chunks usually covered 88-94%
    of its pieces: its seeds then announced them only when a later read happened to fetch the rest, up to
    a second later, and the waiting nodes gave up after HOLD_SECONDS and were served by the supernode
    anyway (traced in an 8-node start of tools/bench/p2p.py). Fetching the rest of such a piece with it
    costs at most a quarter of a piece more, and its seeds announce it as soon as it is stored."""
    chunks = layer.tables.chunks
    covered: dict[int, int] = {}
    for i in indexes:
        start, end = chunks[i].offset, chunks[i].offset + chunks[i].length
        for piece in range(start // piece_size, (end - 1) // piece_size + 1):
            covered[piece] = covered.get(piece, 0) + min(end, (piece + 1) * piece_size) - max(start, piece * piece_size)
    wanted = set(indexes)
    for piece, nbytes in covered.items():
        if not share * piece_size <= nbytes < piece_size:
            continue
        lo, hi = piece * piece_size, (piece + 1) * piece_size
        first = next(i for i in indexes if chunks[i].offset < hi and chunks[i].offset + chunks[i].length > lo)
        while first > 0 and chunks[first - 1].offset + chunks[first - 1].length > lo:
            first -= 1
        last = first
        while last + 1 < len(chunks) and chunks[last + 1].offset < hi:
            last += 1
        wanted.update(i for i in range(first, last + 1) if i not in wanted and not layer.cache.has(i))
    return sorted(wanted) if len(wanted) > len(indexes) else indexes
