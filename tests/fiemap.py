"""Where a file's bytes are on its block device: FS_IOC_FIEMAP, for tests that need to know which
stored chunks of an image hold a given file.

Run it as a program (`python fiemap.py FILE` prints the extents as JSON) when the file is on a mount
that a thread of the calling process serves: fcntl.ioctl keeps the GIL while the kernel waits, so an
in-process server (tests/corrupting_proxy.py) could not answer the reads the ioctl needs.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import sys

_FS_IOC_FIEMAP = 0xC020660B
_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # fe_logical, fe_physical, fe_length, (reserved), fe_flags, (reserved)
_EXTENT_LAST = 0x1
_SLOTS = 64


def disk_extents(path: str | os.PathLike) -> list[tuple[int, int]]:
    """(device byte offset, length) of every extent of the file at `path`, in file order."""
    extents: list[tuple[int, int]] = []
    start = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            buf = bytearray(_HEADER.pack(start, 2**64 - 1 - start, 0, 0, _SLOTS, 0) + bytes(_EXTENT.size * _SLOTS))
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
            mapped = _HEADER.unpack_from(buf)[3]
            if mapped == 0:
                return extents
            for n in range(mapped):
                logical, physical, length, flags = _EXTENT.unpack_from(buf, _HEADER.size + n * _EXTENT.size)
                extents.append((physical, length))
                start = logical + length
                if flags & _EXTENT_LAST:
                    return extents
    finally:
        os.close(fd)


if __name__ == "__main__":
    print(json.dumps(disk_extents(sys.argv[1])))
