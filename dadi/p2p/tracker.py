"""The supernode's tracker: which peers hold which pieces of which blobs, and which peer (if any) a request
for a hot piece is redirected to. Pure policy: no I/O, no clock, no global randomness.

Every method takes `now` (seconds on any monotonic clock) and choices take a `random.Random`, so the same
classes and constants drive the supernode (dadi/p2p/supernode.py feeds them from HTTP) and a simulation
(tools/sim imports them) and give the same answers for the same inputs.

The policy, and why:

- **Pieces** are the supernode's 1 MiB pieces (PIECE_SIZE, aligned to blob offset 0). A peer announces
  a piece once it can serve every byte of it (dadi/p2p/peer.py decides that from its chunk cache).
- **Hot** (HotPieces): a piece asked for HOT_REQUESTS times within HOT_WINDOW seconds. A cold piece is
  served by the supernode: one node asking costs the supernode one piece either way, and a redirect
  costs the node an extra round trip. When many nodes start the same image, each piece is asked for by
  all of them within seconds; from the second request on the peers take over.
- **Fan-out** (Tracker.choose): each peer gets at most PEER_FANOUT redirects at a time. The supernode
  does not see a peer's upload end, so a redirect holds a slot for the time the upload should take
  (`lease_seconds`: the range at PEER_UPLOAD_RATE, at least MIN_LEASE). A peer with no free slot is
  passed over; when no holder has one, the supernode serves the piece itself. So every source feeds a
  bounded number of nodes at once, and the nodes it fed become sources for the next ones: the load
  spreads as a tree whose width grows with every round, instead of a star on the first holder.
- **Choice**: among the live holders of every piece the range spans with a free slot, the least loaded
  (fewest slots taken) of up to SAMPLE of them drawn by the Random passed in (all of them when there
  are no more); ties broken by the same Random, so load spreads over equals. The tracker keeps, per
  piece, the holders that could take a redirect now (live, not penalised, a free slot): a request looks
  at SAMPLE of them, not at every holder, so its cost does not grow with the number of nodes. A peer
  moves in or out of those sets when its state changes (a slot taken or freed at the edge of its
  fan-out, a report, an announce, expiry): that costs the pieces it announced, once per change.
- **Liveness**: an announce is valid for ANNOUNCE_TTL seconds (peers re-announce every
  ANNOUNCE_INTERVAL, so two lost announces are forgiven); a peer that stopped announcing expires with
  all its pieces; it is forgotten when the tracker next looks at the time (the same queue of wake-ups
  that tracks cooldowns and slots), not by a scan of every peer. A node that was redirected and found
  the peer failing reports it: the peer is passed
  over for PEER_FAILURE_COOLDOWN seconds. A peer reported for sending bytes that failed their sha256
  loses every piece it announced and is refused for PEER_CORRUPT_BAN seconds.
- **Never to itself**: a requester is never redirected to its own peer address.
- **Seeds and holding** (RedirectPolicy): nodes that start together ask for the same piece within
  milliseconds, before anyone holds it, so a hot piece would still go out from the supernode to all of
  them. Instead the supernode sends it itself to SEED_COPIES nodes (per SEED_WINDOW) that serve peers
  and whose requests cover most of it (SEED_COVERAGE: they will hold it whole once served, and announce
  it; the caller reports only such requests to `served`); a later
  request for it waits up to HOLD_SECONDS for one of them to announce it and is then redirected, or
  served by the supernode if none did. A request for a small part of a piece (a sparse on-demand read)
  makes no seed, so it never waits for one. A seed's own other requests for the piece (the rest of it,
  when part of it came with another of its fetches) are never held: it would wait for itself.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from dadi.p2p.piececache import PIECE_SIZE, pieces_spanning

HOT_WINDOW = 10.0  # seconds over which requests for a piece are counted
HOT_REQUESTS = 2  # requests within HOT_WINDOW that make a piece hot (the 2nd requester may get a peer)
PEER_FANOUT = 4  # redirects one peer may be serving at once (and a peer's own upload limit by default)
PEER_UPLOAD_RATE = 50e6  # bytes/s one upload is assumed to get: how long a redirect holds a slot
MIN_LEASE = 0.05  # seconds: the least a redirect holds a slot (connection setup, a round trip)
ANNOUNCE_INTERVAL = 10.0  # seconds between a peer's full announces (changes go out at once, batched)
ANNOUNCE_TTL = 3 * ANNOUNCE_INTERVAL  # an announce not renewed within this expires with its pieces
PEER_FAILURE_COOLDOWN = 15.0  # seconds a peer reported unreachable (error, timeout, busy) is passed over
PEER_CORRUPT_BAN = 600.0  # seconds a peer reported for corrupt bytes is refused (and its pieces dropped)
SEED_COPIES = 2  # nodes the supernode itself sends a hot piece no peer holds, per SEED_WINDOW
SEED_WINDOW = 1.0  # seconds
SEED_COVERAGE = 0.75  # share of a piece a request must cover to make its requester a seed of the piece
HOLD_SECONDS = 0.2  # how long a request for a seeded piece waits for a seed to announce it
HOLD_POLL = 0.01  # seconds between looks for a holder while a request waits
MAX_HOT_KEYS = 1 << 16  # pieces whose recent requests are remembered: a bound on the tracker's memory
# Holders with a free slot a request looks at (Tracker.choose). Every one of them can take the redirect;
# the sample only decides how close to the least loaded the choice is. Slots taken range over 0..
# PEER_FANOUT-1, so when a quarter of the free holders have the fewest, 16 draws miss all of those with
# probability (3/4)^16 = 1% (32 would make it 0.01% for twice the work); and when most holders are busy,
# few are free and all of them are looked at. Either way a request costs 16 look-ups, not one per holder.
SAMPLE = 16

FAILED, CORRUPT = "failed", "corrupt"  # what a node reports about a peer


def lease_seconds(nbytes: int) -> float:
    """How long a redirect of `nbytes` holds one of the peer's PEER_FANOUT slots."""
    return max(MIN_LEASE, nbytes / PEER_UPLOAD_RATE)


class HotPieces:
    """Recent requests per piece: `record` counts one and says how many fell within the window."""

    def __init__(self, window: float = HOT_WINDOW, threshold: int = HOT_REQUESTS, max_keys: int = MAX_HOT_KEYS):
        self.window = window
        self.threshold = threshold
        self.max_keys = max_keys
        self._times: dict[tuple[str, int], deque[float]] = {}

    def record(self, digest: str, piece: int, now: float) -> int:
        times = self._times.get((digest, piece))
        if times is None:
            if len(self._times) >= self.max_keys:
                self._prune(now)
            times = self._times[(digest, piece)] = deque()
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        return len(times)

    def count(self, digest: str, piece: int, now: float) -> int:
        """Requests within the window, without counting one."""
        times = self._times.get((digest, piece), ())
        return sum(1 for t in times if t > now - self.window)

    def is_hot(self, count: int) -> bool:
        return count >= self.threshold

    def _prune(self, now: float) -> None:
        for key in [k for k, t in self._times.items() if not t or t[-1] <= now - self.window]:
            del self._times[key]
        while len(self._times) >= self.max_keys:  # all recent: forget the oldest-inserted
            del self._times[next(iter(self._times))]


class Seeds:
    """Per piece, the nodes the supernode itself sent most of it within `window` seconds: its seeds. A piece
    with `copies` of them is worth waiting for (RedirectPolicy); a seed itself never waits for it."""

    def __init__(self, window: float = SEED_WINDOW, copies: int = SEED_COPIES, max_keys: int = MAX_HOT_KEYS):
        self.window = window
        self.copies = copies
        self.max_keys = max_keys
        self._seeds: dict[tuple[str, int], dict[str, float]] = {}  # (digest, piece) -> {node: when}

    def record(self, digest: str, piece: int, node: str, now: float) -> None:
        seeds = self._seeds.get((digest, piece))
        if seeds is None:
            if len(self._seeds) >= self.max_keys:
                self._prune(now)
            seeds = self._seeds[(digest, piece)] = {}
        elif len(seeds) >= 8 * self.copies:  # a piece served to many nodes over time: keep the recent ones
            for old in [n for n, when in seeds.items() if when <= now - self.window]:
                del seeds[old]
        seeds[node] = now

    def seeded(self, digest: str, piece: int, now: float) -> bool:
        """The piece has `copies` seeds within the window."""
        seeds = self._seeds.get((digest, piece), {})
        return sum(1 for when in seeds.values() if when > now - self.window) >= self.copies

    def is_seed(self, digest: str, piece: int, node: str, now: float) -> bool:
        return self._seeds.get((digest, piece), {}).get(node, -math.inf) > now - self.window

    def _prune(self, now: float) -> None:
        for key in [k for k, seeds in self._seeds.items() if max(seeds.values()) <= now - self.window]:
            del self._seeds[key]
        while len(self._seeds) >= self.max_keys:  # all recent: forget the oldest-inserted
            del self._seeds[next(iter(self._seeds))]


@dataclass
class PeerState:
    """What the tracker knows about one peer (its URL is the key in Tracker.peers)."""

    expires: float  # announce valid until
    pieces: dict[str, set[int]] = field(default_factory=dict)  # digest -> pieces it can serve whole
    leases: list[float] = field(default_factory=list)  # end times of the redirects it is serving
    down_until: float = 0.0  # reported failing: passed over until then
    banned_until: float = 0.0  # reported corrupt: refused (announces ignored) until then
    ready: bool = False  # in Tracker._ready of each piece it holds: could take a redirect when last looked
    check_at: float = math.inf  # when Tracker._wake next looks at it (its state may change with time)

    def load(self, now: float) -> int:
        self.leases = [end for end in self.leases if end > now]
        return len(self.leases)


class _Pool:
    """A set that can also be sampled in O(k): the members in a list (removal swaps in the last one) and
    their positions in a dict. The list's order depends only on the order of the calls, so a sample
    drawn with a seeded Random is reproducible (a set of strings iterates in a per-process order)."""

    def __init__(self) -> None:
        self._items: list[str] = []
        self._index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: str) -> bool:
        return item in self._index

    def add(self, item: str) -> None:
        if item not in self._index:
            self._index[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: str) -> None:
        i = self._index.pop(item, None)
        if i is None:
            return
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._index[last] = i

    def sample(self, k: int, rng: random.Random) -> list[str]:
        """Up to `k` members without repeats: all of them when there are no more than `k`."""
        if len(self._items) <= k:
            return list(self._items)
        return rng.sample(self._items, k)  # picks k indices: O(k), whatever the size


class Tracker:
    """Peers, the pieces each can serve, and the choice of a peer for a range (see the module docstring)."""

    def __init__(self, *, fanout: int = PEER_FANOUT, ttl: float = ANNOUNCE_TTL,
                 failure_cooldown: float = PEER_FAILURE_COOLDOWN, corrupt_ban: float = PEER_CORRUPT_BAN):
        self.fanout = fanout
        self.ttl = ttl
        self.failure_cooldown = failure_cooldown
        self.corrupt_ban = corrupt_ban
        self.peers: dict[str, PeerState] = {}
        self._holders: dict[tuple[str, int], set[str]] = {}  # (digest, piece) -> peers
        # (digest, piece) -> the holders that could take a redirect (live, not penalised, a free slot),
        # kept up to date as peers change state so that choose() samples it instead of scanning holders.
        self._ready: dict[tuple[str, int], _Pool] = {}
        # (time, sequence, peer): when a peer's state may change by itself (an announce runs out, a
        # cooldown ends, a slot frees up at full fan-out). Entries are superseded, not removed: only the
        # one at the peer's `check_at` counts. The sequence keeps the order reproducible.
        self._wakes: list[tuple[float, int, str]] = []
        self._seq = 0

    # --- what peers say ------------------------------------------------------------------------------

    def announce(self, peer: str, now: float, *, add: dict[str, Iterable[int]] | None = None,
                 withdraw: dict[str, Iterable[int]] | None = None, full: bool = False) -> bool:
        """Record a peer's announce: pieces it can now serve (`add`), pieces it no longer can
        (`withdraw`); `full` replaces everything it announced before by `add`. Renews its TTL. False
        (and nothing recorded) while the peer is banned for corrupt bytes."""
        self._wake(now)  # first: it may forget this very peer, whose announce ran out
        state = self.peers.get(peer)
        if state is not None and state.banned_until > now:
            return False
        if state is None:
            state = self.peers[peer] = PeerState(expires=now + self.ttl)
        state.expires = now + self.ttl
        if full:
            self._drop_pieces(peer, state)
        for digest, pieces in (withdraw or {}).items():
            held = state.pieces.get(digest)
            for piece in pieces:
                if held is not None:
                    held.discard(piece)
                self._unhold(digest, piece, peer)
            if held is not None and not held:
                del state.pieces[digest]
        for digest, pieces in (add or {}).items():
            held = state.pieces.setdefault(digest, set())
            for piece in pieces:
                held.add(piece)
                self._holders.setdefault((digest, piece), set()).add(peer)
                if state.ready:
                    self._ready.setdefault((digest, piece), _Pool()).add(peer)
        self._refresh(peer, state, now)  # renewed: an expired peer is ready again
        return True

    def leave(self, peer: str) -> None:
        """The peer stops serving (a daemon shutting down): forget it and its pieces."""
        state = self.peers.pop(peer, None)
        if state is not None:
            self._drop_pieces(peer, state)

    def report(self, peer: str, reason: str, now: float) -> None:
        """A node found `peer` failing (FAILED) or sending bytes that failed sha256 (CORRUPT)."""
        state = self.peers.get(peer)
        if state is None:
            if reason != CORRUPT:
                return
            state = self.peers[peer] = PeerState(expires=now)
        if reason == CORRUPT:
            state.banned_until = now + self.corrupt_ban
            self._drop_pieces(peer, state)
            state.expires = max(state.expires, state.banned_until)  # kept so that the ban is remembered
        else:
            state.down_until = now + self.failure_cooldown
        self._refresh(peer, state, now)

    def expire(self, now: float) -> list[str]:
        """Forget peers whose announce ran out (and whose ban, if any, is over) by `now`; the URLs of
        those not already forgotten by an earlier announce() or choose(), which look at the time too."""
        return self._wake(now)

    # --- where a range goes --------------------------------------------------------------------------

    def holders(self, digest: str, pieces: range, now: float) -> list[str]:
        """Live peers, not banned or cooling down, that announced every piece of `pieces` (all of them,
        sorted: a listing for tests and diagnostics; choose() does not scan it)."""
        found: set[str] | None = None
        for piece in pieces:
            peers = self._holders.get((digest, piece), set())
            found = set(peers) if found is None else found & peers
            if not found:
                return []
        return sorted(
            p for p in found or ()
            if (s := self.peers.get(p)) is not None and s.expires > now and s.down_until <= now
            and s.banned_until <= now
        )  # fmt: skip

    def choose(self, digest: str, start: int, end: int, now: float, rng: random.Random, *,
               exclude: str | None = None, piece_size: int = PIECE_SIZE) -> str | None:
        """A peer for blob bytes [start, end) (end exclusive), holding a fan-out slot for it; None when
        no live holder has a free slot. `now` must not go back between calls.

        The candidates are up to SAMPLE holders with a free slot of the piece that has the fewest. For a
        range within one piece (a node's whole-piece and chunk requests) that finds a peer whenever one
        has a free slot: with more than SAMPLE such holders at least SAMPLE - 1 of those drawn are not
        `exclude`. A range across pieces is sent to a drawn holder of the rarest that also holds the
        others; when none of SAMPLE does, the supernode serves it (as when nobody has a free slot)."""
        self._wake(now)
        pools = [self._ready.get((digest, piece)) for piece in pieces_spanning(start, end, piece_size)]
        if not pools or not all(pools):  # an empty range, or a piece nobody ready holds
            return None
        rarest = min(pools, key=len)
        candidates = []
        for peer in rarest.sample(SAMPLE, rng):
            if peer == exclude or not all(peer in pool for pool in pools):
                continue
            state = self.peers[peer]
            load = state.load(now)
            if self._is_ready(state, now, load):
                candidates.append((load, peer))
            else:  # cannot happen while `now` goes forward; never hand out a peer that is not ready
                self._refresh(peer, state, now)
        if not candidates:
            return None
        least = min(load for load, _ in candidates)
        peer = rng.choice([p for load, p in candidates if load == least])
        state = self.peers[peer]
        state.leases.append(now + lease_seconds(end - start))
        if least + 1 >= self.fanout:  # its last free slot: out of the pools until one frees up
            self._refresh(peer, state, now)
        return peer

    def piece_count(self) -> int:
        """(digest, piece) pairs some peer announced."""
        return len(self._holders)

    # --- internals -----------------------------------------------------------------------------------

    def _unhold(self, digest: str, piece: int, peer: str) -> None:
        _discard(self._holders, (digest, piece), peer)
        _discard(self._ready, (digest, piece), peer)

    def _drop_pieces(self, peer: str, state: PeerState) -> None:
        for digest, pieces in state.pieces.items():
            for piece in pieces:
                self._unhold(digest, piece, peer)
        state.pieces = {}

    def _is_ready(self, state: PeerState, now: float, load: int) -> bool:
        """Could take a redirect: live, not cooling down or banned, a free slot."""
        return state.expires > now and state.down_until <= now and state.banned_until <= now and load < self.fanout

    def _refresh(self, peer: str, state: PeerState, now: float) -> None:
        """Put the peer in or take it out of the ready pools of its pieces if its state changed, and
        schedule the next look at it: when it may change by itself."""
        load = state.load(now)
        ready = self._is_ready(state, now, load)
        if ready != state.ready:
            state.ready = ready
            for digest, pieces in state.pieces.items():
                for piece in pieces:
                    if ready:
                        self._ready.setdefault((digest, piece), _Pool()).add(peer)
                    else:
                        _discard(self._ready, (digest, piece), peer)
        times = [t for t in (state.expires, state.down_until, state.banned_until) if t > now]
        if load >= self.fanout:
            times.append(min(state.leases))  # a slot frees up
        when = min(times, default=math.inf)
        if when < state.check_at or state.check_at <= now:  # else the earlier look is still due
            state.check_at = when
            if when < math.inf:
                self._seq += 1
                heapq.heappush(self._wakes, (when, self._seq, peer))

    def _wake(self, now: float) -> list[str]:
        """Look again at the peers whose state may have changed by itself up to `now`, and forget those
        whose announce ran out (every live peer has a look scheduled by then: _refresh); their URLs."""
        gone = []
        while self._wakes and self._wakes[0][0] <= now:
            when, _, peer = heapq.heappop(self._wakes)
            state = self.peers.get(peer)
            if state is None or state.check_at != when:
                continue
            state.check_at = math.inf
            if state.expires <= now:
                self.leave(peer)
                gone.append(peer)
            else:
                self._refresh(peer, state, now)
        return gone


def _discard(sets: dict, key: tuple[str, int], peer: str) -> None:
    """Take `peer` out of the set (or _Pool) at `key`, and the key out of `sets` once nobody is left."""
    members = sets.get(key)
    if members is not None:
        members.discard(peer)
        if not members:
            del sets[key]


@dataclass(frozen=True)
class Decision:
    peer: str | None  # where to redirect, or None: the supernode serves
    # "peer", "cold" (not hot), "no_peer" (hot, but no holder with a free slot), "hold" (no holder yet,
    # but seeds are being served: ask again with `retry` for up to HOLD_SECONDS), "seed" (no holder yet,
    # and the requester is one of the seeds: serve it now)
    reason: str


class RedirectPolicy:
    """Hotness + tracker + seeds: where a node's request for blob bytes [start, end) should go. The
    caller reports what the supernode served itself with `served`."""

    def __init__(self, tracker: Tracker | None = None, hot: HotPieces | None = None, *,
                 seeds: Seeds | None = None, coverage: float = SEED_COVERAGE):
        self.tracker = tracker or Tracker()
        self.hot = hot or HotPieces()
        self.seeds = seeds or Seeds()
        self.coverage = coverage

    def decide(self, digest: str, start: int, end: int, now: float, rng: random.Random, *,
               requester: str | None = None, piece_size: int = PIECE_SIZE) -> Decision:
        counts = [self.hot.record(digest, piece, now) for piece in pieces_spanning(start, end, piece_size)]
        if not self.hot.is_hot(min(counts)):
            return Decision(None, "cold")
        peer = self.tracker.choose(digest, start, end, now, rng, exclude=requester, piece_size=piece_size)
        if peer is not None:
            return Decision(peer, "peer")
        pieces = pieces_spanning(start, end, piece_size)
        seeded = all(self.seeds.seeded(digest, p, now) for p in pieces)
        if seeded and self._is_seed(digest, pieces, requester, now):
            return Decision(None, "seed")
        return Decision(None, "hold" if seeded else "no_peer")

    def retry(self, digest: str, start: int, end: int, now: float, rng: random.Random, *,
              requester: str | None = None, piece_size: int = PIECE_SIZE) -> Decision:
        """Ask again for a request told to hold (its hotness is not counted twice). "seed": the requester
        has become one of the piece's seeds meanwhile, so serve it now."""
        peer = self.tracker.choose(digest, start, end, now, rng, exclude=requester, piece_size=piece_size)
        if peer is not None:
            return Decision(peer, "peer")
        if self._is_seed(digest, pieces_spanning(start, end, piece_size), requester, now):
            return Decision(None, "seed")
        return Decision(None, "no_peer")

    def served(self, digest: str, start: int, end: int, now: float, requester: str,
               piece_size: int = PIECE_SIZE) -> None:
        """The supernode serves bytes [start, end) itself to `requester` (the node's peer URL): it becomes
        a seed of the pieces the range covers mostly."""
        for piece in pieces_spanning(start, end, piece_size):
            lo, hi = piece * piece_size, (piece + 1) * piece_size
            if min(end, hi) - max(start, lo) >= self.coverage * piece_size:
                self.seeds.record(digest, piece, requester, now)

    def _is_seed(self, digest: str, pieces: range, requester: str | None, now: float) -> bool:
        return requester is not None and all(self.seeds.is_seed(digest, p, requester, now) for p in pieces)
