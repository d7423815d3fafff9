"""The native read path: read-only views served from the chunk cache by C threads (dadi._fastfs).

Why: through the Python file system (dadi.node.fusefs) every read of a view costs a pyfuse3 + trio
round trip, about 90 us through a loop device even when the bytes are in memory. Reading a whole
prefetched image that way took 2.5x as long as the same disk on a plain loop device (tools/bench/mount.py).

How: the daemon mounts a second FUSE file system at ROOT/native, run by libfuse's multi-threaded loop in
C (native/dadi_fastfs.c), with one file per read-only view. The loop device of such a view is attached
to that file. A read whose chunks are all in the local cache and pass their xxh3 check is answered there
(pread, xxh3, lz4); any other read is passed whole to the daemon over ROOT/native.sock (`serve_fallbacks`
below), where the view's Python read path fetches, checks sha256, stores, counts and keeps the read's
deadline as before. Not through the view's file on the Python file system: a thread waiting on a FUSE
request its own process has read cannot be killed, so a SIGKILLed daemon would never finish dying.

Not served here, by design: writable views (their copy-on-write layer lives in Python) and views that
record a trace (the recorder must see every read).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import subprocess
from array import array
from collections.abc import Callable
from pathlib import Path

import trio

from dadi.node.fusefs import read_or_errno
from dadi.node.view import View

log = logging.getLogger(__name__)

# The fallback protocol of native/dadi_fastfs.c (native byte order; each C thread keeps a connection and
# sends its requests on it one at a time).
FALLBACK_REQUEST = struct.Struct("=IIQ")  # name length, length, offset; then the view's name
FALLBACK_REPLY = struct.Struct("=iI")  # errno (0: success), length; then the bytes
# Beyond the view's io timeout, how long the native side waits for an answer before it gives up with
# EIO: the Python read path answers by the deadline, so this only matters if the daemon is wedged.
FALLBACK_SLACK = 10
# Read-ahead on the views' files, KiB: once a view's loop device reads through the page cache, a walk of
# the node benchmark's tree took ~2,300 requests with 1024 against ~6,800 with the kernel's 128, and
# 1.0-1.2 s against 1.2-1.3 s in A/B runs (2026-11-24; tools/bench/mount.py measures the whole).
READ_AHEAD_KB = 1024


def read_ahead_path(mountpoint: Path) -> Path:
    """The sysfs file of the kernel's read-ahead (KiB) on the files of the file system at `mountpoint`."""
    dev = Path(mountpoint).stat().st_dev
    return Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")


def load_native_server():
    """The dadi._fastfs Server class, or None (with the reason logged) when it was not built."""
    try:
        from dadi._fastfs import Server
    except ImportError as e:
        log.warning("native read path unavailable (%s): every view is served from Python; run `make native`", e)
        return None
    return Server


class NativeViews:
    """The native file system of one daemon: `add` a view, attach its loop device to the returned path."""

    def __init__(self, mountpoint: Path, server_class):
        self.mountpoint = Path(mountpoint)
        # A daemon killed with SIGKILL leaves this mount behind, dead, like the Python one.
        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._server = server_class(str(self.mountpoint))
        self._served: set[str] = set()
        self._set_read_ahead(READ_AHEAD_KB)

    def _set_read_ahead(self, kb: int) -> None:
        """What a loop device reading a view through the page cache (dadi.node.loopdev) asks for at once.
        A file takes the value when it is opened, so it is set before any loop device opens a view; a
        failure only costs speed."""
        path = read_ahead_path(self.mountpoint)
        try:
            path.write_text(f"{kb}\n")
        except OSError as e:
            log.warning("native read path: cannot set its read-ahead (%s): %s", path, e.strerror)

    def add(self, view: View, inode: int, fallback_socket: Path) -> Path:
        """Serve `view` (one without a writable layer); reads it cannot answer from the cache go to
        `fallback_socket`, where `serve_fallbacks` answers them with the view's Python read path."""
        starts, ends, layers, offsets = view.index.segment_arrays()
        tables = []
        for layer in view.layers:
            chunks = layer.tables.chunks
            tables.append((
                str(layer.cache.path / "data"),
                layer.tables.chunk_size,
                array("Q", (c.offset for c in chunks)),
                array("I", (c.length for c in chunks)),
                array("I", (c.raw_length for c in chunks)),
                array("Q", (c.xxh3 for c in chunks)),
                bytes(c.compressed for c in chunks),
            ))
        self._server.add(view.name, inode, view.disk_size, view.block_size, starts, ends, layers, offsets,
                         tables, str(fallback_socket), int(view.io_timeout) + FALLBACK_SLACK)
        self._served.add(view.name)
        if all(layer.cache.verified for layer in view.layers):
            self._server.set_complete(view.name)
        return self.mountpoint / view.name

    def set_complete(self, name: str) -> None:
        """Every chunk of the view is in the cache (its layers are verified): reads no longer check the
        cache file for holes before decoding."""
        if name in self._served:
            self._server.set_complete(name)

    def serves(self, name: str) -> bool:
        return name in self._served

    def stats(self, name: str) -> dict:
        """reads, bytes, fallbacks (reads passed to the Python path), errors, chunks (served here)."""
        return self._server.stats(name)

    def remove(self, name: str) -> None:
        """Stop serving a view, if served (waits for its reads in flight)."""
        if name in self._served:
            self._served.discard(name)
            self._server.remove(name)

    def close(self) -> None:
        self._server.close()
        self._served.clear()


async def serve_fallbacks(path: Path, find_view: Callable[[str], View | None], *,
                          task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer the native side's fallback reads on the unix socket `path` (root only) until cancelled."""
    with contextlib.suppress(FileNotFoundError):  # a killed daemon's
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(64)
    task_status.started()

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while await _answer(stream, find_view):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError) as e:
                log.debug("native fallback connection ended early: %s", e)  # the reader gave up (timeout)

    await trio.serve_listeners(answer, [trio.SocketListener(sock)])


async def _answer(stream: trio.SocketStream, find_view: Callable[[str], View | None]) -> bool:
    """Answer one request; False when the native side closed the connection instead of sending one."""
    first = await stream.receive_some(FALLBACK_REQUEST.size)
    if not first:
        return False
    header = first + await _receive_exactly(stream, FALLBACK_REQUEST.size - len(first))
    name_length, length, offset = FALLBACK_REQUEST.unpack(header)
    name = (await _receive_exactly(stream, name_length)).decode(errors="replace")
    view = find_view(name)
    data, error = await read_or_errno(view, offset, length) if view is not None else (b"", errno.EBADF)
    await stream.send_all(FALLBACK_REPLY.pack(error, len(data)))
    if data:
        await stream.send_all(data)
    return True


async def _receive_exactly(stream: trio.SocketStream, count: int) -> bytes:
    data = b""
    while len(data) < count:
        more = await stream.receive_some(count - len(data))
        if not more:
            raise EOFError(f"connection closed after {len(data)} of {count} bytes")
        data += more
    return data
