"""The daemon's FUSE file system: a root directory holding one file per view, the view's disk.

The namespace is deliberately trivial and stateless: inode numbers derive from view names, file
handles are inode numbers, nothing is remembered per open. The loop driver turns each file into a
block device; the kernel's ext4 sits on top. A read the network cannot serve in time is answered
with EIO, never left pending.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import time

import pyfuse3

from dadi.node.view import ReadFailed, View

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE


async def read_or_errno(view: View, offset: int, length: int) -> tuple[bytes, int]:
    """A read of a view as the kernel is answered: (bytes, 0), or (b"", EIO) with the failure logged.
    Shared by this file system and the native read path's fallbacks (dadi.node.nativeviews)."""
    try:
        return await view.read(offset, length), 0
    except ReadFailed as e:
        log.warning("view %s: read of %d bytes at %d failed: %s", view.name, length, offset, e)
    except Exception:
        log.exception("view %s: read of %d bytes at %d failed", view.name, length, offset)
    return b"", errno.EIO


def view_inode(name: str) -> int:
    """A stable inode number for a view name (above the root's, below 2^63)."""
    return (int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "big") | 1 << 56) + ROOT_INODE


class ViewsFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self) -> None:
        super().__init__()
        self.views: dict[int, View] = {}
        self._created = time.time_ns()

    def add(self, view: View) -> int:
        inode = view_inode(view.name)
        self.views[inode] = view
        return inode

    def remove(self, name: str) -> None:
        self.views.pop(view_inode(name), None)

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.st_uid = os.getuid()
        attrs.st_gid = os.getgid()
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self._created
        attrs.st_blksize = 4096
        attrs.attr_timeout = attrs.entry_timeout = 1.0
        if inode == ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o755
            attrs.st_nlink = 2
            return attrs
        view = self.views.get(inode)
        if view is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs.st_mode = stat.S_IFREG | (0o600 if view.writable is not None else 0o400)
        attrs.st_nlink = 1
        attrs.st_size = view.disk_size
        attrs.st_blocks = view.disk_size // 512
        return attrs

    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        inode = view_inode(os.fsdecode(name))
        if inode not in self.views:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def opendir(self, inode, ctx):
        if inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        for inode in sorted(i for i in self.views if i > start_id):
            view = self.views[inode]
            if not pyfuse3.readdir_reply(token, os.fsencode(view.name), self._attrs(inode), inode):
                break

    async def open(self, inode, flags, ctx):
        view = self.views.get(inode)
        if view is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if flags & (os.O_WRONLY | os.O_RDWR) and view.writable is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        # keep_cache: the disk's bytes only change through this file, so the page cache stays valid.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        view = self.views.get(fh)
        if view is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        data, error = await read_or_errno(view, off, size)
        if error:
            raise pyfuse3.FUSEError(error)
        return data

    async def write(self, fh, off, buf):
        view = self.views.get(fh)
        if view is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if view.writable is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            return await view.write(off, buf)
        except ReadFailed as e:
            log.warning("view %s: copy-up for a write at %d failed: %s", view.name, off, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except ValueError:
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except Exception:
            log.exception("view %s: write of %d bytes at %d failed", view.name, len(buf), off)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def fsync(self, fh, datasync):
        view = self.views.get(fh)
        if view is not None:
            await view.flush()

    async def flush(self, fh):
        await self.fsync(fh, False)

    async def release(self, fh):
        pass

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = 4096
        stats.f_namemax = 255
        return stats
