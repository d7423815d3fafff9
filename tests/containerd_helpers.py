"""Test support: Debian's containerd + runc with `dadi snapshotter` as a proxy plugin, all under a tmp dir.

    with DadiContainerd(tmp_path / "ctd") as node:       # snapshotter, containerd, node daemon root
        dadi_cli("pull", "--containerd", str(node.socket), "--plain-http", ref)
        node.ctr("run", "--rm", "--snapshotter", "dadi", ref, "c1", "cat", "/etc/hostname")

containerd's config is the documented one: `[proxy_plugins.dadi] type = "snapshot" address = SOCK`
(tools/bench/containerd.py writes it; `cri=True` turns the CRI plugin on, `extra_config` is TOML appended
to containerd's config, e.g. the CRI plugin's `snapshotter = "dadi"` table). `snapshotter_args` are extra
`dadi snapshotter` options (`--config FILE`, `--rw-mode overlayfs`); `node.snapshotter.kill()/.start()`
restart it; `node.daemon_root` is the node daemon's root (`dadi ls --root`). The snapshotter runs as
`dadi snapshotter --root DIR/snapshotter --address DIR/snapshotter.sock --daemon-root DIR/node`;
the node daemon starts by itself on the first container over a dadi image.

Teardown, also after a failure, in this order: tasks killed and deleted, containers deleted (so the
shims exit), containerd stopped (its mounts under DIR detached), shims of this containerd still alive
killed by pid, the snapshotter stopped by pid, every daemon view unmounted and its loop device freed,
the daemon stopped (mounthelpers.cleanup_node), what is still mounted under DIR detached.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from mounthelpers import cleanup_node, mounts_under, process_gone, stop_process, wait_gone

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools" / "bench"))
from containerd import Containerd  # noqa: E402 - tools/bench is not a package

START_DEADLINE = 30.0


def dadi_executable() -> str:
    return shutil.which("dadi", path=str(REPO / ".venv" / "bin")) or "dadi"


class SnapshotterProcess:
    """`dadi snapshotter` in the background, started and stopped by pid."""

    def __init__(self, root: Path, address: Path, daemon_root: Path, *extra: str):
        self.root, self.address, self.daemon_root = Path(root), Path(address), Path(daemon_root)
        self.extra = extra
        self.log_path = self.root.parent / "snapshotter.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> SnapshotterProcess:
        self.address.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [dadi_executable(), "snapshotter", "--root", str(self.root), "--address", str(self.address),
             "--daemon-root", str(self.daemon_root), "--plain-http", *self.extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_DEADLINE
        while not self.address.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"dadi snapshotter exited ({self.process.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"dadi snapshotter did not listen within {START_DEADLINE} s:\n{self.log()}")
            time.sleep(0.05)  # poll interval
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is cleaned up."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process.pid)
            if self.process.poll() is None:
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""


class DadiContainerd:
    def __init__(self, directory: Path, *, snapshotter_args: tuple[str, ...] = (), cri: bool = False,
                 extra_config: str = ""):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.daemon_root = self.dir / "node"
        self.snapshotter = SnapshotterProcess(self.dir / "snapshotter", self.dir / "snapshotter.sock",
                                              self.daemon_root, *snapshotter_args)
        self.containerd = Containerd(self.dir / "containerd", cri=cri, extra_config=extra_config,
                                     snapshotters={"dadi": str(self.snapshotter.address)})

    @property
    def socket(self) -> Path:
        return self.containerd.socket

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run(["ctr", "-a", str(self.socket), *args], capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({result.returncode}): {result.stderr}\n"
                                 f"--- snapshotter log:\n{self.snapshotter.log()}\n"
                                 f"--- containerd log:\n{self.containerd.log()}")
        return result

    def start(self) -> DadiContainerd:
        self.snapshotter.start()
        self.containerd.start()
        return self

    def __enter__(self) -> DadiContainerd:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def wait_task_stopped(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            listing = self.ctr("task", "ls", check=False).stdout
            rows = [line.split() for line in listing.splitlines()[1:]]
            if not any(r[0] == name and r[-1] == "RUNNING" for r in rows):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"task {name} still running after {timeout} s")
            time.sleep(0.1)  # poll interval

    def _remove_containers(self) -> None:
        if self.containerd.pid is None or process_gone(self.containerd.pid):
            return
        for task in self.ctr("task", "ls", "-q", check=False, timeout=60).stdout.split():
            self.ctr("task", "kill", "-s", "SIGKILL", task, check=False, timeout=60)
            self.wait_task_stopped(task, timeout=30)
            self.ctr("task", "delete", task, check=False, timeout=60)
        for container in self.ctr("containers", "ls", "-q", check=False, timeout=60).stdout.split():
            self.ctr("containers", "delete", container, check=False, timeout=60)

    def shim_pids(self) -> list[int]:
        """containerd-shim processes of this containerd (their command line names its socket)."""
        wanted = str(self.socket)
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                except OSError:
                    continue
                if argv and "containerd-shim" in argv[0] and wanted in argv:
                    pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        try:
            self._remove_containers()
        finally:
            self.containerd.stop()
            for pid in self.shim_pids():
                os.kill(pid, signal.SIGKILL)
                wait_gone(pid, 10)
            self.snapshotter.stop()
            cleanup_node(self.daemon_root, self.dir)
            for point in mounts_under(self.dir):
                subprocess.run(["umount", "-l", point], capture_output=True)
