"""A data centre on one machine for the P2P tests and benchmark: network namespaces joined by veths to a
bridge in the host's namespace, the registry's link shaped with tbf.

    with Topology(prefix="dp2p", nodes=8) as net:
        net.registry_ns, net.registry_ip       # the registry's namespace and address (REGISTRY_PORT)
        net.supernode_ns, net.supernode_ip     # the supernode's
        net.node_ns[i], net.node_ip[i]         # node i's
        net.tx_bytes(net.registry_ns)          # what the registry's interface has sent (its egress)

The host holds the bridge and the first address of the subnet, so the test process reaches everyone.
Node daemons run under `nsenter --net=` (netns_cmd), which enters the network namespace only: their
FUSE and ext4 mounts stay in the host's mount namespace, where `dadi mount` and the test see them (`ip
netns exec` would give each its own mount namespace). Everything is removed on exit, and a leftover of
an interrupted run (same names) first.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REGISTRY_PORT = 5000
SUPERNODE_PORT = 8900
PEER_PORT = 8901


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


def p2p_image_layer(files: int = 8, size: int = 1 << 20, seed: str = "p2p") -> bytes:
    """A layer tar with `files` incompressible files of `size` bytes: /data/f0 ... (tests/imagebuilder)."""
    from conftest import pseudo_random
    from imagebuilder import TarBuilder

    tar = TarBuilder().dir("data")
    for i in range(files):
        tar.file(f"data/f{i}", pseudo_random(f"{seed}:{i}", size))
    return tar.build()


def build_p2p_image(layout: Path, tag: str = "v1", **kwargs) -> tuple[Path, str]:
    from imagebuilder import OCILayoutBuilder

    builder = OCILayoutBuilder(layout, tag)
    builder.add_layer(p2p_image_layer(**kwargs), compression="gzip")
    builder.write()
    return layout, tag
