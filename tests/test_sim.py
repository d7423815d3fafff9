"""tools/sim/p2p.py at a small scale: the simulation must show what the real system promises."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "sim"))

from p2p import simulate  # noqa: E402


def test_each_piece_leaves_the_registry_once_per_data_centre():
    f = simulate(["--nodes", "120", "--datacentres", "3"])
    assert f["registry_egress_bytes"] == 3 * f["one_node_bytes"]
    assert f["start_seconds"]["max"] < float("inf")
    assert f["supernode_sent_bytes"] + f["peer_sent_bytes"] == 120 * f["one_node_bytes"]


def test_nodes_start_through_the_registry_when_every_supernode_is_dead():
    f = simulate(["--nodes", "40", "--datacentres", "2", "--kill-supernodes", "4", "--kill-at", "0"])
    assert f["failovers"] >= 40  # every node found its supernodes dead, once per supernode (cooldown)
    assert f["registry_egress_bytes"] == 40 * f["one_node_bytes"]
    assert f["supernode_sent_bytes"] == 0


def test_staggered_starts_are_fed_by_peers():
    f = simulate(["--nodes", "200", "--datacentres", "2", "--start-spread", "20"])
    assert f["peer_sent_bytes"] > 0.8 * 200 * f["one_node_bytes"]
    assert f["registry_egress_bytes"] == 2 * f["one_node_bytes"]
