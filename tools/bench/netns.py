"""A remote host for benchmarks: a network namespace behind a veth pair shaped with tbf.

    with ShapedLink() as link:      # link.remote_address lives in the namespace link.netns
        RegistryServer(dir, netns=link.netns, address=link.remote_address) ...

Both ends are shaped (egress of each side), so that what the namespace sends to the host - registry
replies - crosses the link at `rate`. tbf, not netem: this kernel has no netem, so there is no added
latency either; the round trip is the veth's (tens of microseconds). Everything is torn down on exit,
and a leftover of an interrupted run (same names) is removed first.
"""

from __future__ import annotations

import subprocess

DEFAULT_NETNS = "dadibench"
HOST_IF, REMOTE_IF = "veth-dadibh", "veth-dadibr"  # at most 15 characters


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = [*(["ip", "netns", "exec", netns] if netns else []), *args]
    return subprocess.run(argv, check=check, capture_output=True, text=True)


class ShapedLink:
    def __init__(self, netns: str = DEFAULT_NETNS, *, rate: str = "1gbit", rate_bps: float = 1e9,
                 burst: str = "256kb", latency: str = "50ms",
                 host_address: str = "10.231.0.1", remote_address: str = "10.231.0.2"):
        self.netns = netns
        self.rate = rate
        self.rate_bytes_per_s = rate_bps / 8
        self.burst = burst
        self.latency = latency
        self.host_address = host_address
        self.remote_address = remote_address

    def __enter__(self) -> ShapedLink:
        self.close()  # an interrupted run's leftovers
        try:
            _ip("ip", "netns", "add", self.netns)
            _ip("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", REMOTE_IF)
            _ip("ip", "link", "set", REMOTE_IF, "netns", self.netns)
            _ip("ip", "addr", "add", f"{self.host_address}/30", "dev", HOST_IF)
            _ip("ip", "link", "set", HOST_IF, "up")
            _ip("ip", "addr", "add", f"{self.remote_address}/30", "dev", REMOTE_IF, netns=self.netns)
            _ip("ip", "link", "set", REMOTE_IF, "up", netns=self.netns)
            _ip("ip", "link", "set", "lo", "up", netns=self.netns)
            for dev, ns in ((HOST_IF, None), (REMOTE_IF, self.netns)):
                _ip("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate, "burst", self.burst,
                    "latency", self.latency, netns=ns)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def describe(self) -> str:
        return f"veth + tbf {self.rate} (burst {self.burst}, latency {self.latency}) both ways"

    def close(self) -> None:
        # Deleting the namespace destroys its end of the veth, and with it the pair; the explicit link
        # delete covers a pair whose far end never made it into the namespace.
        _ip("ip", "link", "del", HOST_IF, check=False)
        if self.netns in _ip("ip", "netns", "list", check=False).stdout.split():
            _ip("ip", "netns", "del", self.netns, check=False)
