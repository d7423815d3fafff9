"""A container's private writable layer: block-level copy-on-write over the read-only image disk.

Why block level and not overlayfs: a container sees one virtual ext4 disk (the image's layers merged by
the index) through a loop device. Its writes arrive as block writes to that disk, so the natural place to
keep them is under the block device: the read-only layers stay shared and untouched, no upper directory or
whiteouts exist, and the container gets an ordinary ext4 whose own metadata describes its changes. A file
system over the loop device never knows it is layered.

Layout of the layer's directory:
- `data`: a sparse file of exactly `disk_size` bytes. A block this layer holds sits at its own disk
  offset, so no mapping table is needed (the file system below keeps the extent map for us) and reading
  a run of written blocks is one pread.
- `blocks`: a bitmap with one bit per disk block (bit `b & 7` of byte `b >> 3`): set = this layer holds
  the block. Unset blocks come from the lower layers. A 64 GiB disk of 4 KiB blocks has 16 M blocks, a
  2 MiB bitmap, kept in memory.
- `meta`: magic, version and geometry; written last when a layer is created, so a directory without it is
  an interrupted creation and is made afresh.

Crash consistency (write-ahead order): `flush` takes a snapshot of the bitmap, fsyncs `data`, and only
then replaces `blocks` atomically (temp file, fsync, rename, fsync directory). Every bit in the snapshot
was set after its block's pwrite returned, so before that fsync began: after a crash, every block marked
in `blocks` holds the data it was marked for. Blocks written after the last flush are not marked, read
from the lower layers again, and so look exactly like writes a disk lost from its volatile cache, which is
what the file system on top is built to survive (it flushes when it needs durability). An unflushed
overwrite of a block already marked may or may not have landed, as on a real disk.

Bits are only ever set, never cleared (a punched hole keeps its bit: it must read as zeros, not as the
lower layers' data). That monotony is what makes the copy-up below simple: once a block is seen written
it stays written.

Partial blocks are completed before they are written (copy-up): from this layer if it holds the block,
else from the lower layers through the caller's `read_lower`, so that a marked block is always whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from dadi.errors import DadiError

ReadLower = Callable[[int, int], bytes]  # (disk offset, length) -> bytes of the layers below

DATA_NAME = "data"
BLOCKS_NAME = "blocks"
META_NAME = "meta"
_TMP_SUFFIX = ".tmp"

_META = struct.Struct("<8sHHIQ")  # magic, version, flags (0), block_size, disk_size
_META_MAGIC = b"DADIWRL\0"
_META_VERSION = 1

# Copy-up is serialized per block through a fixed set of striped locks: enough stripes that unrelated
# concurrent writes rarely share one, few enough that a large write can take them all cheaply.
_STRIPES = 64
# runs() looks at the bitmap through Python ints of this many bits, so that each run it finds costs
# a bounded amount of work however large the range is.
_WINDOW_BITS = 1 << 15
# Zeros are written in pieces of this size where punching holes is not supported.
_ZERO_PIECE = 1 << 20

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _load_fallocate() -> Callable[..., int] | None:
    """libc's fallocate64 (Python's os module has no fallocate with a mode), or None off glibc/Linux."""
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate64
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    return fallocate


_fallocate = _load_fallocate()


class WritableLayer:
    """Block-level copy-on-write storage of one container's writes, persisted in a directory.

    Thread safe: reads, writes and flushes may come from several threads at once.
    """

    def __init__(self, directory: Path, disk_size: int, block_size: int = 4096):
        _check_geometry(disk_size, block_size)
        self.directory = Path(directory)
        self.disk_size = disk_size
        self.block_size = block_size
        self.block_count = disk_size // block_size
        self._bitmap_lock = threading.Lock()  # guards the bitmap, the counters and the dirty flags
        self._flush_lock = threading.Lock()  # one flush at a time: snapshots land in order
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._bitmap_dirty = False  # bits set since the last persisted snapshot
        self._data_dirty = False  # pwrites since the last fsync of data
        self._closed = False
        self.directory.mkdir(parents=True, exist_ok=True)
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        self._data_fd = -1
        try:
            self._lock_directory()
            if _exists(self._dir_fd, META_NAME):
                self._bits = self._open_existing()
            else:
                self._bits = self._create()
            self._written = int.from_bytes(self._bits, "little").bit_count()
        except BaseException:
            self._close_fds()
            raise

    # -- opening -----------------------------------------------------------------------------------

    def _lock_directory(self) -> None:
        # Two daemons (or two mounts) sharing a layer would overwrite each other's bitmap.
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DadiError(f"writable layer {self.directory} is in use by another mount") from None

    def _bitmap_length(self) -> int:
        return (self.block_count + 7) // 8

    def _create(self) -> bytearray:
        """Make a fresh layer: data and bitmap first, meta last (its presence marks a complete layer)."""
        expected = {DATA_NAME, BLOCKS_NAME, DATA_NAME + _TMP_SUFFIX, BLOCKS_NAME + _TMP_SUFFIX}
        expected.add(META_NAME + _TMP_SUFFIX)
        strangers = sorted(set(os.listdir(self._dir_fd)) - expected)
        if strangers:
            raise DadiError(
                f"{self.directory} is not a writable layer (no {META_NAME}, but holds {strangers[0]!r})"
            )
        self._data_fd = os.open(DATA_NAME, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=self._dir_fd)
        os.ftruncate(self._data_fd, self.disk_size)  # sparse: costs nothing until blocks are written
        os.fsync(self._data_fd)
        bits = bytearray(self._bitmap_length())
        self._replace_file(BLOCKS_NAME, bytes(bits))
        meta = _META.pack(_META_MAGIC, _META_VERSION, 0, self.block_size, self.disk_size)
        self._replace_file(META_NAME, meta)
        return bits

    def _open_existing(self) -> bytearray:
        """Reopen a layer made before; refuse one made for another disk or one that is damaged."""
        meta = _read_file(self._dir_fd, META_NAME)
        if len(meta) != _META.size:
            raise DadiError(f"{self.directory / META_NAME}: {len(meta)} bytes, expected {_META.size}")
        magic, version, flags, block_size, disk_size = _META.unpack(meta)
        if magic != _META_MAGIC or version != _META_VERSION or flags != 0:
            raise DadiError(f"{self.directory / META_NAME}: not a version {_META_VERSION} writable layer")
        if (disk_size, block_size) != (self.disk_size, self.block_size):
            raise DadiError(
                f"writable layer {self.directory} was made for a disk of {disk_size} bytes in blocks of "
                f"{block_size}, not {self.disk_size} bytes in blocks of {self.block_size}"
            )
        self._data_fd = os.open(DATA_NAME, os.O_RDWR, dir_fd=self._dir_fd)
        size = os.fstat(self._data_fd).st_size
        if size != self.disk_size:
            raise DadiError(f"{self.directory / DATA_NAME}: {size} bytes, expected {self.disk_size}")
        bits = bytearray(_read_file(self._dir_fd, BLOCKS_NAME))
        if len(bits) != self._bitmap_length():
            raise DadiError(
                f"{self.directory / BLOCKS_NAME}: {len(bits)} bytes, expected {self._bitmap_length()}"
            )
        spare = self.block_count % 8
        if spare and bits[-1] >> spare:
            raise DadiError(f"{self.directory / BLOCKS_NAME}: marks blocks past the end of the disk")
        return bits

    # -- queries -----------------------------------------------------------------------------------

    def runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Tile [offset, offset + length) into (offset, length, written) runs, alternating.

        written = this layer holds those bytes (read them with `read`); otherwise they come from the
        layers below. Runs follow block boundaries, except that the first and last are clipped to the range.
        """
        self._check_range(offset, length)
        if not length:
            return []
        end = offset + length
        bs = self.block_size
        out: list[tuple[int, int, bool]] = []
        for block, count, written in self._block_runs(offset // bs, -(-end // bs)):
            start = max(offset, block * bs)
            stop = min(end, (block + count) * bs)
            out.append((start, stop - start, written))
        return out

    def is_written(self, offset: int, length: int) -> bool:
        """Whether this layer holds every block touching [offset, offset + length)."""
        return all(written for _, _, written in self.runs(offset, length))

    def read(self, offset: int, length: int) -> bytes:
        """The bytes of this layer at [offset, offset + length); meaningful only where runs() says written."""
        self._check_range(offset, length)
        return _pread_exact(self._data_fd, offset, length)

    def read_through(self, offset: int, length: int, read_lower: ReadLower) -> bytes:
        """The merged view: written runs from this layer, the rest from `read_lower(offset, length)`."""
        parts = []
        for start, size, written in self.runs(offset, length):
            part = self.read(start, size) if written else read_lower(start, size)
            if len(part) != size:
                raise ValueError(f"lower layers returned {len(part)} bytes at {start}, expected {size}")
            parts.append(part)
        return b"".join(parts)

    def written_bytes(self) -> int:
        """Bytes of the disk this layer holds (whole blocks, punched ones included)."""
        with self._bitmap_lock:
            return self._written * self.block_size

    # -- changes -----------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes, read_lower: ReadLower) -> None:
        """Write `data` at disk `offset`, completing partial edge blocks first (copy-up)."""
        self._check_range(offset, len(data))
        if not data:
            return
        bs = self.block_size
        end = offset + len(data)
        first, stop = offset // bs, -(-end // bs)
        edges = {b for b, partial in ((first, offset % bs), (stop - 1, end % bs)) if partial}
        # Fetch the lower bytes of the edges before taking any lock: that may be a network fetch, and
        # a lower layer never changes, so the bytes cannot go stale while we wait for the lock.
        lower = {b: _lower_block(read_lower, b * bs, bs) for b in sorted(edges) if not self._test(b)}
        with self._block_locks(first, stop):
            if not edges:
                _pwrite_all(self._data_fd, offset, data)
            else:
                base = first * bs
                buf = bytearray((stop - first) * bs)
                for b in edges:
                    # A block seen unwritten may have been written since; bits never clear, so a
                    # block that was written when we looked still is.
                    whole = _pread_exact(self._data_fd, b * bs, bs) if self._test(b) else lower[b]
                    buf[b * bs - base : (b + 1) * bs - base] = whole
                buf[offset - base : end - base] = data
                _pwrite_all(self._data_fd, base, buf)
            self._mark(first, stop)

    def punch_hole(self, offset: int, length: int, read_lower: ReadLower) -> None:
        """Make [offset, offset + length) read as zeros, as fallocate(PUNCH_HOLE) promises for a file.

        The loop driver sends discards and write-zeroes of the disk as hole punches to its backing file,
        so the range must read as zeros afterwards, not as the lower layers' data: the blocks stay marked
        and their space in `data` is given back. Partial edge blocks are written with zeros (copy-up).
        """
        self._check_range(offset, length)
        bs = self.block_size
        end = offset + length
        first, stop = -(-offset // bs), end // bs  # the whole blocks inside the range
        if first >= stop:
            self.write(offset, bytes(length), read_lower)
            return
        if offset < first * bs:
            self.write(offset, bytes(first * bs - offset), read_lower)
        if end > stop * bs:
            self.write(stop * bs, bytes(end - stop * bs), read_lower)
        with self._block_locks(first, stop):
            _zero_range(self._data_fd, first * bs, (stop - first) * bs)
            self._mark(first, stop)

    def flush(self) -> None:
        """Make every write that returned before this call durable, in write-ahead order."""
        self._check_open()
        with self._flush_lock:
            with self._bitmap_lock:
                data_dirty, bitmap_dirty = self._data_dirty, self._bitmap_dirty
                # The snapshot is taken before the fsync below, so every block it marks was
                # pwritten before that fsync started.
                snapshot = bytes(self._bits) if bitmap_dirty else None
                self._data_dirty = self._bitmap_dirty = False
            try:
                if data_dirty:
                    os.fsync(self._data_fd)
                if snapshot is not None:
                    self._replace_file(BLOCKS_NAME, snapshot)
            except BaseException:
                with self._bitmap_lock:  # not persisted: the next flush must try again
                    self._data_dirty |= data_dirty
                    self._bitmap_dirty |= bitmap_dirty
                raise

    def close(self) -> None:
        """Flush and release the layer (and its directory lock). Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._close_fds()

    def __enter__(self) -> WritableLayer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- bitmap ------------------------------------------------------------------------------------

    def _test(self, block: int) -> bool:
        # One byte read: atomic under the GIL, and a stale 0 is handled by the caller (bits only get set).
        return bool(self._bits[block >> 3] >> (block & 7) & 1)

    def _mark(self, first: int, stop: int) -> None:
        """Set the bits of blocks [first, stop), after their data was written."""
        lo, hi = first >> 3, (stop + 7) >> 3
        mask = ((1 << (stop - first)) - 1) << (first - (lo << 3))
        with self._bitmap_lock:
            old = int.from_bytes(self._bits[lo:hi], "little")
            new = old | mask
            if new != old:
                self._bits[lo:hi] = new.to_bytes(hi - lo, "little")
                self._written += (new ^ old).bit_count()
                self._bitmap_dirty = True
            self._data_dirty = True

    def _block_runs(self, first: int, stop: int) -> Iterator[tuple[int, int, bool]]:
        """Maximal (block, count, written) runs of blocks [first, stop), in order."""
        run_start, run_written = first, None
        for lo in range(first, stop, _WINDOW_BITS):
            hi = min(stop, lo + _WINDOW_BITS)
            bits = self._window(lo, hi)
            pos = 0
            while pos < hi - lo:
                rest = bits >> pos
                written = bool(rest & 1)
                # Length of the run of equal bits at the bottom of `rest`: its trailing ones or zeros.
                if written:
                    length = _trailing_zeros(~rest)
                elif rest:
                    length = _trailing_zeros(rest)
                else:
                    length = hi - lo - pos
                if written != run_written:
                    if run_written is not None:
                        yield run_start, lo + pos - run_start, run_written
                    run_start, run_written = lo + pos, written
                pos += length
        if run_written is not None:
            yield run_start, stop - run_start, run_written

    def _window(self, first: int, stop: int) -> int:
        """The bits of blocks [first, stop) as an int: bit i is block first + i."""
        lo, hi = first >> 3, (stop + 7) >> 3
        with self._bitmap_lock:
            raw = int.from_bytes(self._bits[lo:hi], "little")
        return (raw >> (first - (lo << 3))) & ((1 << (stop - first)) - 1)

    @contextlib.contextmanager
    def _block_locks(self, first: int, stop: int) -> Iterator[None]:
        """Hold the stripe locks of blocks [first, stop), taken in one global order (no deadlock)."""
        if stop - first >= _STRIPES:
            stripes = range(_STRIPES)
        else:
            stripes = sorted({b % _STRIPES for b in range(first, stop)})
        with contextlib.ExitStack() as stack:
            for s in stripes:
                stack.enter_context(self._stripes[s])
            yield

    # -- files -------------------------------------------------------------------------------------

    def _replace_file(self, name: str, payload: bytes) -> None:
        """Replace `name` in the layer directory atomically and durably with `payload`."""
        tmp = name + _TMP_SUFFIX
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=self._dir_fd)
        try:
            _pwrite_all(fd, 0, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        os.fsync(self._dir_fd)

    def _check_range(self, offset: int, length: int) -> None:
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self.disk_size:
            raise ValueError(
                f"range [{offset}, {offset + length}) is outside the disk of {self.disk_size} bytes"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"writable layer {self.directory} is closed")

    def _close_fds(self) -> None:
        for fd in (self._data_fd, self._dir_fd):  # closing the directory releases its flock
            if fd >= 0:
                os.close(fd)
        self._data_fd = self._dir_fd = -1


def _check_geometry(disk_size: int, block_size: int) -> None:
    if block_size < 512 or block_size > 65536 or block_size & (block_size - 1):
        raise ValueError(f"block size {block_size} is not a power of two in [512, 65536]")
    if disk_size <= 0 or disk_size % block_size:
        raise ValueError(f"disk size {disk_size} is not a positive multiple of the block size {block_size}")


def _trailing_zeros(x: int) -> int:
    """Trailing zero bits of a non-zero int (for a negative one, ~x's trailing ones)."""
    return (x & -x).bit_length() - 1


def _lower_block(read_lower: ReadLower, offset: int, size: int) -> bytes:
    block = read_lower(offset, size)
    if len(block) != size:
        raise ValueError(f"lower layers returned {len(block)} bytes at {offset}, expected {size}")
    return block


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _read_file(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    with open(fd, "rb") as f:  # closes fd
        return f.read()


def _pread_exact(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]  # a short read is legal (signals); the file is never shorter than the disk
    got = len(data)
    while got < length:
        part = os.pread(fd, length - got, offset + got)
        if not part:
            raise OSError(errno.EIO, f"short read at {offset + got}")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _pwrite_all(fd: int, offset: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done


def _zero_range(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset + length) of the file zeros: punch a hole, or write zeros where unsupported."""
    if _fallocate is not None:
        if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")
    zeros = bytes(min(length, _ZERO_PIECE))
    end = offset + length
    while offset < end:
        piece = min(len(zeros), end - offset)
        _pwrite_all(fd, offset, zeros[:piece] if piece < len(zeros) else zeros)
        offset += piece
