"""The node's view of its supernodes: one chunk source that spreads pieces over several of them.

`dadi mount --supernode URL` (repeatable) puts a SupernodeSet in front of the registry in the fetcher's
source order. Which supernode serves a byte range is decided per 1 MiB piece (the supernodes' own unit,
dadi.p2p.piececache.PIECE_SIZE) by rendezvous hashing (highest random weight): every node ranks the
supernodes for a piece the same way, so each piece is cached on one supernode and leaves the registry
once, and when a supernode is added or lost only the pieces it ranked first move. A range the fetcher
coalesced across pieces is cut at piece boundaries, each part going to its own supernode.

Failover: a supernode that fails a request is skipped for `cooldown` seconds, and the part goes to the
next one in its ranking; when every supernode failed, the SourceError sends the fetcher on to the next
source (the registry). Supernodes cannot verify pieces; the fetcher checks every chunk's sha256 as it
does for any source, and a supernode that sends wrong bytes is penalised there.

Peers: a supernode may answer a hot piece with a 307 to a peer that holds it (dadi/p2p/tracker.py). The
part is then asked of that peer, without our registry credentials (the redirect's ticket is the peer's
proof that the supernode checked them), for at most PEER_TIMEOUT seconds. A peer that fails, times out,
is busy or sends a short read costs one round trip: the part goes back to the same supernode marked
"serve it yourself", with a report that the peer failed, and the peer is passed over here for
PEER_COOLDOWN seconds. Bytes from peers reach the fetcher like any others and are checked against the
chunks' sha256 there; the fetcher asks `blame_corrupt` who sent bad ones, and a peer that did is
reported to every supernode and not used again for PEER_CORRUPT_PENALTY seconds (the supernode, which
only passed on the redirect, is not penalised).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import xxhash

from dadi.node.fetch import HttpChunkSource, Redirected, SourceError
from dadi.p2p.peerproto import NO_REDIRECT_HEADER, PEER_PORT_HEADER, PEER_REPORT_HEADER, format_reports
from dadi.p2p.piececache import PIECE_SIZE
from dadi.p2p.tracker import CORRUPT, FAILED, SEED_COVERAGE

log = logging.getLogger(__name__)

DEFAULT_COOLDOWN = 10.0  # seconds a failed supernode is passed over
PEER_TIMEOUT = 3.0  # seconds a redirected part waits for the peer (a 1 MiB piece takes ~10 ms on a LAN)
PEER_COOLDOWN = 15.0  # seconds a peer that failed us is passed over (as the tracker does)
PEER_CORRUPT_PENALTY = 600.0  # seconds a peer that sent corrupt bytes is not used again
RECENT_DELIVERIES = 4096  # peer deliveries remembered, to blame the sender of bytes that fail sha256


@dataclass
class PeerStats:
    """What this node got from peers (every view whose image goes through these supernodes)."""

    redirects: int = 0  # 307s followed to a peer
    received_bytes: int = 0  # bytes peers sent (checked by the fetcher like any others)
    failures: int = 0  # redirects where the peer failed, timed out, was busy or sent a short read
    corrupt_chunks: int = 0  # chunks from peers that failed their sha256


def rendezvous_order(key: bytes, members: Sequence[str]) -> list[str]:
    """`members` ranked for `key`, best first: by a 64-bit hash of (member, key), highest first."""
    return sorted(members, key=lambda m: (xxhash.xxh3_64_intdigest(m.encode() + b"\0" + key), m), reverse=True)


def piece_key(digest: str, piece: int) -> bytes:
    return f"{digest}#{piece}".encode()


class SupernodeSet:
    """A ChunkSource (dadi.node.fetch) over supernodes, each piece from its rendezvous-ranked supernode."""

    def __init__(self, urls: Sequence[str], repository: str, *, authorization: str | None = None,
                 name: str = "supernode", piece_size: int = PIECE_SIZE, cooldown: float = DEFAULT_COOLDOWN,
                 clock=time.monotonic, peer_port: Callable[[], int | None] = lambda: None):
        if not urls:
            raise ValueError("SupernodeSet needs at least one supernode URL")
        self.name = name
        self.piece_size = piece_size
        self.cooldown = cooldown
        self._clock = clock
        self._sources = {url.rstrip("/"): HttpChunkSource(url, repository, f"{name} {url}", authorization=authorization)
                         for url in urls}
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()
        self.bytes_by_supernode: dict[str, int] = dict.fromkeys(self._sources, 0)
        self.peer_stats = PeerStats()
        self._peer_port = peer_port  # our own peer server's port (None: not serving), so never sent to it
        self._peers = HttpChunkSource("", repository, "peer")  # fetch_url only; never our credentials
        self._peer_down_until: dict[str, float] = {}
        self._peer_banned_until: dict[str, float] = {}
        self._reports: dict[str, list[tuple[str, str]]] = {url: [] for url in self._sources}
        self._deliveries: deque[tuple[str, int, int, str]] = deque(maxlen=RECENT_DELIVERIES)

    @property
    def urls(self) -> list[str]:
        return list(self._sources)

    @property
    def seed_share(self) -> float | None:
        """The share of a piece a request must cover to make this node one of the piece's seeds
        (tracker.SEED_COVERAGE), while it serves peers; a node asking for that much asks for all of it,
        so that it can announce the piece (dadi.node.view.round_to_pieces). None: it serves no peers."""
        return SEED_COVERAGE if self._peer_port() else None

    def fetch_range(self, digest: str, offset: int, length: int, timeout: float) -> bytes:
        parts = []
        end = offset + length
        position = offset
        while position < end:
            piece = position // self.piece_size
            part_end = min(end, (piece + 1) * self.piece_size)
            data = self._fetch_part(digest, piece, position, part_end - position, timeout)
            parts.append(data)
            if len(data) < part_end - position:
                break  # the blob ended early: the fetcher sees the short read
            position = part_end
        return b"".join(parts)

    def _fetch_part(self, digest: str, piece: int, offset: int, length: int, timeout: float) -> bytes:
        errors = []
        for url in self._ranked(digest, piece):
            source = self._sources[url]
            try:
                try:
                    data = source.fetch_range(digest, offset, length, timeout, headers=self._headers(url),
                                              follow_redirects=False)
                except Redirected as redirect:
                    data = self._from_peer(redirect.location, digest, offset, length, timeout)
                    if data is None:  # the peer let us down: the supernode serves it after all
                        data = source.fetch_range(digest, offset, length, timeout,
                                                  headers=self._headers(url, no_redirect=True), follow_redirects=False)
            except SourceError as e:
                with self._lock:
                    self._down_until[url] = self._clock() + self.cooldown
                log.warning("%s; passed over for %.0f s", e, self.cooldown)
                errors.append(str(e))
                continue
            with self._lock:
                self._down_until.pop(url, None)
                self.bytes_by_supernode[url] += len(data)
            return data
        raise SourceError(f"{self.name}: every supernode failed piece {piece} of {digest}: " + "; ".join(errors))

    # --- peers --------------------------------------------------------------------------------------

    def _headers(self, url: str, *, no_redirect: bool = False) -> dict[str, str]:
        headers = {}
        port = self._peer_port()
        if port:
            headers[PEER_PORT_HEADER] = str(port)
        if no_redirect:
            headers[NO_REDIRECT_HEADER] = "1"
        with self._lock:
            reports, self._reports[url] = self._reports[url], []
        if reports:
            headers[PEER_REPORT_HEADER] = format_reports(reports)
        return headers

    def _report(self, reason: str, peer: str) -> None:
        """Tell every supernode (with our next request to it) that `peer` failed or lied; caller holds _lock."""
        for pending in self._reports.values():
            if (reason, peer) not in pending:
                pending.append((reason, peer))

    def _from_peer(self, location: str, digest: str, offset: int, length: int, timeout: float) -> bytes | None:
        """The part from the peer a redirect named; None when it failed (reported, passed over a while)."""
        parts = urlsplit(location)
        peer = f"{parts.scheme}://{parts.netloc}"
        now = self._clock()
        with self._lock:
            self.peer_stats.redirects += 1
            if self._peer_banned_until.get(peer, 0) > now:
                self._report(CORRUPT, peer)
                return None
            if self._peer_down_until.get(peer, 0) > now:
                self._report(FAILED, peer)
                return None
        try:
            data = self._peers.fetch_url(location, offset, length, min(timeout, PEER_TIMEOUT),
                                         follow_redirects=False, send_authorization=False)
            if len(data) < length:
                raise SourceError(f"peer {peer}: short read, {len(data)} of {length} bytes")
        except SourceError as e:
            log.info("peer %s failed %s bytes %d-%d: %s; back to the supernode", peer, digest, offset,
                     offset + length - 1, e)
            with self._lock:
                self.peer_stats.failures += 1
                self._peer_down_until[peer] = self._clock() + PEER_COOLDOWN
                self._report(FAILED, peer)
            return None
        with self._lock:
            self.peer_stats.received_bytes += len(data)
            self._deliveries.append((digest, offset, len(data), peer))
        return data

    def blame_corrupt(self, digest: str, spans: list[tuple[int, int]]) -> bool:
        """The fetcher found bytes [offset, offset + length) of `spans` corrupt: penalise and report the
        peers that sent them. True when peers sent every one of them (so the supernodes are not to blame)."""
        now = self._clock()
        with self._lock:
            culprits = set()
            explained = 0
            for offset, length in spans:
                senders = {peer for d, o, n, peer in self._deliveries
                           if d == digest and o < offset + length and offset < o + n}
                culprits |= senders
                explained += bool(senders)
            for peer in culprits:
                self._peer_banned_until[peer] = now + PEER_CORRUPT_PENALTY
                self._report(CORRUPT, peer)
            self.peer_stats.corrupt_chunks += explained
        for peer in sorted(culprits):
            log.warning("peer %s sent corrupt bytes of %s; not used for %.0f s, reported to the supernodes",
                        peer, digest, PEER_CORRUPT_PENALTY)
        return bool(spans) and explained == len(spans)

    def _ranked(self, digest: str, piece: int) -> list[str]:
        """Supernodes for this piece: rendezvous order, the ones cooling down after a failure last."""
        order = rendezvous_order(piece_key(digest, piece), list(self._sources))
        now = self._clock()
        with self._lock:
            up = [u for u in order if self._down_until.get(u, 0) <= now]
        return up + [u for u in order if u not in up]
