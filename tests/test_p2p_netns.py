"""P2P in a data centre on one machine: a real docker-registry (htpasswd auth), a real `dadi supernode`
and real node daemons (FUSE, loop, ext4), each in a network namespace of its own, joined by veths to a
bridge; the registry's uplink shaped with tbf (tests/netns_helpers.py). The registry's egress is read
from its interface's counters, as an operator would.

Only the lying peer is a fake (tests/lying_peer.py): the real peer server re-checks what it serves and
cannot be made to lie. Every process is stopped by its pid and every mount removed, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import REPO, dadi_cli, poll
from netns_helpers import (
    FILE_SIZE,
    FILES,
    PEER_PORT,
    NetnsNode,
    NetnsSupernode,
    Topology,
    build_p2p_image,
    in_parallel,
    netns_cmd,
)
from registry_server import RegistryServer
from test_supernode import disk_usage

pytestmark = pytest.mark.needs_root

MiB = 1 << 20
USER, PASSWORD = "alice", "secret"


@pytest.fixture(scope="module")
def dc(tmp_path_factory):
    """The topology, the registry (auth on) and the image pushed to it, for the whole module."""
    tmp = tmp_path_factory.mktemp("p2p-dc")
    with Topology(prefix="dp2pt", nodes=8, subnet=232) as net, \
            RegistryServer(tmp / "registry", users={USER: PASSWORD}, netns=net.registry_ns,
                           address=net.registry_ip) as registry:
        authfile = registry.write_authfile(tmp / "auth.json")
        layout, tag = build_p2p_image(tmp / "layout", files=FILES, size=FILE_SIZE)
        ref = f"docker://{net.registry}/p2p/app:v1"
        dadi_cli("convert", f"oci:{layout}:{tag}", ref, "--plain-http", "--authfile", str(authfile),
                 "--cache-dir", str(tmp / "convert-cache"), "-q")
        yield net, registry, authfile, ref


def layer_digest(ref: str, authfile: Path) -> str:
    info = json.loads(dadi_cli("inspect", ref, "--plain-http", "--authfile", str(authfile), "--json").stdout)
    assert len(info["layers"]) == 1  # the image has one layer
    return info["layers"][0]["digest"]


@contextlib.contextmanager
def fake_peer(tmp_path: Path, net: Topology, digest: str, mode: str):
    """tests/lying_peer.py in the last node namespace, announcing every piece of `digest`; yields its log."""
    log_path = tmp_path / f"fake-peer-{mode}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            netns_cmd(net.node_ns[-1], [sys.executable, str(REPO / "tests" / "lying_peer.py"), net.supernode_url,
                                        str(PEER_PORT), digest, "16", mode]), stdout=log, stderr=log)
    try:
        poll(f"the {mode} peer announced", lambda: "announced" in log_path.read_text())
        yield log_path
    finally:
        process.kill()
        process.wait()


def test_eight_nodes_start_at_once_registry_sends_the_image_about_once_and_peers_carry_bytes(dc, tmp_path):
    net, registry, authfile, ref = dc
    nodes = [NetnsNode(tmp_path, net, i) for i in range(8)]
    metrics_url = f"http://{net.node_ip[0]}:9464/metrics"  # node 0's daemon serves Prometheus metrics
    nodes[0].root.mkdir(parents=True)
    (nodes[0].root / "daemon.toml").write_text(f'metrics = "{net.node_ip[0]}:9464"\n')
    with NetnsSupernode(tmp_path, net, tmp_path / "sn-cache") as supernode:
        try:
            before = net.tx_bytes(net.registry_ns)

            def start(node: NetnsNode) -> None:
                node.mount(ref, *node.p2p_args(authfile))
                node.read_all()
                node.wait_prefetch()

            in_parallel(start, nodes)
            egress = net.tx_bytes(net.registry_ns) - before
            stats = [node.stats() for node in nodes]
            image = stats[0]["bytes_total"]  # what one node needed: every layer blob, whole
            sent = supernode.metric("dadi_supernode_sent_bytes_total")
            peer_received = sum(s["peers"]["received_bytes"] for s in stats)
            peer_served = sum(s["peers"]["served"]["sent_bytes"] for s in stats)
            node0 = _scrape(metrics_url)
            print(f"image {image} B, registry egress {egress} B ({egress / image:.2f}x), supernode sent {sent:.0f} "
                  f"B ({sent / image:.2f}x), peers carried {peer_received} B")
        finally:
            for node in nodes:
                node.cleanup()
    # Slack: each node fetches the manifest, config and layer tables from the registry itself (a few KiB
    # each), the supernode checks each node's credentials there, and headers and TCP/IP framing add ~5%.
    assert egress <= 1.3 * image + 1 * MiB, f"registry egress {egress} B for a {image} B image"
    assert all(s["read_errors"] == 0 and s["corrupt_chunks"] == 0 for s in stats)
    assert peer_received > 0 and peer_served > 0, "peers carried nothing"
    assert sent + peer_received >= 8 * image * 0.9  # every node got its bytes from one or the other
    assert sent < 8 * image, "the supernode sent every node everything: peers took no load off it"
    # What an operator sees on node 0: its peer traffic both ways, next to the other figures.
    assert node0["dadi_node_peer_received_bytes_total"] == stats[0]["peers"]["received_bytes"]
    assert node0["dadi_node_peer_sent_bytes_total"] == stats[0]["peers"]["served"]["sent_bytes"]
    assert node0["dadi_node_peer_announces_total"] > 0 and node0["dadi_node_prefetch_done"] == 1


def test_nodes_finish_through_the_registry_when_the_supernode_dies_mid_start(dc, tmp_path):
    net, registry, authfile, ref = dc
    nodes = [NetnsNode(tmp_path, net, i) for i in range(3)]
    supernode = NetnsSupernode(tmp_path, net, tmp_path / "sn-cache").start()
    try:
        in_parallel(lambda n: n.mount(ref, *n.p2p_args(authfile), "--no-prefetch", "--io-timeout", "60"), nodes)
        in_parallel(lambda n: n.read_all([0]), nodes)  # the start has begun, through the supernode
        assert supernode.metric("dadi_supernode_sent_bytes_total") > 0
        supernode.stop(signal.SIGKILL)
        in_parallel(lambda n: n.read_all(), nodes)
        stats = [node.stats() for node in nodes]
    finally:
        supernode.stop(signal.SIGKILL)
        for node in nodes:
            node.cleanup()
    for s in stats:
        assert s["sources"].get("supernode", 0) > 0 and s["sources"].get("registry", 0) > 0
        assert s["read_errors"] == 0


def test_corrupt_peers_are_caught_and_no_bad_byte_reaches_a_reader_and_the_cache_keeps_its_quota(dc, tmp_path):
    net, registry, authfile, ref = dc
    quota = 4 * MiB  # half the image
    a, b, c = (NetnsNode(tmp_path, net, i) for i in range(3))
    # Every piece is hot from its first request: a single node asking is redirected to a holder.
    with NetnsSupernode(tmp_path, net, tmp_path / "sn-cache", "--cache-quota", str(quota),
                        "--p2p-hot-requests", "1") as supernode:
        try:
            a.mount(ref, *a.p2p_args(authfile))
            a.read_all()
            held = a.wait_prefetch()
            digest = _layer_digest(a)
            poll("node 0 announced every piece",
                 lambda: a.stats()["peers"]["served"]["pieces_announced"] >= held["bytes_total"] // MiB)
            # Peer A's disk rots after verification: a byte in the middle of every MiB of its cached blob.
            data_file = a.root / "cache" / "blobs" / digest.split(":")[1] / "data"
            with open(data_file, "r+b") as f:
                for offset in range(MiB // 2, held["bytes_total"], MiB):
                    f.seek(offset)
                    byte = f.read(1)
                    f.seek(offset)
                    f.write(bytes([byte[0] ^ 0xFF]))
            b.mount(ref, *b.p2p_args(authfile), "--no-prefetch")
            b.read_all()
            stats_a, stats_b = a.stats(), b.stats()
            # A re-checked what it was about to serve, refused it (404) and counted it; B went back to the
            # supernode for those pieces and read the right bytes.
            assert stats_b["peers"]["redirects"] > 0 and stats_b["peers"]["failures"] > 0
            assert stats_a["corrupt_chunks"] > 0 and stats_a["peers"]["served"]["not_held"] > 0
            assert stats_b["corrupt_chunks"] == 0 and stats_b["read_errors"] == 0
            a.cleanup()
            b.cleanup()  # only the liar holds the blob now

            with fake_peer(tmp_path, net, digest, "lie") as liar_log:
                c.mount(ref, *c.p2p_args(authfile), "--no-prefetch")
                c.read_all()  # every byte right, though the liar was asked first
                stats_c = c.stats()
                assert re.search(r"served \d+", liar_log.read_text()), "the liar was never asked"
                assert stats_c["peers"]["corrupt_chunks"] > 0 and stats_c["read_errors"] == 0
                poll("node 2 reported the liar to the supernode",
                     lambda: supernode.metric("dadi_supernode_peer_reports_total", reason="corrupt") > 0)
            usage = disk_usage(tmp_path / "sn-cache")
        finally:
            for node in (a, b, c):
                node.cleanup()
    assert usage <= quota, f"supernode cache takes {usage} B, quota {quota} B"


def test_a_peer_that_hangs_costs_one_timeout_then_the_supernode_serves(dc, tmp_path):
    net, registry, authfile, ref = dc
    node = NetnsNode(tmp_path, net, 0)
    with NetnsSupernode(tmp_path, net, tmp_path / "sn-cache", "--p2p-hot-requests", "1") as supernode, \
            fake_peer(tmp_path, net, layer_digest(ref, authfile), "hang") as hung_log:
        try:
            node.mount(ref, *node.p2p_args(authfile), "--no-prefetch")
            node.read_all()
            stats = node.stats()
        finally:
            node.cleanup()
        assert "hanging" in hung_log.read_text()  # it was asked, and never answered
        assert supernode.metric("dadi_supernode_peer_reports_total", reason="failed") >= 1
    assert stats["peers"]["failures"] >= 1 and stats["peers"]["received_bytes"] == 0
    assert stats["read_errors"] == 0 and stats["sources"].get("supernode", 0) > 0


def test_a_node_without_credentials_gets_nothing_from_the_supernode_or_from_peers(dc, tmp_path):
    net, registry, authfile, ref = dc
    holder, stranger = NetnsNode(tmp_path, net, 0), NetnsNode(tmp_path, net, 1)
    with NetnsSupernode(tmp_path, net, tmp_path / "sn-cache", "--p2p-hot-requests", "1") as supernode:
        try:
            holder.mount(ref, *holder.p2p_args(authfile))
            holder.read_all()
            holder.wait_prefetch()
            digest = _layer_digest(holder)
            poll("the holder announced", lambda: supernode.metric("dadi_supernode_tracked_pieces") > 0)
            sent_before = supernode.metric("dadi_supernode_sent_bytes_total")
            failed = stranger.mount(ref, *stranger.p2p_args(None), check=False)
            assert failed.returncode != 0 and "401" in failed.stderr, failed.stderr
            # Asking directly, as a node would, from the stranger's namespace: no bytes and no redirect.
            url = f"/v2/p2p/app/blobs/{digest}"
            for base in (net.supernode_url, f"http://{net.node_ip[0]}:{PEER_PORT}"):
                answer = _get_from(stranger.netns, base + url)
                assert answer["status"] in (401, 403) and answer["location"] == "" and answer["error_body"], answer
            assert supernode.metric("dadi_supernode_sent_bytes_total") == sent_before
            assert holder.stats()["peers"]["served"]["forbidden"] >= 1
        finally:
            holder.cleanup()
            stranger.cleanup()


# --- helpers ------------------------------------------------------------------------------------------


def _layer_digest(node: NetnsNode) -> str:
    from dadi.node.control import request

    cached = request(node.root, {"op": "cache"})["blobs"]
    assert len(cached) == 1, cached  # the image has one layer
    return cached[0]["digest"]


_GET = """
import json, sys, requests
r = requests.get(sys.argv[1], headers={"Range": "bytes=0-1048575"}, allow_redirects=False, timeout=30)
try:
    error = "error" in r.json()
except ValueError:
    error = False
print(json.dumps({"status": r.status_code, "error_body": error, "location": r.headers.get("location", "")}))
"""


def _get_from(netns: str, url: str) -> dict:
    """A range GET of `url` from inside `netns`, without credentials: status, whether the body is a JSON
    error (not blob bytes), Location."""
    out = subprocess.run(netns_cmd(netns, [sys.executable, "-c", _GET, url]), capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def _scrape(url: str) -> dict[str, float]:
    """Sample name -> value of a Prometheus endpoint (labelled samples summed)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(requests.get(url, timeout=10).text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0) + sample.value
    return out
