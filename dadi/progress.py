"""Progress lines for long work: rewritten in place on a terminal, one line per step otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """One task at a time: start(label), advance(bytes), done(summary). Quiet mode prints nothing."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False, interval: float = 0.2):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = not quiet and self.stream.isatty()
        self.interval = interval
        self._label = ""
        self._bytes = 0
        self._start = 0.0
        self._last_draw = 0.0

    def start(self, label: str) -> None:
        self._label = label
        self._bytes = 0
        self._start = self._last_draw = time.monotonic()
        if self.tty:
            self._draw()

    def advance(self, nbytes: int) -> None:
        self._bytes += nbytes
        if self.tty and time.monotonic() - self._last_draw >= self.interval:
            self._draw()

    def advance_to(self, total: int) -> None:
        """Show `total` bytes done (counted elsewhere, e.g. by a ByteCounter)."""
        self.advance(total - self._bytes)

    def rate(self) -> str:
        """'N MiB at M MiB/s' since start()."""
        return self._rate()

    def _rate(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-6)
        return f"{human_bytes(self._bytes)} at {human_bytes(self._bytes / elapsed)}/s"

    def _draw(self) -> None:
        self._last_draw = time.monotonic()
        self.stream.write(f"\r\x1b[K{self._label}: {self._rate()}")
        self.stream.flush()

    def done(self, summary: str) -> None:
        if self.quiet:
            return
        prefix = "\r\x1b[K" if self.tty else ""
        self.stream.write(f"{prefix}{self._label}: {summary}\n")
        self.stream.flush()

    def note(self, line: str) -> None:
        if not self.quiet:
            self.stream.write(line + "\n")
            self.stream.flush()


class ByteCounter:
    """Counts bytes in a worker thread for the main thread to show (one writer, so no lock)."""

    def __init__(self) -> None:
        self.count = 0

    def advance(self, nbytes: int) -> None:
        self.count += nbytes


class CountingReader:
    """Feeds the number of bytes read into a Progress or a ByteCounter."""

    def __init__(self, stream, progress: Progress | ByteCounter):
        self._stream = stream
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self._progress.advance(len(data))
        return data

    def close(self) -> None:
        self._stream.close()

    def readable(self) -> bool:
        return True
