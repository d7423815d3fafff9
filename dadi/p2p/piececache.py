"""The supernode's disk cache: fixed-size pieces of registry blobs, kept across restarts, within a quota.

One directory per blob, ``root/blobs/<sha256 hex>/``:

    data    a sparse file of the blob's size; piece i sits at blob offset i * piece_size
    pieces  the piece map (docs/FORMAT.md, "Supernode piece map"): which pieces `data` holds, the
            xxh3-64 of each, and whether the whole blob was checked against its digest

Why this layout (the node's chunk cache, dadi/node/chunkcache.py, made the same choices for the same
reasons, and lends its file primitives):

- Pieces sit at their blob offsets, so a complete data file *is* the registry's blob byte for byte and
  is checked against its digest once (PieceCache's caller does it, off the request path); a missing
  piece is a hole that costs no disk.
- The supernode knows no chunk tables, so it cannot verify a piece when it arrives (the nodes verify
  every chunk they get from it). What it can do is notice its own disk going bad: the map records each
  piece's xxh3-64 as written, and every read is re-checked against it. A piece that fails drops its
  whole blob: a disk that rots one piece is not trusted with the others, and the registry has them all.
- The map is written only after `data` was fsynced, and replaced atomically (temp file, fsync, rename,
  fsync of the directory). After a crash at any moment, every piece the map holds has its bytes on disk;
  pieces written after the last flush are merely fetched again. A damaged map is treated as empty.
- The last use of a blob (for LRU eviction) is the data file's mtime: written by every piece write, and
  by touch() at most every TOUCH_INTERVAL, so no file of its own is needed.
- Files are opened per read or write, not held: no descriptors to manage across evictions, and an
  open costs microseconds next to a 1 MiB read.

Quota: `reserve()` accounts every piece before it is written (rounded up to the file system block) and
every blob's fixed overhead (directory, map, the map's temp copy, an extent block), evicting whole blobs
least recently used first until the new piece fits; a piece that cannot fit even then is not cached
(the caller still serves it). So the cache directory stays within the quota however much passes
through, also when one blob is larger than the quota. Usage found on disk at start is the larger of
what `du` says and the accounting, so a crash that left unaccounted bytes behind errs towards evicting.

Locks: PieceCache._lock (blobs, usage) is taken before any CachedBlob lock, never after. Within a blob,
_flush_lock serialises map writers (so that an older snapshot never overwrites a newer one) and _lock
guards the in-memory map; neither is held during data IO.

One process owns a cache directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

from dadi.digests import check_digest
from dadi.errors import DadiError

# The node's chunk cache has the same crash-safety rules; its file primitives are reused as they are.
from dadi.node.chunkcache import _disk_usage, _fsync_dir, _pread_exact, _pwrite_all, _write_atomic

log = logging.getLogger(__name__)

# Why 1 MiB (docs/ARCHITECTURE.md, "Supernode"): a node asks for up to 4 MiB of coalesced 64 KiB chunks
# at a time, so a request spans one to five pieces; one registry round trip per MiB keeps the request
# overhead small against the transfer (8 ms at 1 Gbit/s) while a cold 64 KiB read costs at most one piece
# from the registry, fetched once for every node that wants it; the piece map stays tiny (9 bytes per
# MiB); and single-flight has one entry per MiB in flight, not per chunk.
PIECE_SIZE = 1 << 20

MAP_MAGIC = b"DADIPMP\x00"
MAP_VERSION = 1
SUPPORTED_MAP_VERSIONS = (1,)
_MAP_HEADER = struct.Struct("<8sHHIQQ")  # magic, version, flags, piece_size, blob_size, piece_count
_MAP_TRAILER = struct.Struct("<Q")  # xxh3-64 of everything before it
FLAG_VERIFIED = 1

# Puts between map flushes: a flush costs two fsyncs; a crash loses at most this many pieces (16 MiB),
# which are fetched again. The supernode also flushes every few seconds (flush_all).
FLUSH_EVERY = 16
TOUCH_INTERVAL = 5.0  # seconds: the last-use time only orders blobs for eviction
_BLOCK = 4096  # the file system's allocation unit, for the accounting
_HASH_BLOCK = 1 << 20
_TMP_SUFFIX = ".tmp"
_TRASH_PREFIX = ".trash-"
_HEX = re.compile(r"[0-9a-f]{64}")


class CacheGone(DadiError):
    """The blob was evicted or dropped from the cache while it was being read or written."""


class CorruptPiece(DadiError):
    """A cached piece no longer matches the xxh3 recorded when it was written (disk rot, torn write)."""


def _round_up(n: int) -> int:
    return -(-n // _BLOCK) * _BLOCK


def piece_count(blob_size: int, piece_size: int = PIECE_SIZE) -> int:
    return -(-blob_size // piece_size)


def pieces_spanning(start: int, end: int, piece_size: int = PIECE_SIZE) -> range:
    """The indexes of the pieces holding blob bytes [start, end) (end exclusive, end > start)."""
    return range(start // piece_size, (end - 1) // piece_size + 1)


def _map_size(count: int) -> int:
    return _MAP_HEADER.size + (count + 7) // 8 + 8 * count + _MAP_TRAILER.size


def _encode_map(piece_size: int, blob_size: int, bits: bytes, hashes: list[int], verified: bool) -> bytes:
    count = len(hashes)
    body = (
        _MAP_HEADER.pack(MAP_MAGIC, MAP_VERSION, FLAG_VERIFIED if verified else 0, piece_size, blob_size, count)
        + bits
        + struct.pack(f"<{count}Q", *hashes)
    )
    return body + _MAP_TRAILER.pack(xxhash.xxh3_64_intdigest(body))


def _decode_map(data: bytes, piece_size: int, blob_size: int) -> tuple[bytearray, list[int], bool] | None:
    """(bits, hashes, verified) of a map written for this piece and blob size; None if it is not one."""
    count = piece_count(blob_size, piece_size)
    if len(data) != _map_size(count):
        return None
    magic, version, flags, p_size, b_size, p_count = _MAP_HEADER.unpack_from(data)
    (checksum,) = _MAP_TRAILER.unpack_from(data, len(data) - _MAP_TRAILER.size)
    if (
        magic != MAP_MAGIC
        or version not in SUPPORTED_MAP_VERSIONS
        or flags & ~FLAG_VERIFIED
        or (p_size, b_size, p_count) != (piece_size, blob_size, count)
        or xxhash.xxh3_64_intdigest(data[: -_MAP_TRAILER.size]) != checksum
    ):
        return None
    bits_end = _MAP_HEADER.size + (count + 7) // 8
    bits = bytearray(data[_MAP_HEADER.size : bits_end])
    if count % 8 and bits[-1] >> (count % 8):
        return None  # bits past the last piece: not a map this code wrote
    hashes = list(struct.unpack_from(f"<{count}Q", data, bits_end))
    return bits, hashes, bool(flags & FLAG_VERIFIED)


class CachedBlob:
    """The cached pieces of one blob; get it from PieceCache.get. Safe to use from threads."""

    def __init__(self, path: Path, digest: str, size: int, piece_size: int, clock: Callable[[], float]):
        self.path = path
        self.digest = digest
        self.size = size
        self.piece_size = piece_size
        self.count = piece_count(size, piece_size)
        self._clock = clock
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._retired = False
        path.mkdir(parents=True, exist_ok=True)
        for leftover in path.glob("*" + _TMP_SUFFIX):  # from a crash mid-write; nobody else writes here
            leftover.unlink(missing_ok=True)
        decoded = None
        with contextlib.suppress(FileNotFoundError):
            decoded = _decode_map((path / "pieces").read_bytes(), piece_size, size)
            if decoded is None:
                log.warning("piece cache %s: piece map damaged or of another geometry; starting empty", path)
        if decoded is None:
            decoded = bytearray((self.count + 7) // 8), [0] * self.count, False
        self._bits, self._hashes, self._verified = decoded
        self._present = sum(b.bit_count() for b in self._bits)
        self._changes = self._flushed = 0
        self._puts_since_flush = 0
        data = path / "data"
        if not data.exists() or data.stat().st_size != size:
            with open(data, "ab") as f:
                f.truncate(size)  # sparse: holes take no disk space
        self.last_used = data.stat().st_mtime
        self._touched = self.last_used
        # Bytes of the cache's quota this blob holds; PieceCache keeps it, under its own lock.
        self.accounted = 0

    # --- state -----------------------------------------------------------------------------------

    @property
    def present(self) -> int:
        return self._present

    @property
    def complete(self) -> bool:
        return self._present == self.count

    @property
    def verified(self) -> bool:
        """Complete, and the data file hashed to the digest (set by verify())."""
        return self.complete and self._verified

    def has(self, index: int) -> bool:
        self._check_index(index)
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def span(self, index: int) -> tuple[int, int]:
        """(blob offset, length) of piece `index`; the last piece may be shorter."""
        self._check_index(index)
        offset = index * self.piece_size
        return offset, min(self.piece_size, self.size - offset)

    def estimate(self) -> int:
        """Bytes on disk this blob takes by the accounting rules (see the module docstring)."""
        with self._lock:
            present = [i for i in range(self.count) if self._bits[i >> 3] & (1 << (i & 7))]
        return blob_overhead(self.count) + sum(_round_up(self.span(i)[1]) for i in present)

    def info(self) -> dict[str, Any]:
        return {
            "digest": self.digest, "size": self.size, "pieces": self.count, "present": self.present,
            "complete": self.complete, "verified": self.verified, "last_used": self.last_used,
            "accounted": self.accounted,
        }  # fmt: skip

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise IndexError(f"{self.digest}: piece {index} is not in [0, {self.count})")

    # --- pieces ----------------------------------------------------------------------------------

    def read(self, index: int) -> bytes | None:
        """The cached bytes of piece `index`; None when it is not cached. CorruptPiece when its bytes
        no longer match (the caller drops the blob), CacheGone when the blob went away meanwhile."""
        offset, length = self.span(index)
        with self._lock:
            if self._retired:
                raise CacheGone(f"{self.digest}: no longer in the piece cache")
            if not self._bits[index >> 3] & (1 << (index & 7)):
                return None
            expected = self._hashes[index]
        try:
            fd = os.open(self.path / "data", os.O_RDONLY)
        except FileNotFoundError:
            raise CacheGone(f"{self.digest}: no longer in the piece cache") from None
        try:
            data = _pread_exact(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length or xxhash.xxh3_64_intdigest(data) != expected:
            raise CorruptPiece(
                f"piece cache {self.path}: piece {index} at blob offset {offset} fails its xxh3 check"
            )
        self.touch()
        return data

    def write(self, index: int, data: bytes) -> bool:
        """Cache the bytes of piece `index`; True when the blob is complete with it. The caller has
        reserved the space (PieceCache.store does both). CacheGone when the blob went away."""
        offset, length = self.span(index)
        if len(data) != length:
            raise ValueError(f"{self.digest}: piece {index} has {length} bytes, got {len(data)}")
        with self._lock:
            if self._retired:
                raise CacheGone(f"{self.digest}: no longer in the piece cache")
        try:
            fd = os.open(self.path / "data", os.O_WRONLY)
        except FileNotFoundError:
            raise CacheGone(f"{self.digest}: no longer in the piece cache") from None
        try:
            _pwrite_all(fd, data, offset)
        finally:
            os.close(fd)
        checksum = xxhash.xxh3_64_intdigest(data)
        with self._lock:
            byte, mask = index >> 3, 1 << (index & 7)
            if not self._bits[byte] & mask:
                self._bits[byte] |= mask
                self._present += 1
            self._hashes[index] = checksum
            self._changes += 1
            self._puts_since_flush += 1
            complete = self._present == self.count
            due = complete or self._puts_since_flush >= FLUSH_EVERY
            self.last_used = self._touched = self._clock()  # the write set the data file's mtime
        if due:
            self.flush()
        return complete

    def forget(self, index: int) -> None:
        """Mark piece `index` absent (its bytes stay where they are until overwritten)."""
        with self._lock:
            byte, mask = index >> 3, 1 << (index & 7)
            if self._bits[byte] & mask:
                self._bits[byte] &= ~mask
                self._present -= 1
                self._verified = False
                self._changes += 1

    def flush(self) -> None:
        """Make the pieces written so far durable, then record them in the map (in this order)."""
        with self._flush_lock:
            with self._lock:
                if self._retired or self._changes == self._flushed:
                    return
                # Bits set before this snapshot belong to writes that have returned: the fsync covers them.
                changes, bits, hashes, verified = self._changes, bytes(self._bits), list(self._hashes), self._verified
                self._puts_since_flush = 0
            try:
                fd = os.open(self.path / "data", os.O_RDONLY)
            except FileNotFoundError:
                return  # removed under us (retired meanwhile): nothing to record
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _write_atomic(self.path / "pieces", _encode_map(self.piece_size, self.size, bits, hashes, verified))
            with self._lock:
                self._flushed = changes

    def verify(self) -> bool:
        """Hash the whole data file against the digest; True (and recorded) when it matches. False when
        pieces are missing or the bytes are wrong: the caller drops the blob then."""
        if not self.complete:
            return False
        digest = hashlib.sha256()
        try:
            fd = os.open(self.path / "data", os.O_RDONLY)
        except FileNotFoundError:
            raise CacheGone(f"{self.digest}: no longer in the piece cache") from None
        try:
            for offset in range(0, self.size, _HASH_BLOCK):
                digest.update(_pread_exact(fd, min(_HASH_BLOCK, self.size - offset), offset))
        finally:
            os.close(fd)
        if "sha256:" + digest.hexdigest() != self.digest:
            return False
        with self._lock:
            self._verified = True
            self._changes += 1
        self.flush()
        return True

    def touch(self) -> None:
        """Record a use, for LRU eviction; persisted (the data file's mtime) at most every TOUCH_INTERVAL."""
        now = self._clock()
        with self._lock:
            self.last_used = now
            if now - self._touched < TOUCH_INTERVAL or self._retired:
                return
            self._touched = now
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path / "data", (now, now))

    def retire(self, *, flush: bool) -> None:
        """Stop for good: once this returns, no map write of this object runs or can start, so its
        directory can be removed (and a new blob created under the same name)."""
        if flush:
            self.flush()
        with self._flush_lock, self._lock:
            self._retired = True


def blob_overhead(count: int) -> int:
    """Disk a blob takes besides its pieces: its directory, the map and the map's temporary copy while it
    is replaced, and one extent block for a fragmented sparse data file."""
    return _BLOCK + 2 * _round_up(_map_size(count)) + _BLOCK


class PieceCache:
    """Every cached blob under root/blobs/, the quota accounting, and LRU eviction (module docstring).

    quota: bytes of disk, or None for no limit. on_evict(digest, reason) is told about every blob that
    leaves the cache ("quota", or the reason given to drop()).
    """

    def __init__(
        self,
        root: Path,
        quota: int | None = None,
        *,
        piece_size: int = PIECE_SIZE,
        clock: Callable[[], float] = time.time,
        on_evict: Callable[[str, str], None] | None = None,
    ):
        if quota is not None and quota < 0:
            raise ValueError(f"piece cache quota must be >= 0 bytes, not {quota}")
        if piece_size <= 0 or piece_size % _BLOCK:
            raise ValueError(f"piece size must be a positive multiple of {_BLOCK}, not {piece_size}")
        self.root = Path(root)
        self.quota = quota
        self.piece_size = piece_size
        self._clock = clock
        self._on_evict = on_evict
        self._dir = self.root / "blobs"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._blobs: dict[str, CachedBlob] = {}
        self._used = self._dir_blocks()
        self._load()
        if quota is not None and self._used > quota:
            with self._lock:
                self._evict_locked(self._used - quota, keep=None)

    # --- start --------------------------------------------------------------------------------------

    def _dir_blocks(self) -> int:
        return sum(p.lstat().st_blocks * 512 for p in (self.root, self._dir))

    def _load(self) -> None:
        """Adopt what earlier runs left; remove what interrupted removals left."""
        with os.scandir(self._dir) as entries:
            names = [(e.name, e.path) for e in entries]
        for name, path in names:
            if name.startswith(_TRASH_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
            elif _HEX.fullmatch(name) and os.path.isdir(path):
                data = Path(path) / "data"
                try:
                    size = data.stat().st_size
                except FileNotFoundError:
                    shutil.rmtree(path, ignore_errors=True)  # never got its data file: nothing in it
                    continue
                digest = "sha256:" + name
                blob = CachedBlob(Path(path), digest, size, self.piece_size, self._clock)
                blob.accounted = max(_disk_usage(Path(path)), blob.estimate())
                self._blobs[digest] = blob
                self._used += blob.accounted
            else:
                log.warning("piece cache %s: ignoring %s, which is not a blob directory", self._dir, name)

    # --- blobs --------------------------------------------------------------------------------------

    def _path(self, digest: str) -> Path:
        return self._dir / check_digest(digest, "piece cache")[len("sha256:") :]

    def lookup(self, digest: str) -> CachedBlob | None:
        with self._lock:
            return self._blobs.get(digest)

    def get(self, digest: str, size: int) -> CachedBlob | None:
        """The cache of blob `digest` (`size` bytes, as the registry says), created empty when absent.
        None when the quota has no room even for an empty blob. A blob cached under another size is
        dropped first: the digest names one content, so one of the two sizes is wrong."""
        if size < 0:
            raise ValueError(f"{digest}: blob size {size}")
        path = self._path(digest)
        with self._lock:
            blob = self._blobs.get(digest)
            if blob is not None and blob.size == size:
                return blob
        if blob is not None:
            log.warning("piece cache: %s is cached as %d bytes, but the registry says %d; dropping it",
                        digest, blob.size, size)  # fmt: skip
            self.drop(digest, "size")
        with self._lock:
            blob = self._blobs.get(digest)
            if blob is not None:  # another thread created it meanwhile
                return blob
            overhead = blob_overhead(piece_count(size, self.piece_size))
            if not self._make_room_locked(overhead, keep=None):
                return None
            try:
                blob = CachedBlob(path, digest, size, self.piece_size, self._clock)
            except BaseException:
                self._used -= overhead
                raise
            blob.accounted = overhead
            self._blobs[digest] = blob
            return blob

    def store(self, blob: CachedBlob, index: int, data: bytes) -> str:
        """Write piece `index` of `blob` if the quota has room: "stored", "complete" (stored, and the
        blob has every piece now), "no_room" or "gone" (the blob was evicted meanwhile)."""
        _, length = blob.span(index)
        need = 0 if blob.has(index) else _round_up(length)
        with self._lock:
            if self._blobs.get(blob.digest) is not blob:
                return "gone"
            if not self._make_room_locked(need, keep=blob.digest):
                return "no_room"
            blob.accounted += need
        try:
            complete = blob.write(index, data)
        except CacheGone:
            return "gone"  # evicted meanwhile; its accounting went with it
        except BaseException:
            with self._lock:
                if self._blobs.get(blob.digest) is blob:
                    blob.accounted -= need
                    self._used -= need
            raise
        return "complete" if complete else "stored"

    def drop(self, digest: str, reason: str, *, only: CachedBlob | None = None) -> bool:
        """Remove a blob now (a bad piece, a wrong digest); False when it was not cached. With `only`,
        only if the cached blob is still that object (not one created anew after an eviction)."""
        with self._lock:
            if only is not None and self._blobs.get(digest) is not only:
                return False
            return self._remove_locked(digest, reason)

    # --- quota --------------------------------------------------------------------------------------

    @property
    def usage(self) -> int:
        """Bytes of disk the cache takes, by the accounting (at least what `du` says)."""
        return self._used

    def _make_room_locked(self, need: int, keep: str | None) -> bool:
        """Account `need` more bytes, evicting least recently used blobs (never `keep`) as needed."""
        if self.quota is not None and self._used + need > self.quota:
            self._evict_locked(self._used + need - self.quota, keep)
            if self._used + need > self.quota:
                return False
        self._used += need
        return True

    def _evict_locked(self, amount: int, keep: str | None) -> None:
        victims = sorted((b.last_used, d) for d, b in self._blobs.items() if d != keep)
        freed = 0
        for _, digest in victims:
            if freed >= amount:
                break
            before = self._used
            self._remove_locked(digest, "quota")
            freed += before - self._used

    def _remove_locked(self, digest: str, reason: str) -> bool:
        blob = self._blobs.pop(digest, None)
        if blob is None:
            return False
        blob.retire(flush=False)
        self._used -= blob.accounted
        # Renamed first, so that a crash during the removal leaves a trash directory (removed at the next
        # start), not a half-deleted blob.
        trash = self._dir / f"{_TRASH_PREFIX}{blob.path.name}-{threading.get_ident()}"
        try:
            blob.path.rename(trash)
            _fsync_dir(self._dir)
        except FileNotFoundError:
            pass
        else:
            shutil.rmtree(trash, ignore_errors=True)
        log.info("piece cache: removed %s (%s; %d of %d pieces)", digest, reason, blob.present, blob.count)
        if self._on_evict is not None:
            self._on_evict(digest, reason)
        return True

    # --- housekeeping -------------------------------------------------------------------------------

    def flush_all(self) -> None:
        with self._lock:
            blobs = list(self._blobs.values())
        for blob in blobs:
            blob.flush()

    def close(self) -> None:
        """Flush every blob's map. The cache can still be used (close is for shutdown)."""
        self.flush_all()

    def blobs(self) -> list[dict[str, Any]]:
        with self._lock:
            blobs = sorted(self._blobs.values(), key=lambda b: b.digest)
        return [b.info() for b in blobs]
