"""A stream read ahead by a thread: the producer's work (inflate, sha256) overlaps the consumer's (tar parsing).

zlib, zstd and hashlib release the GIL on large buffers, so the two threads really run on two cores.
Together with reading whole layers ahead (dadi.convert.pipeline) it took the Debian test image's
conversion from 3.2 to 3.05 s (tools/bench/convert.py, 2026-11-24).
"""

from __future__ import annotations

import io
import queue
import threading
from typing import BinaryIO

_BLOCK = 1 << 20
_DEPTH = 8  # blocks queued ahead: bounded memory (8 MiB)


class ReadAheadStream(io.RawIOBase):
    """Reads `stream` in a background thread, `_BLOCK` bytes at a time; errors surface on read()."""

    def __init__(self, stream: BinaryIO, name: str = "read-ahead"):
        self._stream = stream
        self._queue: queue.Queue = queue.Queue(maxsize=_DEPTH)
        self._stop = threading.Event()
        self._current = memoryview(b"")
        self._eof = False
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                block = self._stream.read(_BLOCK)
                self._put(block)
                if not block:
                    return
        except BaseException as e:  # handed to the reader, raised there
            self._put(e)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self._current:
            if self._eof:
                return 0
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
                return 0
            self._current = memoryview(item)
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            self._thread.join()
            self._stream.close()
        super().close()


def read_ahead(stream: BinaryIO, name: str = "read-ahead") -> BinaryIO:
    """A buffered reader of `stream` whose reading happens in a background thread."""
    return io.BufferedReader(ReadAheadStream(stream, name), _BLOCK)
