#!/usr/bin/env python3
"""Discrete-event simulation of a rollout: thousands of nodes in several data centres start one image.

The policies are the code's own, imported, not re-typed: the 1 MiB pieces (dadi.p2p.piececache), the
nodes' rendezvous hashing over their data centre's supernodes and the cooldown of a failed one
(dadi.p2p.sources), the supernode's hotness, fan-out and peer choice (dadi.p2p.tracker.RedirectPolicy,
driven with the simulation's clock and a seeded Random), and the node's trace prefetch concurrency
(dadi.node.prefetch.TRACE_WORKERS). What is modelled around them, and how simply:

- Every node runs the same start: it needs the image's start pieces (by default the node benchmark's
  figures: 23.4 MB of a 326 MB image, tools/bench/mount.py), TRACE_WORKERS requests at a time, then
  runs for `--run-seconds` (the benchmark's start from a local layout). Its start time is when that ends.
- A request goes to the node's supernode for the piece (rendezvous over its data centre's supernodes).
  The supernode asks RedirectPolicy.decide: a redirect costs the node a round trip and sends it to a
  peer; "hold" makes the request ask again (RedirectPolicy.retry) every HOLD_POLL for up to HOLD_SECONDS
  while the piece's seeds get it; otherwise the supernode serves the piece (RedirectPolicy.served), from
  its cache or after one registry fetch shared by everyone waiting (single-flight). A node that got a
  piece announces it at once: the tracker knows after `--announce-delay` (default: half a round trip in
  the data centre).
- Uplinks are FIFO servers: a transfer waits for the sender's uplink, then takes size / the slower of
  the sender's uplink and the receiver's downlink; latency is half a round trip each way. A node takes
  at most TRACE_WORKERS pieces at once, so its downlink is not queued. There is no TCP ramp-up, loss
  or fair sharing: a queue is served in order instead of in parallel, which gives the same finishing
  time for the last byte and a pessimistic one for the first.
- `--kill-supernodes K` kills K supernodes (the first of each data centre in turn) at `--kill-at`
  seconds: a request to a dead one is refused after a round trip, the node passes it over for the
  code's cooldown and asks the next in its ranking, and the registry when none is left.

    .venv/bin/python tools/sim/p2p.py [--nodes 10000] [--datacentres 4] [--supernodes-per-dc 2] ...
    .venv/bin/python tools/sim/p2p.py --scenarios [--write]   # the standard set, as in docs/BENCHMARKS.md

Anchor: the DADI paper (USENIX ATC '20) started 10,000 containers on 1,000 hosts in under 4 s.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools" / "bench"))

from dadi.node.prefetch import TRACE_WORKERS  # noqa: E402
from dadi.p2p.piececache import PIECE_SIZE  # noqa: E402
from dadi.p2p.sources import DEFAULT_COOLDOWN, piece_key, rendezvous_order  # noqa: E402
from dadi.p2p.tracker import HOLD_POLL, HOLD_SECONDS, Decision, RedirectPolicy, Tracker  # noqa: E402

DIGEST = "sha256:" + "5" * 64  # the simulated image's layer (one blob: pieces are per blob anyway)
GBIT = 1e9 / 8


@dataclass
class Link:
    """One direction of a network interface: transfers take turns at `rate` bytes/s."""

    rate: float
    free_at: float = 0.0
    sent: int = 0


@dataclass
class Host:
    name: str
    up: Link
    down: Link
    dc: int


@dataclass
class Supernode(Host):
    cache: set[int] = field(default_factory=set)
    pending: dict[int, float] = field(default_factory=dict)  # piece -> when its registry fetch lands
    policy: RedirectPolicy = field(default_factory=RedirectPolicy)
    dead_from: float = float("inf")


@dataclass
class Node(Host):
    supernodes: list[Supernode] = field(default_factory=list)
    todo: list[int] = field(default_factory=list)  # start pieces not yet asked for, in trace order
    outstanding: int = 0
    got: int = 0
    started_at: float = 0.0
    ready_at: float | None = None
    avoid_until: dict[str, float] = field(default_factory=dict)  # supernode -> end of its cooldown


class Simulation:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.now = 0.0
        self.events: list[tuple[float, int, str, tuple]] = []
        self._seq = 0
        self.registry = Host("registry", Link(args.registry_gbit * GBIT), Link(args.registry_gbit * GBIT), -1)
        self.dcs: list[list[Supernode]] = []
        for dc in range(args.datacentres):
            policy_args = dict(fanout=args.fanout) if args.fanout else {}
            self.dcs.append([
                Supernode(f"sn{dc}-{i}", Link(args.supernode_gbit * GBIT), Link(args.supernode_gbit * GBIT), dc,
                          policy=RedirectPolicy(Tracker(**policy_args)))
                for i in range(args.supernodes_per_dc)
            ])
        self.nodes = [
            Node(f"node{n}", Link(args.node_gbit * GBIT), Link(args.node_gbit * GBIT), n % args.datacentres,
                 supernodes=self.dcs[n % args.datacentres])
            for n in range(args.nodes)
        ]
        self.by_name = {node.name: node for node in self.nodes}
        self.supernodes = {s.name: s for dc in self.dcs for s in dc}
        self.start_pieces = self._start_pieces()
        self.peer_bytes = 0
        self.redirects = 0
        self.holds = 0  # retries of requests told to wait for a seed to announce the piece
        self.failovers = 0
        killed = 0
        for i in range(args.supernodes_per_dc):
            for dc in self.dcs:
                if killed < args.kill_supernodes:
                    dc[i].dead_from = args.kill_at
                    killed += 1

    def _start_pieces(self) -> list[int]:
        """The pieces a start reads, in trace order: runs of a few pieces spread over the image."""
        total = int(self.args.image_mb * 1e6) // PIECE_SIZE + 1
        wanted = max(1, int(self.args.start_mb * 1e6) // PIECE_SIZE + 1)
        rng = random.Random(self.args.seed + 1)
        pieces: list[int] = []
        while len(pieces) < wanted:
            first = rng.randrange(total)
            pieces += [p for p in range(first, min(total, first + rng.randint(1, 4))) if p not in pieces]
        return pieces[:wanted]

    # -- the event loop -----------------------------------------------------------------------------

    def at(self, when: float, kind: str, *data) -> None:
        self._seq += 1
        heapq.heappush(self.events, (when, self._seq, kind, data))

    def run(self) -> dict:
        spread = self.args.start_spread
        for node in self.nodes:
            node.started_at = self.rng.uniform(0, spread) if spread else 0.0
            node.todo = list(self.start_pieces)
            self.at(node.started_at, "start", node.name)
        wall = time.perf_counter()
        while self.events:
            self.now, _, kind, data = heapq.heappop(self.events)
            getattr(self, "_on_" + kind)(*data)
        return self.figures(time.perf_counter() - wall)

    def _on_start(self, name: str) -> None:
        node = self.by_name[name]
        for _ in range(min(TRACE_WORKERS, len(node.todo))):
            self._ask(node, node.todo.pop(0))

    def _on_got(self, name: str, piece: int) -> None:
        node = self.by_name[name]
        node.outstanding -= 1
        node.got += 1
        self.at(self.now + self.args.announce_delay, "announce", name, piece)
        if node.todo:
            self._ask(node, node.todo.pop(0))
        elif node.outstanding == 0 and node.ready_at is None:
            node.ready_at = self.now + self.args.run_seconds

    def _on_announce(self, name: str, piece: int) -> None:
        node = self.by_name[name]
        for supernode in node.supernodes:  # a node announces to every supernode it uses
            if supernode.dead_from > self.now:
                supernode.policy.tracker.announce(name, self.now, add={DIGEST: [piece]})

    # -- one piece ----------------------------------------------------------------------------------

    def _ask(self, node: Node, piece: int) -> None:
        node.outstanding += 1
        when = self.now
        rtt = self.args.dc_rtt
        ranking = [s for s in rendezvous_order(piece_key(DIGEST, piece), [s.name for s in node.supernodes])]
        by_name = {s.name: s for s in node.supernodes}
        for name in ranking:
            supernode = by_name[name]
            if node.avoid_until.get(name, 0.0) > when:
                continue
            if supernode.dead_from <= when:  # refused after a round trip: cooldown, next one
                when += rtt
                node.avoid_until[name] = when + DEFAULT_COOLDOWN
                self.failovers += 1
                continue
            self.at(when + rtt / 2, "arrive", node.name, supernode.name, piece)
            return
        done = self._transfer(self.registry, node, PIECE_SIZE, when + self.args.registry_rtt / 2,
                              self.args.registry_rtt)
        self.at(done, "got", node.name, piece)

    def _on_arrive(self, name: str, supernode_name: str, piece: int) -> None:
        """A node's request for a piece reaches its supernode, which redirects, holds or serves it."""
        node, supernode = self.by_name[name], self.supernodes[supernode_name]
        start, end = piece * PIECE_SIZE, (piece + 1) * PIECE_SIZE
        decision = supernode.policy.decide(DIGEST, start, end, self.now, self.rng, requester=name)
        self._follow(node, supernode, piece, decision, self.now + HOLD_SECONDS)

    def _on_retry(self, name: str, supernode_name: str, piece: int, hold_until: float) -> None:
        node, supernode = self.by_name[name], self.supernodes[supernode_name]
        start, end = piece * PIECE_SIZE, (piece + 1) * PIECE_SIZE
        decision = supernode.policy.retry(DIGEST, start, end, self.now, self.rng, requester=name)
        if decision.peer is None and decision.reason != "seed" and self.now + HOLD_POLL <= hold_until:
            decision = Decision(None, "hold")
        self._follow(node, supernode, piece, decision, hold_until)

    def _follow(self, node: Node, supernode: Supernode, piece: int, decision: Decision, hold_until: float) -> None:
        rtt = self.args.dc_rtt
        if decision.peer is not None:
            self.redirects += 1
            peer = self.by_name[decision.peer]
            done = self._transfer(peer, node, PIECE_SIZE, self.now + rtt, rtt)  # 307 back, then ask the peer
            self.peer_bytes += PIECE_SIZE
        elif decision.reason == "hold" and self.now + HOLD_POLL <= hold_until:
            self.holds += 1
            self.at(self.now + HOLD_POLL, "retry", node.name, supernode.name, piece, hold_until)
            return
        else:
            done = self._serve(supernode, node, piece)
        self.at(done, "got", node.name, piece)

    def _serve(self, supernode: Supernode, node: Node, piece: int) -> float:
        """The supernode sends the piece itself: from its cache, or after one registry fetch shared by
        every request that waits for it (single-flight)."""
        supernode.policy.served(DIGEST, piece * PIECE_SIZE, (piece + 1) * PIECE_SIZE, self.now, node.name)
        if piece in supernode.cache:
            ready = self.now
        elif piece in supernode.pending:
            ready = supernode.pending[piece]
        else:
            ready = self._transfer(self.registry, supernode, PIECE_SIZE, self.now + self.args.registry_rtt / 2,
                                   self.args.registry_rtt)
            supernode.pending[piece] = ready
            self.at(ready, "cached", supernode.name, piece)
        return self._transfer(supernode, node, PIECE_SIZE, max(self.now, ready), self.args.dc_rtt)

    def _on_cached(self, name: str, piece: int) -> None:
        supernode = self.supernodes[name]
        supernode.cache.add(piece)
        supernode.pending.pop(piece, None)

    def _transfer(self, sender: Host, receiver: Host, size: int, ready: float, rtt: float) -> float:
        """When `size` bytes asked for at `ready` (the request has arrived) have reached the receiver."""
        rate = min(sender.up.rate, receiver.down.rate)
        begin = max(ready, sender.up.free_at)
        sender.up.free_at = begin + size / rate
        sender.up.sent += size
        return begin + size / rate + rtt / 2

    # -- figures ------------------------------------------------------------------------------------

    def figures(self, wall: float) -> dict:
        starts = sorted(node.ready_at - node.started_at for node in self.nodes)
        one_node = len(self.start_pieces) * PIECE_SIZE

        def pct(p: float) -> float:
            return starts[min(len(starts) - 1, int(p / 100 * len(starts)))]

        supernode_sent = sum(s.up.sent for dc in self.dcs for s in dc)
        return {
            "nodes": len(self.nodes), "datacentres": len(self.dcs), "supernodes": sum(map(len, self.dcs)),
            "start_pieces": len(self.start_pieces), "one_node_bytes": one_node,
            "registry_egress_bytes": self.registry.up.sent,
            "registry_egress_per_node_need": self.registry.up.sent / one_node,
            "supernode_sent_bytes": supernode_sent, "peer_sent_bytes": self.peer_bytes,
            "redirects": self.redirects, "holds": self.holds, "failovers": self.failovers,
            "start_seconds": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": starts[-1],
                              "mean": statistics.fmean(starts)},
            "last_ready_seconds": max(node.ready_at for node in self.nodes),
            "simulated_in_seconds": wall,
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--datacentres", type=int, default=4)
    parser.add_argument("--supernodes-per-dc", type=int, default=2)
    parser.add_argument("--image-mb", type=float, default=326.3, help="image size (the node benchmark's)")
    parser.add_argument("--start-mb", type=float, default=23.4, help="what a start reads (the node benchmark's)")
    parser.add_argument("--run-seconds", type=float, default=0.5,
                        help="the start once its data is local (the node benchmark's local-layout start)")
    parser.add_argument("--node-gbit", type=float, default=10.0)
    parser.add_argument("--supernode-gbit", type=float, default=25.0)
    parser.add_argument("--registry-gbit", type=float, default=10.0, help="the registry's total egress")
    parser.add_argument("--dc-rtt", type=float, default=0.0005, help="round trip inside a data centre, s")
    parser.add_argument("--registry-rtt", type=float, default=0.03, help="round trip to the registry, s")
    parser.add_argument("--announce-delay", type=float, default=None,
                        help="piece landed -> tracker knows, s (default: half of --dc-rtt: the announce's trip)")
    parser.add_argument("--start-spread", type=float, default=0.0, help="nodes start uniformly over this, s")
    parser.add_argument("--fanout", type=int, default=0, help="override the tracker's PEER_FANOUT (0: the code's)")
    parser.add_argument("--kill-supernodes", type=int, default=0)
    parser.add_argument("--kill-at", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenarios", action="store_true", help="run the standard scenarios (other options "
                        "apply to each), print a table")
    parser.add_argument("--write", action="store_true", help="with --scenarios: write the table into "
                        "docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.announce_delay is None:
        args.announce_delay = args.dc_rtt / 2
    return args


SCENARIOS = [
    ("10,000 nodes start at once", []),
    ("1,000 hosts start at once (the DADI paper's 10,000 containers ran on 1,000 hosts)", ["--nodes", "1000"]),
    # Killed while the pieces still move (they all have by 0.4 s: after that a start only runs).
    ("1,000 hosts, one supernode of each data centre killed 0.1 s in", ["--nodes", "1000", "--kill-supernodes", "4",
                                                                         "--kill-at", "0.1"]),
    ("10,000 nodes start over 30 s (a rolling update)", ["--start-spread", "30"]),
]


def simulate(argv: list[str]) -> dict:
    return Simulation(parse_args(argv)).run()


def scenario_table(argv: list[str]) -> str:
    args = parse_args(argv)
    lines = [
        f"Command: `.venv/bin/python tools/sim/p2p.py --scenarios --write{' ' + ' '.join(argv) if argv else ''}`. "
        f"{args.datacentres} data centres with {args.supernodes_per_dc} supernodes each ({args.supernode_gbit:g} "
        f"Gbit/s), nodes at {args.node_gbit:g} Gbit/s, registry egress {args.registry_gbit:g} Gbit/s at "
        f"{args.registry_rtt * 1000:g} ms RTT, {args.dc_rtt * 1000:g} ms inside a data centre. Each start "
        f"reads {args.start_mb:g} MB of a {args.image_mb:g} MB image and then runs {args.run_seconds:g} s "
        "(the node benchmark's figures). Policies imported from the code: 1 MiB pieces, rendezvous hashing "
        "and cooldown, the tracker's hotness, fan-out and peer choice, the trace prefetch's concurrency.",
        "",
        "| scenario | registry egress (x one start's bytes) | supernodes sent | peers sent | start p50 / p99 / max (s) |",
        "|---|---|---|---|---|",
    ]
    for title, extra in SCENARIOS:
        f = simulate([*extra, *argv])
        s = f["start_seconds"]
        lines.append(
            f"| {title} | {f['registry_egress_bytes'] / 1e9:.2f} GB ({f['registry_egress_per_node_need']:.1f}x) | "
            f"{f['supernode_sent_bytes'] / 1e9:.1f} GB | {f['peer_sent_bytes'] / 1e9:.1f} GB | "
            f"{s['p50']:.2f} / {s['p99']:.2f} / {s['max']:.2f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", "Anchor: the DADI paper started 10,000 containers on 1,000 hosts in under 4 s."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.scenarios:
        print(json.dumps(simulate(argv), indent=2))
        return 0
    rest = [a for a in argv if a not in ("--scenarios", "--write")]
    body = scenario_table(rest)
    print(body)
    if args.write:
        from report import write_section

        write_section("P2P simulation: 10,000 nodes", body)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
