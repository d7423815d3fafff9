"""Test support for real mounts: the `node` fixture (a daemon root that is always cleaned up), and the
`dadi mount` / `dadi stats` calls the mount tests make.

The `node` fixture's teardown copes with what a crashed or killed daemon leaves behind, not only with a
healthy daemon: dead ext4 mounts under the test's directory, loop devices still attached to a dead view
file, a FUSE mount with no daemon behind it, and a daemon that no longer answers. It only touches what
the test made: mounts under the test's tmp_path, loop devices that `mount()` reported for this root, and
daemons whose command line names this root.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import dadi_cli

from dadi.errors import DadiError
from dadi.node.control import request
from dadi.node.loopdev import backing_file as loop_backing_file

STOP_DEADLINE = 10.0  # seconds a daemon gets to exit on SIGTERM before SIGKILL

# What mount() attached, per daemon root: loop devices and view names, for the teardown.
_attached: dict[Path, dict[str, set[str]]] = {}


@pytest.fixture
def node(tmp_path):
    """A daemon root; afterwards every view is unmounted and the daemon stopped, even on failure."""
    root = tmp_path / "root"
    yield root
    cleanup_node(root, tmp_path)


def mount(ref: str, directory: Path, root: Path, *extra: str) -> dict:
    """`dadi mount REF DIRECTORY --root ROOT --json EXTRA...`; its JSON answer."""
    directory.mkdir(parents=True, exist_ok=True)
    info = json.loads(dadi_cli("mount", ref, str(directory), "--root", str(root), "--json", *extra).stdout)
    return record_mount(root, info)


def record_mount(root: Path, info: dict) -> dict:
    """Note a view `dadi mount --json` attached (its answer, `info`), for the teardown; returns `info`."""
    record = _attached.setdefault(Path(root), {"loops": set(), "names": set()})
    record["loops"].add(info["loop"])
    record["names"].add(info["name"])
    return info


def stats(directory: Path, root: Path, *extra: str) -> dict:
    return json.loads(dadi_cli("stats", str(directory), "--root", str(root), "--json", *extra).stdout)


# --- the daemon's process ---------------------------------------------------------------------------


def process_gone(pid: int) -> bool:
    """True when `pid` has exited (a zombie nobody reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # "pid (comm) state ...": comm may hold spaces and parentheses, the state follows the last ')'.
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def daemon_pids(root: Path) -> list[int]:
    """Pids of `dadi daemon --root ROOT` processes for exactly this root (the ones tests started)."""
    wanted = ["daemon", "--root", str(root)]
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(argv[i:i + 3] == wanted for i in range(len(argv))) and not process_gone(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def stop_process(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_gone(pid, STOP_DEADLINE):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        wait_gone(pid, STOP_DEADLINE)


# --- cleaning up ------------------------------------------------------------------------------------


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory`, deepest first (so that each unmount can succeed)."""
    prefix = str(directory)
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def cleanup_node(root: Path, scope: Path) -> None:
    """Unmount every view of the daemon under `root`, stop it, and remove whatever a crash left under
    `scope` (the test's directory): mounts, the loop devices behind them, stray daemons."""
    root = Path(root)
    if (root / "control.sock").exists():
        try:
            views = request(root, {"op": "list"}, timeout=30)["views"]
            pid = request(root, {"op": "ping"}, timeout=30)["pid"]
        except DadiError:
            views, pid = [], None
        for view in views:
            dadi_cli("umount", "--force", "--root", str(root), view["name"], check=False)
        if pid:
            stop_process(pid)
    for pid in daemon_pids(root):  # one that stopped answering, or a second one started meanwhile
        stop_process(pid)
    for point in mounts_under(scope):  # dead mounts above a killed daemon, and its FUSE mount
        subprocess.run(["umount", "-l", point], capture_output=True)
    record = _attached.pop(root, {"loops": set(), "names": set()})
    names = record["names"] | ({p.name for p in (root / "views").iterdir()} if (root / "views").is_dir() else set())
    for loop in record["loops"]:
        backing = loop_backing_file(loop)
        # After the FUSE mount is gone the kernel shows the view file as "/NAME"; a device someone else
        # took since has another file and is left alone.
        if backing and (backing.startswith(str(root / "fs") + "/") or backing.lstrip("/") in names):
            subprocess.run(["losetup", "-d", loop], capture_output=True)
