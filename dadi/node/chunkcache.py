"""The node's on-disk chunk cache: the chunks of layer blobs fetched so far, kept across restarts.

One directory per blob, ``root/blobs/<sha256 hex>/``:

    data       a sparse file of the blob's size; every cached chunk's stored bytes sit at their blob offset
    present    one bit per chunk: which chunks of `data` hold valid bytes (the only record of that)
    meta.json  digest, size, chunk count, whether header/tables/footer were written, verified, last use

Why this layout:

- Chunks sit at their blob offsets, so the tables the node already holds say where each one is (no index
  of our own to keep consistent), a missing chunk is a hole that costs no disk, and a blob whose chunks
  have all arrived, plus header, tables and footer, *is* the registry's blob byte for byte: its sha256
  can be checked against the layer digest, and it can be exported or served to peers as it is.
- Stored (compressed) bytes are cached, not decoded ones: they are what the tables' hashes cover, so every
  read is re-checked with the table's cheap xxh3 (disk rot, torn writes) and a bad chunk is fetched again
  instead of served. lz4 decodes at GB/s, and the cache holds about half the bytes.
- The bitmap is written only after `data` was fsynced, and replaced atomically (temp file, fsync, rename,
  fsync of the directory). After a crash at any moment, every chunk marked present has its bytes on disk;
  chunks written after the last flush are merely fetched again.
- Small files, each replaced whole, make recovery trivial: a damaged bitmap or meta file is treated as
  empty (with a warning), never as an error.
- Eviction removes whole blobs, least recently used first, and never one that a mounted view uses:
  evicting single chunks of a running container's layers would save little and make its reads slow in
  unpredictable places.

One process (the node daemon) owns a cache directory: the use counts that protect blobs from eviction live
in its memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import xxhash

from dadi.digests import check_digest
from dadi.errors import DadiError
from dadi.format.blob import FOOTER_SIZE, HEADER_SIZE, tables_offset
from dadi.format.model import Chunk, LayerTables

log = logging.getLogger(__name__)

# Puts between automatic bitmap flushes: one flush costs two fsyncs, and a crash loses at most this many
# chunks (they are fetched again), i.e. 16 MiB of 64 KiB chunks.
FLUSH_EVERY = 256
# A last-use time only orders blobs for eviction, so writing it once every few seconds is precise enough
# and keeps meta.json writes off the read path.
TOUCH_INTERVAL = 5.0

_HASH_PIECE = 1 << 20
# present: magic, chunk count, xxh3-64 of the bits; then one bit per chunk, chunk i in byte i // 8, bit i % 8.
_BITMAP = struct.Struct("<8sQQ")
_BITMAP_MAGIC = b"DADIBMP\x00"
_TMP_SUFFIX = ".tmp"
_TRASH_PREFIX = ".trash-"
_HEX = re.compile(r"[0-9a-f]{64}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Up to `size` bytes; shorter only at the end of the file."""
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data`: after a crash it holds either the old content or the new, never a mix."""
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _load_bitmap(path: Path, count: int) -> bytearray:
    """The persisted presence bits; all clear when the file is missing, short or damaged."""
    empty = bytearray((count + 7) // 8)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return empty
    if len(data) != _BITMAP.size + len(empty):
        log.warning("%s: %d bytes, expected %d for %d chunks; treating every chunk as absent",
                    path, len(data), _BITMAP.size + len(empty), count)  # fmt: skip
        return empty
    magic, stored_count, checksum = _BITMAP.unpack_from(data)
    bits = bytearray(data[_BITMAP.size :])
    if magic != _BITMAP_MAGIC or stored_count != count or xxhash.xxh3_64_intdigest(bits) != checksum:
        log.warning(
            "%s: damaged (magic, chunk count or checksum wrong); treating every chunk as absent", path
        )
        return empty
    return bits


def _load_meta(path: Path, digest: str) -> dict[str, Any] | None:
    """meta.json of the blob `digest`, or None when it is missing or damaged."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        meta = json.loads(raw)
        ok = (
            isinstance(meta, dict)
            and meta.get("digest") == digest
            and all(type(meta.get(k)) is int for k in ("size", "chunks"))
            and all(type(meta.get(k)) is bool for k in ("metadata", "complete", "verified"))
            and type(meta.get("last_used")) in (int, float)
        )
    except ValueError:  # not JSON or not UTF-8
        ok = False
    if not ok:
        log.warning("%s: damaged; treating the blob's metadata as unknown", path)
        return None
    return meta


def _disk_usage(path: Path) -> int:
    """Bytes allocated to the file at `path`, or to the files directly in the directory at `path`."""
    try:
        if not path.is_dir():
            return path.lstat().st_blocks * 512
        total = 0
        with os.scandir(path) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
        return total
    except FileNotFoundError:  # removed meanwhile
        return 0


class BlobCache:
    """The cached chunks of one layer blob; get it from `ChunkCache.open_blob`. Safe to use from threads."""

    def __init__(
        self, path: Path, digest: str, blob_size: int, tables: LayerTables, clock: Callable[[], float]
    ):
        self.path = path
        self.digest = digest
        self.size = blob_size
        self.tables = tables
        self.corrupt = 0  # chunks found damaged on disk since this blob was opened
        self._clock = clock
        # _lock guards the bits, counters and meta dict and is never held during file IO other than
        # closing the fd. _flush_lock and _meta_lock serialise the bitmap and meta.json writers so that a
        # newer snapshot is never overwritten by an older one. Order: _flush_lock, _meta_lock, _lock.
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._meta_lock = threading.Lock()
        self._io_count = 0  # preads and pwrites in progress: the fd stays open until they end
        self._closed = False
        count = len(tables.chunks)

        path.mkdir(parents=True, exist_ok=True)
        for leftover in path.glob("*" + _TMP_SUFFIX):  # from a crash mid-write; nobody else writes here
            leftover.unlink(missing_ok=True)
        meta = _load_meta(path / "meta.json", digest)
        if meta is not None and (meta["size"], meta["chunks"]) != (blob_size, count):
            raise DadiError(
                f"chunk cache {path}: blob {digest} is cached as {meta['size']} bytes in {meta['chunks']} "
                f"chunks, but was opened as {blob_size} bytes in {count} chunks (tables of another blob?)"
            )
        self._bits = _load_bitmap(path / "present", count)
        self._present = sum(byte.bit_count() for byte in self._bits)
        self._changes = 0  # bitmap changes made in memory ...
        self._flushed = 0  # ... and how many of them the present file holds
        self._puts_since_flush = 0
        self._meta: dict[str, Any] = meta or {
            "digest": digest, "size": blob_size, "chunks": count,
            "metadata": False, "complete": False, "verified": False, "last_used": clock(),
        }  # fmt: skip
        if meta is None or meta["complete"] != self.complete:
            # A lost bitmap also loses the verification: the chunks fetched again must be checked again.
            self._meta["verified"] = self._meta["verified"] and self.complete
            self._write_meta()
        self._fd = os.open(path / "data", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(self._fd).st_size != blob_size:
                os.ftruncate(self._fd, blob_size)  # sparse: holes take no disk space
        except BaseException:
            os.close(self._fd)
            raise

    # --- state ---------------------------------------------------------------------------------------

    @property
    def chunk_count(self) -> int:
        return len(self.tables.chunks)

    @property
    def present_count(self) -> int:
        return self._present

    @property
    def complete(self) -> bool:
        """Every chunk is present (header, tables and footer may still be missing: see has_metadata)."""
        return self._present == self.chunk_count

    @property
    def has_metadata(self) -> bool:
        """put_metadata wrote header, tables and footer, so a complete data file is the whole blob."""
        return self._meta["metadata"]

    @property
    def verified(self) -> bool:
        """Complete, and the whole data file hashed to the blob digest (verify_complete)."""
        return self.complete and self._meta["verified"]

    @property
    def last_used(self) -> float:
        return self._meta["last_used"]

    def info(self) -> dict[str, Any]:
        return {
            "digest": self.digest, "size": self.size, "chunks": self.chunk_count,
            "present": self.present_count, "complete": self.complete, "verified": self.verified,
            "last_used": self.last_used, "corrupt": self.corrupt,
        }  # fmt: skip

    def _chunk(self, index: int) -> Chunk:
        # Explicit, because a negative index would silently pick a chunk from the end.
        if not 0 <= index < self.chunk_count:
            raise IndexError(f"{self.digest}: chunk index {index} is not in [0, {self.chunk_count})")
        return self.tables.chunks[index]

    def has(self, index: int) -> bool:
        self._chunk(index)
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def missing(self, indexes: Iterable[int]) -> list[int]:
        """Those of `indexes` that are not cached, in the given order."""
        return [i for i in indexes if not self.has(i)]

    def _set(self, index: int, present: bool) -> None:
        """Change one bit in memory; the caller holds _lock."""
        byte, mask = index >> 3, 1 << (index & 7)
        if bool(self._bits[byte] & mask) == present:
            return
        self._bits[byte] ^= mask
        self._present += 1 if present else -1
        self._changes += 1
        if not present:
            self._meta["verified"] = False

    # --- chunks --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _io(self) -> Iterator[int]:
        """The data file's fd, kept open until this IO ends even if the blob is evicted meanwhile (closing
        it under a running pread could hand its number to another file)."""
        with self._lock:
            if self._closed:
                raise DadiError(f"{self.digest}: no longer open in the chunk cache (evicted or closed)")
            self._io_count += 1
        try:
            yield self._fd
        finally:
            with self._lock:
                self._io_count -= 1
                if self._closed and self._io_count == 0:
                    os.close(self._fd)

    def read_stored(self, index: int) -> bytes | None:
        """The stored bytes of chunk `index`, or None when it is not cached or was found damaged."""
        chunk = self._chunk(index)
        if not self.has(index):
            return None
        with self._io() as fd:
            stored = _pread_exact(fd, chunk.length, chunk.offset)
        if len(stored) == chunk.length and xxhash.xxh3_64_intdigest(stored) == chunk.xxh3:
            self.touch()
            return stored
        log.warning("chunk cache %s: chunk %d at blob offset %d fails its xxh3 check; it will be fetched again",
                    self.path, index, chunk.offset)  # fmt: skip
        with self._lock:
            self.corrupt += 1
            self._set(index, False)
        # At once, so a restart does not trust the bad bytes again (they would be caught again, but why).
        self.flush()
        return None

    def put_stored(self, index: int, stored: bytes | memoryview) -> None:
        """Cache the stored bytes of chunk `index`, which the caller has checked against its sha256.

        Durable, and marked present on disk, after the next flush(): explicit, every FLUSH_EVERY puts, or
        when this put completes the blob.
        """
        chunk = self._chunk(index)
        length = memoryview(stored).nbytes
        if length != chunk.length:
            raise ValueError(
                f"{self.digest}: chunk {index} at blob offset {chunk.offset} has {chunk.length} stored "
                f"bytes, got {length}"
            )
        with self._io() as fd:
            _pwrite_all(fd, stored, chunk.offset)
        with self._lock:
            self._set(index, True)
            self._puts_since_flush += 1
            due = self._puts_since_flush >= FLUSH_EVERY or self.complete
        if due:
            self.flush()
        self.touch()

    def flush(self) -> None:
        """Make the chunks put so far durable, then record them in the bitmap (in this order: a chunk is
        never marked present on disk before its bytes are there)."""
        with self._flush_lock:
            with self._lock:
                if self._closed or self._changes == self._flushed:
                    return
                # Bits set before this snapshot belong to pwrites that have returned: the fsync below
                # covers them. Later ones wait for the next flush.
                changes, bits = self._changes, bytes(self._bits)
                self._puts_since_flush = 0
            with self._io() as fd:
                os.fsync(fd)
            header = _BITMAP.pack(_BITMAP_MAGIC, self.chunk_count, xxhash.xxh3_64_intdigest(bits))
            _write_atomic(self.path / "present", header + bits)
            with self._lock:
                self._flushed = changes
                meta_stale = self._meta["complete"] != self.complete
        if meta_stale:
            self._write_meta()

    # --- the whole blob ------------------------------------------------------------------------------

    def put_metadata(self, header: bytes, tables_bytes: bytes, footer: bytes) -> None:
        """Write the blob's header, tables and footer, so that the complete data file is the blob."""
        if len(header) != HEADER_SIZE or len(footer) != FOOTER_SIZE:
            raise ValueError(
                f"{self.digest}: header and footer must be {HEADER_SIZE} and {FOOTER_SIZE} bytes, "
                f"got {len(header)} and {len(footer)}"
            )
        start = tables_offset(self.size, len(tables_bytes))
        last = self.tables.chunks[-1] if self.tables.chunks else None
        data_end = last.offset + last.length if last else HEADER_SIZE
        if start != data_end:
            raise ValueError(
                f"{self.digest}: tables of {len(tables_bytes)} bytes would start at blob offset {start}, "
                f"but the chunk data ends at {data_end}"
            )
        with self._io() as fd:
            _pwrite_all(fd, header, 0)
            _pwrite_all(fd, tables_bytes, start)
            _pwrite_all(fd, footer, self.size - FOOTER_SIZE)
            os.fsync(fd)
        with self._lock:
            self._meta["metadata"] = True
            self._meta["verified"] = False
        self._write_meta()

    def verify_complete(self) -> bool:
        """Hash the whole data file against the blob digest; True (and remembered) when it matches.

        False without reading anything when chunks or the metadata are missing. On a mismatch, the chunks
        whose sha256 is wrong are marked absent (to be fetched again); when every chunk is right, the
        header, tables or footer must be, and the metadata is marked missing instead.
        """
        if not (self.complete and self.has_metadata):
            return False
        digest = hashlib.sha256()
        with self._io() as fd:
            for offset in range(0, self.size, _HASH_PIECE):
                digest.update(_pread_exact(fd, min(_HASH_PIECE, self.size - offset), offset))
            if "sha256:" + digest.hexdigest() == self.digest:
                with self._lock:
                    self._meta["verified"] = True
                self._write_meta()
                return True
            bad = [
                i for i, chunk in enumerate(self.tables.chunks)
                if hashlib.sha256(_pread_exact(fd, chunk.length, chunk.offset)).digest() != chunk.sha256
            ]  # fmt: skip
        log.warning("chunk cache %s: the data file does not hash to the blob digest; bad chunks: %s",
                    self.path, bad or "none, so header, tables or footer")  # fmt: skip
        with self._lock:
            self.corrupt += len(bad)
            for i in bad:
                self._set(i, False)
            if not bad:
                self._meta["metadata"] = False
            self._meta["verified"] = False
        self.flush()
        self._write_meta()
        return False

    # --- bookkeeping ---------------------------------------------------------------------------------

    def touch(self) -> None:
        """Record a use, for least-recently-used eviction; writes meta.json at most every TOUCH_INTERVAL."""
        now = self._clock()
        with self._lock:
            if abs(now - self._meta["last_used"]) < TOUCH_INTERVAL:
                return
            self._meta["last_used"] = now
        self._write_meta()

    def _write_meta(self) -> None:
        with self._meta_lock:
            with self._lock:
                if self._closed:
                    return
                self._meta["complete"] = self.complete
                data = json.dumps(self._meta, sort_keys=True).encode()
            _write_atomic(self.path / "meta.json", data)

    def close(self) -> None:
        """Flush, and close the data file; later reads and puts raise DadiError. Idempotent."""
        self._retire(flush=True)

    def _retire(self, *, flush: bool) -> None:
        """Close for good; once this returns, no write of this object to its directory is running or can
        start, so the directory can be removed (and a new blob created under the same name)."""
        if flush:
            self.flush()
        with self._flush_lock, self._meta_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            if self._io_count == 0:
                os.close(self._fd)


class ChunkCache:
    """All cached blobs under `root/blobs/`, use counts that protect them, and eviction.

    `quota` (bytes on disk): before a blob that is not yet cached is created, unused blobs are evicted
    until the cache is within it. Blobs in use are never evicted, so usage can exceed the quota.
    `clock` gives the last-use times (seconds); tests pass a fake one.
    """

    def __init__(self, root: Path, quota: int | None = None, *, clock: Callable[[], float] = time.time):
        if quota is not None and quota < 0:
            raise ValueError(f"chunk cache quota must be >= 0 bytes, not {quota}")
        self.root = Path(root)
        self.quota = quota
        self._clock = clock
        self._dir = self.root / "blobs"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards _open and _refs; taken before any BlobCache lock
        self._open: dict[str, BlobCache] = {}
        self._refs: dict[str, int] = {}

    def __enter__(self) -> ChunkCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close every open blob."""
        with self._lock:
            blobs, self._open = list(self._open.values()), {}
        for blob in blobs:
            blob.close()

    def _path(self, digest: str) -> Path:
        return self._dir / check_digest(digest, "chunk cache")[len("sha256:") :]

    def open_blob(self, digest: str, blob_size: int, tables: LayerTables) -> BlobCache:
        """The cache of blob `digest`: created empty, or reopened with what earlier runs fetched.

        The same object while it stays open. acquire() the digest first when the blob must not be evicted
        while it is used: an evicted BlobCache raises DadiError on reads and puts.
        """
        path = self._path(digest)
        last = tables.chunks[-1] if tables.chunks else None
        data_end = last.offset + last.length if last else HEADER_SIZE
        if data_end + FOOTER_SIZE > blob_size:
            raise DadiError(
                f"chunk cache: blob {digest} of {blob_size} bytes cannot hold its tables' chunk data, "
                f"which ends at blob offset {data_end}, and a {FOOTER_SIZE}-byte footer"
            )
        if self.quota is not None and digest not in self._open and not path.exists():
            self.evict(self.quota)
        with self._lock:
            blob = self._open.get(digest)
            if blob is None:
                blob = self._open[digest] = BlobCache(path, digest, blob_size, tables, self._clock)
            elif (blob.size, blob.chunk_count) != (blob_size, len(tables.chunks)):
                raise DadiError(
                    f"chunk cache {path}: blob {digest} is open as {blob.size} bytes in {blob.chunk_count} "
                    f"chunks, but was opened again as {blob_size} bytes in {len(tables.chunks)} chunks"
                )
        blob.touch()
        return blob

    def acquire(self, digest: str) -> None:
        """A view starts using blob `digest`: it is not evicted until the matching release."""
        check_digest(digest, "chunk cache")
        with self._lock:
            self._refs[digest] = self._refs.get(digest, 0) + 1

    def release(self, digest: str) -> None:
        with self._lock:
            count = self._refs.get(digest, 0)
            if count == 0:
                raise ValueError(f"chunk cache: release of blob {digest}, which nothing acquired")
            if count == 1:
                del self._refs[digest]
            else:
                self._refs[digest] = count - 1
            blob = self._open.get(digest)
        if blob is not None:
            blob.touch()  # used until now: the end of a mount counts as its last use

    def usage(self) -> int:
        """Bytes allocated on disk to the cache (holes in sparse data files take none)."""
        with os.scandir(self._dir) as entries:
            return sum(_disk_usage(Path(entry.path)) for entry in entries)

    def _digests(self) -> list[str]:
        with os.scandir(self._dir) as entries:
            return sorted("sha256:" + e.name for e in entries if _HEX.fullmatch(e.name) and e.is_dir())

    def _remove(self, digest: str) -> int | None:
        """Remove an unused blob; the bytes it freed, or None when it is in use."""
        path = self._path(digest)
        with self._lock:
            if self._refs.get(digest):
                return None
            blob = self._open.pop(digest, None)
            if blob is not None:
                blob._retire(flush=False)
            freed = _disk_usage(path)
            # Renamed first, so that a crash during the removal leaves no half-deleted blob behind, only
            # a trash directory that gc() removes.
            trash = self._dir / f"{_TRASH_PREFIX}{path.name}-{os.getpid()}-{threading.get_ident()}"
            try:
                path.rename(trash)
            except FileNotFoundError:
                return None
        shutil.rmtree(trash, ignore_errors=True)
        return freed

    def evict(self, quota: int) -> list[str]:
        """Remove unused blobs, least recently used first, until usage() <= quota; the evicted digests."""
        if quota < 0:
            raise ValueError(f"chunk cache: evict to a quota of {quota} bytes")
        usage = self.usage()
        if usage <= quota:
            return []
        candidates = []
        for digest in self._digests():
            with self._lock:
                if self._refs.get(digest):
                    continue
                blob = self._open.get(digest)
            if blob is not None:
                last_used = blob.last_used
            else:
                meta = _load_meta(self._path(digest) / "meta.json", digest)
                last_used = meta["last_used"] if meta else 0.0  # unknown: the first to go
            candidates.append((last_used, digest))
        evicted = []
        for _, digest in sorted(candidates):
            if usage <= quota:
                break
            freed = self._remove(digest)
            if freed is not None:
                usage -= freed
                evicted.append(digest)
        return evicted

    def gc(self) -> list[str]:
        """Remove every blob no view uses, and what interrupted writes and removals left; the removed digests."""
        removed = [digest for digest in self._digests() if self._remove(digest) is not None]
        with self._lock, os.scandir(self._dir) as entries:
            for entry in entries:
                if entry.name.startswith(_TRASH_PREFIX):
                    shutil.rmtree(entry.path, ignore_errors=True)
                elif entry.name.endswith(_TMP_SUFFIX):
                    Path(entry.path).unlink(missing_ok=True)
                elif _HEX.fullmatch(entry.name) and "sha256:" + entry.name not in self._open:
                    # In use but not open here: no writer of ours is running in it.
                    for leftover in Path(entry.path).glob("*" + _TMP_SUFFIX):
                        leftover.unlink(missing_ok=True)
        return removed

    def blobs(self) -> list[dict[str, Any]]:
        """One dict per cached blob, by digest: digest, size, chunks, present, complete, verified,
        last_used, corrupt, in_use (views using it), disk_usage (bytes). Unknown values are None."""
        result = []
        for digest in self._digests():
            path = self._path(digest)
            with self._lock:
                blob = self._open.get(digest)
                in_use = self._refs.get(digest, 0)
            if blob is not None:
                info = blob.info()
            else:
                meta = _load_meta(path / "meta.json", digest)
                chunks = meta["chunks"] if meta else None
                present = 0
                if chunks is not None:
                    present = sum(b.bit_count() for b in _load_bitmap(path / "present", chunks))
                complete = present == chunks
                info = {
                    "digest": digest, "size": meta["size"] if meta else None, "chunks": chunks,
                    "present": present, "complete": complete,
                    "verified": complete and bool(meta and meta["verified"]),
                    "last_used": meta["last_used"] if meta else None, "corrupt": None,
                }  # fmt: skip
            info["in_use"] = in_use
            info["disk_usage"] = _disk_usage(path)
            result.append(info)
        return result
