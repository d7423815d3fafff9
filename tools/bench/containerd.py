"""A private containerd for benchmarks: Debian's containerd and runc, overlayfs snapshotter.

    with Containerd(tmp / "containerd") as ctd:       # its own root, state and socket under that dir
        ctd.ctr("images", "pull", "--plain-http", ref)
        ctd.ctr("run", "--rm", "--snapshotter", "overlayfs", ref, "name", "python3", "/app/start.py")

Nothing is shared with a system containerd (none needs to run): every path is under the directory,
the CRI plugin is off unless `cri=True`. `snapshotters={"dadi": "/run/dadi/snapshotter.sock"}` adds
a `[proxy_plugins.NAME] type = "snapshot"` stanza per entry; `extra_config` is appended TOML. A fresh
directory is a node that has never pulled anything. On exit the daemon is stopped by its pid,
anything still mounted under the directory is detached, and the directory goes.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
START_DEADLINE = 30.0
STOP_DEADLINE = 20.0


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path, deepest first."""
    prefix = str(path.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


class Containerd:
    def __init__(self, directory: Path, *, plain_http_hosts: tuple[str, ...] = (), cri: bool = False,
                 snapshotters: dict[str, str] | None = None, extra_config: str = ""):
        self.dir = Path(directory)
        self.socket = self.dir / "containerd.sock"
        self.plain_http_hosts = plain_http_hosts
        self.cri = cri
        self.snapshotters = dict(snapshotters or {})
        self.extra_config = extra_config
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _config(self) -> str:
        # TOML by hand: json.dumps quotes strings the way TOML basic strings want them.
        q = json.dumps
        lines = [
            "version = 2",
            f"root = {q(str(self.dir / 'root'))}",
            f"state = {q(str(self.dir / 'state'))}",
            f"disabled_plugins = {'[]' if self.cri else '[' + q('io.containerd.grpc.v1.cri') + ']'}",
            "[grpc]",
            f"  address = {q(str(self.socket))}",
            "[ttrpc]",
            f"  address = {q(str(self.dir / 'containerd.sock.ttrpc'))}",
            "[debug]",
            '  level = "warn"',
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {q(str(self.dir / 'opt'))}",
        ]
        for name, address in self.snapshotters.items():
            lines += [f"[proxy_plugins.{q(name)}]", '  type = "snapshot"', f"  address = {q(str(address))}"]
        return "\n".join(lines) + "\n" + self.extra_config

    def start(self) -> Containerd:
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "config.toml"
        config.write_text(self._config())
        log = (self.dir / "containerd.log").open("ab")
        self._process = subprocess.Popen([CONTAINERD, "--config", str(config)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"containerd exited at start:\n{self.log()}")
            if self.socket.exists() and subprocess.run([CTR, "-a", str(self.socket), "version"],
                                                       capture_output=True).returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not answer in {START_DEADLINE}s:\n{self.log()}")
            time.sleep(0.05)  # a poll interval

    def log(self) -> str:
        path = self.dir / "containerd.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def ctr(self, *args: str, capture: bool = True) -> str:
        result = subprocess.run([CTR, "-a", str(self.socket), *args], capture_output=capture, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result.stdout or ""

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for point in mounts_under(self.dir):
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Containerd:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def version() -> str:
    out = subprocess.run([CONTAINERD, "--version"], capture_output=True, text=True).stdout.split()
    runc = subprocess.run(["runc", "--version"], capture_output=True, text=True).stdout.split()
    return f"containerd {out[2] if len(out) > 2 else '?'}, runc {runc[2] if len(runc) > 2 else '?'}"
