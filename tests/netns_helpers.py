"""A data centre on one machine for the P2P tests and benchmark: network namespaces joined by veths to a
bridge in the host's namespace, the registry's link shaped with tbf.

    with Topology(prefix="dp2p", nodes=8) as net:
        net.registry_ns, net.registry_ip       # the registry's namespace and address (REGISTRY_PORT)
        net.supernode_ns, net.supernode_ip     # the supernode's
        net.node_ns[i], net.node_ip[i]         # node i's
        net.tx_bytes(net.registry_ns)          # what the registry's interface has sent (its egress)

NetnsSupernode runs `dadi supernode` in the supernode's namespace, NetnsNode a node daemon (`dadi mount
--supernode --p2p-listen`) in a node's; build_p2p_image makes the image they read (FILES incompressible
files of FILE_SIZE bytes). The tests and tools/bench/p2p.py share them.

The host holds the bridge and the first address of the subnet, so the test process reaches everyone.
Node daemons run under `nsenter --net=` (netns_cmd), which enters the network namespace only: their
FUSE and ext4 mounts stay in the host's mount namespace, where `dadi mount` and the test see them (`ip
netns exec` would give each its own mount namespace). Everything is removed on exit, and a leftover of
an interrupted run (same names) first.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path

from conftest import REPO, dadi_cli, poll, pseudo_random
from mounthelpers import cleanup_node, record_mount
from test_supernode import Supernode, clean_env

from dadi.node.control import DaemonNotRunning, request

REGISTRY_PORT = 5000
SUPERNODE_PORT = 8900
PEER_PORT = 8901
FILES = 8  # files of the p2p image, 1 MiB each, incompressible: an image of ~8 MiB
FILE_SIZE = 1 << 20
DADI = str(REPO / ".venv" / "bin" / "dadi")
PREFETCH_DEADLINE = 180  # seconds `dadi stats --wait-prefetch` waits: 8 daemons share 2 cores


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = [*(["ip", "netns", "exec", netns] if netns else []), *args]
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def netns_cmd(netns: str, argv: list[str]) -> list[str]:
    """`argv` run in the network namespace `netns` only (see the module docstring)."""
    return ["nsenter", f"--net=/run/netns/{netns}", *argv]


class Topology:
    """`nodes` node namespaces, a registry's and a supernode's, on bridge PREFIX-br, subnet 10.SUBNET.0.0/24."""

    def __init__(self, prefix: str = "dp2p", nodes: int = 8, *, subnet: int = 232, registry_rate: str = "1gbit",
                 burst: str = "256kb", latency: str = "50ms"):
        self.prefix = prefix
        self.bridge = f"{prefix}-br"
        self.net = f"10.{subnet}.0"
        self.host_ip = f"{self.net}.1"
        self.registry_ns, self.registry_ip = f"{prefix}-reg", f"{self.net}.2"
        self.supernode_ns, self.supernode_ip = f"{prefix}-sn", f"{self.net}.3"
        self.node_ns = [f"{prefix}-n{i}" for i in range(nodes)]
        self.node_ip = [f"{self.net}.{10 + i}" for i in range(nodes)]
        self.registry_rate = registry_rate
        self.burst = burst
        self.latency = latency
        self._namespaces = [self.registry_ns, self.supernode_ns, *self.node_ns]

    @property
    def registry(self) -> str:
        return f"{self.registry_ip}:{REGISTRY_PORT}"

    @property
    def supernode_url(self) -> str:
        return f"http://{self.supernode_ip}:{SUPERNODE_PORT}"

    def __enter__(self) -> Topology:
        self.close()
        try:
            _ip("ip", "link", "add", self.bridge, "type", "bridge")
            _ip("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
            _ip("ip", "link", "set", self.bridge, "up")
            addresses = [self.registry_ip, self.supernode_ip, *self.node_ip]
            for n, (ns, address) in enumerate(zip(self._namespaces, addresses, strict=True)):
                host_if, ns_if = f"{self.prefix}-h{n}", f"{self.prefix}-v{n}"  # at most 15 characters
                _ip("ip", "netns", "add", ns)
                _ip("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
                _ip("ip", "link", "set", ns_if, "netns", ns)
                _ip("ip", "link", "set", host_if, "master", self.bridge)
                _ip("ip", "link", "set", host_if, "up")
                _ip("ip", "addr", "add", f"{address}/24", "dev", ns_if, netns=ns)
                _ip("ip", "link", "set", ns_if, "name", "eth0", netns=ns)
                _ip("ip", "link", "set", "eth0", "up", netns=ns)
                _ip("ip", "link", "set", "lo", "up", netns=ns)
            # The registry's egress crosses a shaped link, as a registry's uplink would.
            _ip("tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", self.registry_rate, "burst", self.burst,
                "latency", self.latency, netns=self.registry_ns)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        existing = _ip("ip", "netns", "list", check=False).stdout.split()
        for ns in self._namespaces:  # deleting a namespace deletes its veth end, and with it the pair
            if ns in existing:
                _ip("ip", "netns", "del", ns, check=False)
        for n in range(len(self._namespaces)):
            if Path(f"/sys/class/net/{self.prefix}-h{n}").exists():
                _ip("ip", "link", "del", f"{self.prefix}-h{n}", check=False)
        if Path(f"/sys/class/net/{self.bridge}").exists():
            _ip("ip", "link", "del", self.bridge, check=False)

    def tx_bytes(self, netns: str) -> int:
        """Bytes sent by the namespace's interface (eth0) since it was made: its egress."""
        return int(_ip("cat", "/sys/class/net/eth0/statistics/tx_bytes", netns=netns).stdout)


def in_parallel(work, items) -> None:
    """work(item) for every item at once, in threads; the first failure is raised."""
    errors: list[BaseException] = []

    def run(item):
        try:
            work(item)
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def p2p_image_layer(files: int = FILES, size: int = FILE_SIZE, seed: str = "p2p") -> bytes:
    """A layer tar with `files` incompressible files of `size` bytes: /data/f0 ... (tests/imagebuilder)."""
    from imagebuilder import TarBuilder

    tar = TarBuilder().dir("data")
    for i in range(files):
        tar.file(f"data/f{i}", pseudo_random(f"{seed}:{i}", size))
    return tar.build()


@functools.cache
def p2p_file_digest(index: int, size: int = FILE_SIZE, seed: str = "p2p") -> bytes:
    """sha256 of /data/fINDEX as p2p_image_layer wrote it. Computed once: generating the 1 MiB takes ~24 ms
    of CPU under the GIL, and 8 nodes checking 32 files each in one process would measure that instead of
    the nodes (hashing what was read releases the GIL)."""
    return hashlib.sha256(pseudo_random(f"{seed}:{index}", size)).digest()


def build_p2p_image(layout: Path, tag: str = "v1", **kwargs) -> tuple[Path, str]:
    from imagebuilder import OCILayoutBuilder

    builder = OCILayoutBuilder(layout, tag)
    builder.add_layer(p2p_image_layer(**kwargs), compression="gzip")
    builder.write()
    return layout, tag


class NetnsSupernode(Supernode):
    """`dadi supernode` in the topology's supernode namespace (tests/test_supernode.Supernode otherwise)."""

    def __init__(self, tmp_path: Path, net: Topology, cache_dir: Path, *args: str):
        super().__init__(tmp_path, net.registry, cache_dir, *args)
        self.cmd = netns_cmd(net.supernode_ns, [
            DADI, "supernode", "--listen", f"{net.supernode_ip}:{SUPERNODE_PORT}", "--registry", net.registry,
            "--plain-http", "--cache-dir", str(cache_dir), *args])


class NetnsNode:
    """A node daemon (root of its own) in node namespace `index`, serving peers on its address."""

    def __init__(self, tmp_path: Path, net: Topology, index: int):
        self.net, self.index = net, index
        self.root = tmp_path / f"node{index}"
        self.mnt = tmp_path / f"mnt{index}"
        self.scope = tmp_path
        self.netns = net.node_ns[index]
        self.pid: int | None = None  # the daemon start_daemon started

    def mount(self, ref: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        self.mnt.mkdir(parents=True, exist_ok=True)
        argv = netns_cmd(self.netns, [DADI, "mount", ref, str(self.mnt), "--root", str(self.root), "--json",
                                      "--plain-http", *extra])
        result = subprocess.run(argv, capture_output=True, text=True, env=clean_env(self.scope))
        if check:
            assert result.returncode == 0, f"node {self.index}: dadi mount failed:\n{result.stderr}"
            record_mount(self.root, json.loads(result.stdout))
        return result

    def start_daemon(self, timeout: float = 60) -> None:
        """Start the node's daemon in its namespace, serving peers, and wait until it answers (its pid in
        `self.pid`): a node where dadi runs as a service before any container starts (what
        tools/bench/mount.py measures too)."""
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [DADI, "daemon", "--root", str(self.root), "--p2p-listen", self.p2p_listen]
        with open(self.root / "daemon.log", "ab") as log:
            subprocess.Popen(netns_cmd(self.netns, argv),
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

        def answering() -> int | None:
            with contextlib.suppress(DaemonNotRunning):
                return request(self.root, {"op": "ping"}, timeout=5)["pid"]
            return None

        self.pid = poll(f"node {self.index}'s daemon (see {self.root}/daemon.log)", answering, timeout, 0.05)

    @property
    def p2p_listen(self) -> str:
        return f"{self.net.node_ip[self.index]}:{PEER_PORT}"

    def p2p_args(self, authfile: Path | None) -> list[str]:
        args = ["--supernode", self.net.supernode_url, "--p2p-listen", self.p2p_listen]
        return args + (["--authfile", str(authfile)] if authfile else [])

    def read_all(self, files: Iterable[int] = range(FILES)) -> None:
        """Read files /data/fI of the p2p image and check them (p2p_image_layer wrote them)."""
        for i in files:
            data = (self.mnt / "data" / f"f{i}").read_bytes()
            assert hashlib.sha256(data).digest() == p2p_file_digest(i), f"node {self.index}: /data/f{i} differs"

    def stats(self, *extra: str) -> dict:
        return json.loads(dadi_cli("stats", str(self.mnt), "--root", str(self.root), "--json", *extra).stdout)

    def wait_prefetch(self) -> dict:
        stats = self.stats("--wait-prefetch", str(PREFETCH_DEADLINE))
        assert stats["prefetch_state"] == "done", f"node {self.index}: prefetch not done: {stats}"
        return stats

    def cleanup(self) -> None:
        cleanup_node(self.root, self.mnt)
