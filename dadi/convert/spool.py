"""Where a layer's file contents wait for debugfs, which copies each one from a host file.

A layer of a few thousand small files means a few thousand file creations. On a disk file system with
cold metadata (a build machine, a dropped page cache) one creation measured ~280 us here, on tmpfs ~9 us:
for the Debian test image that was a second of a four-second conversion (tools/bench/convert.py,
2026-11-24: 4.2 s with the spool on disk, 3.2 s on tmpfs). So files go
to a tmpfs directory until a memory budget is used up, then to the work directory on disk. Each layer
has its own Spool; `close` removes what it wrote, in memory and on disk.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Budget default: at most this much, and at most a quarter of what the tmpfs has free.
DEFAULT_MEMORY_BUDGET = 1 << 30
SHM = Path("/dev/shm")
ENV_BUDGET = "DADI_SPOOL_MEMORY"  # bytes of tmpfs a conversion may use; 0 spools to disk only


def memory_budget() -> int:
    """Bytes of tmpfs one conversion may use for spooling (0 when there is no usable tmpfs)."""
    raw = os.environ.get(ENV_BUDGET)
    if raw is not None:
        try:
            return max(0, int(raw))
        except ValueError:
            return 0
    if not (SHM.is_dir() and os.access(SHM, os.W_OK)):
        return 0
    stat = os.statvfs(SHM)
    return min(DEFAULT_MEMORY_BUDGET, stat.f_bavail * stat.f_frsize // 4)


class Spool:
    def __init__(self, disk_dir: Path, memory_budget: int = 0):
        """Spool under `disk_dir`, and in a fresh directory of /dev/shm for up to `memory_budget` bytes."""
        self.disk_dir = Path(disk_dir)
        self.disk_dir.mkdir(parents=True, exist_ok=True)
        self.memory_dir = Path(tempfile.mkdtemp(prefix="dadi-spool-", dir=SHM)) if memory_budget > 0 else None
        self.memory_left = memory_budget
        self._count = 0

    def new_path(self, size: int) -> str:
        """A fresh path for a file of `size` bytes: in memory while the budget lasts."""
        self._count += 1
        cost = -(-max(size, 1) // 4096) * 4096  # tmpfs holds whole pages
        if self.memory_dir is not None and cost <= self.memory_left:
            self.memory_left -= cost
            return os.path.join(self.memory_dir, str(self._count))
        return os.path.join(self.disk_dir, str(self._count))

    def close(self) -> None:
        shutil.rmtree(self.disk_dir, ignore_errors=True)
        if self.memory_dir is not None:
            shutil.rmtree(self.memory_dir, ignore_errors=True)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
