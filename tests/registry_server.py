"""A real docker-registry (Debian's distribution 2.8) on 127.0.0.1 for tests, as a context manager.

    with RegistryServer(tmp_path / "registry", users={"alice": "secret"}) as registry:
        authfile = registry.write_authfile(tmp_path / "auth.json")
        client = RegistryClient(registry.host, plain_http=True, authfile=str(authfile))

Each server has its own directory (config, htpasswd, log, storage) and a free port that it keeps across
stop()/start(), so a test can restart "the registry" under a client. The process is stopped by its pid
on exit, also when the test fails.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REGISTRY_BINARY = "/usr/bin/docker-registry"
HTPASSWD_BINARY = "/usr/bin/htpasswd"
START_DEADLINE = 30.0  # seconds; it answers in well under one on this machine
STOP_DEADLINE = 10.0
DEFAULT_NETNS_PORT = 5000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_authfile(path: str | os.PathLike, host: str, username: str, password: str) -> Path:
    """Write a docker/podman/skopeo credentials file (`{"auths": {host: {"auth": base64}}}`); returns it.

    Writing `DIR/config.json` makes DIR usable as $DOCKER_CONFIG too. An existing file gains the entry.
    """
    path = Path(path)
    config = json.loads(path.read_text()) if path.exists() else {}
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    config.setdefault("auths", {})[host] = {"auth": token}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


class RegistryServer:
    """docker-registry serving plain HTTP on 127.0.0.1:PORT, storage under root/storage.

    users: {name: password} turns on htpasswd (Basic) auth for every request. netns and address run it
    inside a network namespace (`ip netns exec`), listening on that namespace's address (port 5000
    unless given): the node benchmark reaches it over a shaped veth.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        users: dict[str, str] | None = None,
        port: int | None = None,
        address: str = "127.0.0.1",
        netns: str | None = None,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage = self.root / "storage"
        self.storage.mkdir(exist_ok=True)
        self.config_path = self.root / "config.yml"
        self.log_path = self.root / "registry.log"
        self.users = dict(users or {})
        self.address = address
        self.netns = netns
        # free_port() probes the host's loopback; inside a namespace of its own the port is free anyway.
        if port is None and netns is not None:
            port = DEFAULT_NETNS_PORT
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self._process: subprocess.Popen | None = None
        self._log_file = None
        self._started_once = False
        if self.users:
            self._write_htpasswd()

    # ---- what tests use -------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections on its port, and nothing ever answers them (a
        registry that hangs, which only a timeout notices). thaw() lets it go on."""
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._process.send_signal(signal.SIGCONT)

    def write_authfile(
        self, path: str | os.PathLike, username: str | None = None, password: str | None = None
    ) -> Path:
        """Credentials for this registry (the first user's, by default) in docker config.json format."""
        if username is None:
            if not self.users:
                raise ValueError("this registry has no users; pass username and password")
            username = next(iter(self.users))
        if password is None:
            password = self.users[username]
        return write_authfile(path, self.host, username, password)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> RegistryServer:
        if self.running:
            return self
        # Another process may grab a port between free_port() and the registry's bind; a fresh port
        # fixes that, unless the port must stay (a restart, or one the caller chose).
        tries = 1 if (self._fixed_port or self._started_once) else 3
        for attempt in range(tries):
            self._write_config()
            self._spawn()
            try:
                self._wait_until_ready()
                self._started_once = True
                return self
            except _RegistryExited:
                if attempt + 1 == tries or "address already in use" not in self.log():
                    raise RuntimeError(f"docker-registry exited at start; its log:\n{self.log()}") from None
                self.port = free_port()
        raise AssertionError("unreachable")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> RegistryServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- internals ----------------------------------------------------------------------------

    def _write_htpasswd(self) -> None:
        lines = []
        for name, password in self.users.items():
            out = subprocess.run(
                [HTPASSWD_BINARY, "-Bbn", name, password], check=True, capture_output=True, text=True
            ).stdout
            lines.append(out.strip())
        self.htpasswd_path = self.root / "htpasswd"
        self.htpasswd_path.write_text("\n".join(lines) + "\n")

    def _write_config(self) -> None:
        # JSON is YAML, and json.dumps quotes paths safely.
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": "dadi-test-secret"},
        }
        if self.users:
            config["auth"] = {"htpasswd": {"realm": "dadi-test", "path": str(self.htpasswd_path)}}
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")

    def _spawn(self) -> None:
        # REGISTRY_* variables override the config file (REGISTRY_AUTH_FILE is podman's, and would
        # turn into the registry's "auth.file"): keep them away from the server.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self._log_file = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [*(["ip", "netns", "exec", self.netns] if self.netns else []), REGISTRY_BINARY, "serve",
             str(self.config_path)],  # `ip netns exec` execs the registry: the pid stays the registry's
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_DEADLINE
        delay = 0.01
        while True:
            if self._process is None or self._process.poll() is not None:
                self.stop()
                raise _RegistryExited()
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"docker-registry did not answer {self.url}/v2/ in {START_DEADLINE}s:\n{self.log()}"
                )
            time.sleep(delay)  # a poll interval, not a wait for something to have happened
            delay = min(delay * 2, 0.2)

    def _answers(self) -> bool:
        try:
            with contextlib.closing(urllib.request.urlopen(f"{self.url}/v2/", timeout=2)) as resp:
                return resp.status == 200
        except urllib.error.HTTPError as exc:
            exc.close()
            return exc.code == 401  # up, and asking for the credentials it was configured with
        except OSError:
            return False


class _RegistryExited(Exception):
    pass
