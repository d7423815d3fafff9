"""The client side of the daemon's control socket, and starting the daemon when none runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from dadi.errors import DadiError

DEFAULT_ROOT = "/var/lib/dadi"
START_TIMEOUT = 20.0


def default_root() -> Path:
    return Path(os.environ.get("DADI_ROOT", DEFAULT_ROOT))


def request(root: Path, message: dict, timeout: float = 600.0) -> dict:
    """Send one request; the daemon's reply, or DadiError with the daemon's error message."""
    path = Path(root) / "control.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            buffer = b""
            while b"\n" not in buffer:
                data = sock.recv(65536)
                if not data:
                    break
                buffer += data
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise DaemonNotRunning(f"no dadi daemon answers on {path}: {e}") from e
    except OSError as e:
        raise DadiError(f"dadi daemon on {path}: {e}") from e
    if not buffer:
        raise DadiError(f"the dadi daemon on {path} closed the connection without answering "
                        f"(did it exit? see {Path(root) / 'daemon.log'})")
    try:
        reply = json.loads(buffer)
    except ValueError as e:
        raise DadiError(f"dadi daemon on {path} sent a broken reply: {buffer[:200]!r}") from e
    if not reply.get("ok"):
        raise DadiError(reply.get("error", "the daemon refused the request"))
    return reply


class DaemonNotRunning(DadiError):
    pass


def ensure_daemon(root: Path) -> int:
    """The pid of the daemon serving `root`, starting one in the background if there is none."""
    try:
        return request(root, {"op": "ping"}, timeout=5)["pid"]
    except DaemonNotRunning:
        pass
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "daemon.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "dadi.cli", "daemon", "--root", str(root)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DadiError(f"the dadi daemon exited ({process.returncode}); see {root / 'daemon.log'}")
        try:
            return request(root, {"op": "ping"}, timeout=5)["pid"]
        except DaemonNotRunning:
            time.sleep(0.1)
    raise DadiError(f"the dadi daemon did not start within {START_TIMEOUT:.0f} s; see {root / 'daemon.log'}")
