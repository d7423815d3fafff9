"""Nodes fetching through supernodes: `dadi mount --supernode URL` with real supernode processes, a real
docker-registry, real FUSE, loop and ext4; and the rendezvous hashing that spreads pieces over them."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter

import pytest
from conftest import dadi_cli
from images import _sparse_like_data
from mounthelpers import mount, stats
from test_supernode import Supernode, env  # noqa: F401  (env is a fixture)

from dadi.p2p.sources import piece_key, rendezvous_order


def test_rendezvous_spreads_pieces_and_losing_a_supernode_moves_only_its_own():
    members = [f"http://sn{i}:8900" for i in range(4)]
    keys = [piece_key("sha256:" + "ab" * 32, piece) for piece in range(4000)]
    first = {key: rendezvous_order(key, members)[0] for key in keys}
    counts = Counter(first.values())
    assert set(counts) == set(members) and min(counts.values()) > 800  # about 1000 each
    survivors = members[1:]
    for key in keys:
        now = rendezvous_order(key, survivors)[0]
        if first[key] != members[0]:
            assert now == first[key]  # pieces of the other supernodes stay where they were
        else:
            assert now == rendezvous_order(key, members)[1]  # the lost one's go to their second choice


@pytest.mark.needs_root
def test_a_mount_reads_through_supernodes_and_finishes_through_the_registry_when_they_die(
        busybox_image, registry, node, tmp_path, env):  # noqa: F811
    layout, tag = busybox_image
    ref = f"docker://{registry.host}/dadi/busybox:v1"
    dadi_cli("convert", f"oci:{layout}:{tag}", ref, "--plain-http", "--cache-dir", str(tmp_path / "c"), "-q")
    with Supernode(tmp_path, registry.host, tmp_path / "sn-a", name="a") as a, \
            Supernode(tmp_path, registry.host, tmp_path / "sn-b", name="b") as b:
        mnt = tmp_path / "mnt"
        mount(ref, mnt, node, "--plain-http", "--no-prefetch", "--supernode", a.url, "--supernode", b.url,
              "--io-timeout", "20")
        assert subprocess.run([str(mnt / "bin" / "busybox"), "true"]).returncode == 0
        through = stats(mnt, node)
        assert through["sources"].get("supernode", 0) > 0 and through["sources"].get("registry", 0) == 0
        sent = a.metric("dadi_supernode_sent_bytes_total") + b.metric("dadi_supernode_sent_bytes_total")
        assert sent >= through["sources"]["supernode"]
        a.stop(signal.SIGKILL)
        b.stop(signal.SIGKILL)
        data = (mnt / "big" / "holes.bin").read_bytes()  # not read before: the supernodes are gone
        assert data == _sparse_like_data(4 * 1024 * 1024, seed=1)  # what tests/images.py put there
        after = stats(mnt, node)
        assert after["sources"].get("registry", 0) > 0 and after["read_errors"] == 0
