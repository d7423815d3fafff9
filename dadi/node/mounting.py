"""`dadi mount`, `dadi umount`, `dadi run`: a view's FUSE file -> loop device (4 KiB sectors) -> ext4 at DIR."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

try:  # CPython's own sha256: hashlib would load OpenSSL's libcrypto, ~10 ms of every cold `dadi mount`
    from _sha256 import sha256
except ImportError:  # another interpreter, or a newer CPython (_sha2)
    from hashlib import sha256

from dadi.errors import DadiError
from dadi.node import loopdev
from dadi.node.control import ensure_daemon, request

# The loop device's read-ahead: how much ext4 reads at once when a file is read from start to end. Loop
# devices keep the value their last user set (one came with 2560 KiB here), so a mount sets its own.
# Measured on the node benchmark's cold start (tools/bench/mount.py, 2026-11-24): 128 KiB (the kernel's
# default) 2.2-2.6 s and 19.9 MB fetched, 512 KiB 1.75 s and 23.4 MB, 2560 KiB 1.65 s and 31 MB: each
# read is a round trip to the registry, so fewer, larger reads win until they fetch what is never read.
DEFAULT_READ_AHEAD = 512 << 10


def _run(argv: list[str], what: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise DadiError(f"{what}: {' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()


def default_name(image: str, directory: Path) -> str:
    """A view name that is the same for the same image at the same place."""
    digest = sha256(f"{image}\n{directory.resolve()}".encode()).hexdigest()[:16]
    return f"view-{digest}"


def mount(root: Path, image: str, directory: Path, *, name: str | None = None, rw: bool = False,
          plain_http: bool = False, authfile: str | None = None, prefetch: bool = True,
          io_timeout: float = 30.0, prefetch_delay: float | None = None, record_trace: Path | None = None,
          trace_seconds: float | None = None, settings: dict | None = None,
          read_ahead: int = DEFAULT_READ_AHEAD, supernodes: list[str] | None = None,
          p2p_listen: str | None = None) -> dict:
    """Mount `image` lazily at `directory`; `settings` (cache_quota, prefetch_bandwidth) go to the daemon."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DadiError(f"mount point {directory} is not a directory")
    name = name or default_name(image, directory)
    ensure_daemon(root)
    message = {
        "op": "add_view", "name": name, "image": image, "rw": rw, "plain_http": plain_http,
        "authfile": authfile, "prefetch": prefetch, "io_timeout": io_timeout,
    }
    if prefetch_delay is not None:
        message["prefetch_delay"] = prefetch_delay
    if record_trace is not None:
        message["record_trace"] = str(Path(record_trace).resolve())
        message["trace_seconds"] = trace_seconds
    if settings:
        message["config"] = settings
    if supernodes:
        message["supernodes"] = list(supernodes)
    if p2p_listen:
        message["p2p_listen"] = p2p_listen
    view = request(root, message)
    loop = None
    try:
        # --direct-io: the loop driver reads the view with O_DIRECT, straight from the daemon. Through the
        # FUSE file's page cache a failed read came back as a short read, which the loop driver retries
        # at once, forever: the container sat in D state while the registry was down. Direct I/O also
        # keeps the bytes out of a second page cache (ext4's above the loop device is the one that counts).
        # Once every chunk is local the daemon turns it off (dadi/node/loopdev.py says why).
        loop = loopdev.attach(view["path"], read_only=not rw)
        _set_read_ahead(loop, read_ahead)
        # noload: never replay a journal on a read-only view; noinit_itable: the image's inode tables
        # are lazily initialised, and zeroing them would write gigabytes into the writable layer.
        options = "noinit_itable" if rw else "ro,noload"
        _run(["mount", "-t", "ext4", "-o", options, loop, str(directory)], f"mounting {image} at {directory}")
        request(root, {"op": "attach", "name": name, "loop": loop, "mountpoint": str(directory.resolve())})
    except BaseException:
        if loop:
            with contextlib.suppress(DadiError):
                loopdev.detach(loop)
        with contextlib.suppress(DadiError):
            request(root, {"op": "remove_view", "name": name})
        raise
    return {"name": name, "loop": loop, "mountpoint": str(directory.resolve()), "disk": view["path"]}


def _set_read_ahead(loop: str, nbytes: int) -> None:
    path = Path("/sys/block") / Path(loop).name / "queue" / "read_ahead_kb"
    try:
        path.write_text(f"{max(0, nbytes) // 1024}\n")
    except OSError as e:
        raise DadiError(f"setting the read-ahead of {loop} ({path}): {e.strerror}") from e


def find_view(root: Path, directory: Path) -> dict:
    target = str(Path(directory).resolve())
    for view in request(root, {"op": "list"})["views"]:
        if view.get("mountpoint") == target or view["name"] == str(directory):
            return view
    raise DadiError(f"no dadi view is mounted at {directory}")


def umount(root: Path, directory: Path, *, force: bool = False, discard: bool = False) -> dict:
    """Unmount the view at `directory`; `discard` also deletes its writable layer."""
    view = find_view(root, directory)
    if view.get("mountpoint"):
        argv = ["umount", *(["-l"] if force else []), view["mountpoint"]]
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0 and os.path.ismount(view["mountpoint"]):
            raise DadiError(f"umount {view['mountpoint']}: {result.stderr.strip()} (--force detaches it lazily)")
    if view.get("loop"):
        with contextlib.suppress(DadiError):  # as `losetup -d` was: the view goes on being removed
            loopdev.detach(view["loop"])
    request(root, {"op": "remove_view", "name": view["name"], "discard": discard})
    return view


def run_in_image(root: Path, image: str, command: list[str], **mount_options) -> int:
    """Mount `image`, run `command` chrooted into it with /proc, /sys and /dev, unmount; its exit code."""
    import tempfile  # only `dadi run` needs it: kept out of `dadi mount`'s cold start

    with tempfile.TemporaryDirectory(prefix="dadi-run-") as tmp:
        directory = Path(tmp)
        mount(root, image, directory, **mount_options)
        binds: list[Path] = []
        try:
            for fs_type, source, target in (("proc", "proc", "proc"), ("sysfs", "sys", "sys"), (None, "/dev", "dev")):
                where = directory / target
                if not where.is_dir():
                    continue
                argv = ["mount", "--bind", source, str(where)] if fs_type is None else \
                    ["mount", "-t", fs_type, source, str(where)]
                _run(argv, f"mounting {target} into the image")
                binds.append(where)
            return subprocess.run(["chroot", str(directory), *command]).returncode
        finally:
            for where in reversed(binds):
                subprocess.run(["umount", "-l", str(where)], capture_output=True)
            umount(root, directory, force=True, discard=True)  # a one-off view: nothing of it is kept
