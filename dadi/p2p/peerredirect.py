"""The supernode's side of P2P: announces in, 307 redirects out (the PeerRedirector of supernode.py).

The decisions are the tracker's (dadi/p2p/tracker.py, pure); this class feeds it what HTTP brings: the
announcing peer's address (the connection's, never one it claims, so a node cannot point others at a
host of its choosing), the requester's own peer port (never redirected to itself), its reports about
peers that failed or lied, and turns a chosen peer into a Location with a ticket (peerproto.py).
Trio runs it on the event loop only, so it needs no locks.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Callable
from urllib.parse import quote

import trio

from dadi.p2p.metrics import SupernodeMetrics
from dadi.p2p.peerproto import (
    NO_REDIRECT_HEADER,
    PEER_PORT_HEADER,
    PEER_REPORT_HEADER,
    TICKET_PARAM,
    TICKET_SECONDS,
    Announce,
    make_ticket,
    parse_reports,
    peer_key,
    peer_url,
)
from dadi.p2p.tracker import (
    ANNOUNCE_INTERVAL,
    CORRUPT,
    HOLD_POLL,
    HOLD_SECONDS,
    HotPieces,
    RedirectPolicy,
    Tracker,
)

log = logging.getLogger(__name__)


class TrackerRedirector:
    def __init__(self, metrics: SupernodeMetrics, *, policy: RedirectPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, secret: bytes | None = None):
        self.metrics = metrics
        self.policy = policy or RedirectPolicy(Tracker(), HotPieces())
        self.tracker = self.policy.tracker
        self._clock = clock
        self._wall = wall_clock
        self._rng = rng or random.Random()
        # Per process: a restarted supernode hands out new keys with the next announces, and tickets
        # live a minute, so nothing needs to survive a restart.
        self._secret = secret or secrets.token_bytes(32)

    def announce(self, client: str, announce: Announce) -> dict:
        """Record a peer's announce (from address `client`); the answer the peer gets."""
        now = self._clock()
        peer = peer_url(client, announce.port)
        self.tracker.expire(now)
        if announce.leave:
            self.tracker.leave(peer)
            self.metrics.announces.labels("leave").inc()
            log.info("peer %s left", peer)
        elif not self.tracker.announce(peer, now, add=announce.add, withdraw=announce.withdraw,
                                       full=announce.full):
            self.metrics.announces.labels("refused").inc()
            log.info("announce of peer %s ignored: it sent corrupt bytes recently", peer)
        else:
            self.metrics.announces.labels("full" if announce.full else "delta").inc()
            log.debug("peer %s announced %d pieces, withdrew %d", peer,
                      sum(map(len, announce.add.values())), sum(map(len, announce.withdraw.values())))
        self._gauges()
        return {"peer": peer, "key": peer_key(self._secret, peer).hex(), "ttl": self.tracker.ttl,
                "interval": ANNOUNCE_INTERVAL}

    async def redirect(self, repository: str, digest: str, start: int, end: int, client: str,
                       headers: dict[str, str]) -> str | None:
        """A peer's URL for bytes [start, end] (inclusive) of the blob, or None to serve them here."""
        now = self._clock()
        for reason, peer in parse_reports(headers.get(PEER_REPORT_HEADER)):
            self.tracker.report(peer, reason, now)
            self.metrics.peer_reports.labels(reason).inc()
            (log.warning if reason == CORRUPT else log.info)("a node at %s reports peer %s %s", client, peer, reason)
        port = headers.get(PEER_PORT_HEADER, "")
        # A node that serves peers: what it gets here it will announce, so it can seed a hot piece.
        requester = peer_url(client, int(port)) if port.isdigit() else None
        if headers.get(NO_REDIRECT_HEADER) == "1":
            self.metrics.redirects.labels("declined").inc()
            if requester is not None:
                self.policy.served(digest, start, end + 1, now, requester=requester)
            return None
        decision = self.policy.decide(digest, start, end + 1, now, self._rng, requester=requester)
        if decision.reason == "hold":  # seeds are being served: wait for one of them to announce it
            give_up = now + HOLD_SECONDS
            while decision.peer is None and decision.reason != "seed" and self._clock() < give_up:
                await trio.sleep(HOLD_POLL)
                decision = self.policy.retry(digest, start, end + 1, self._clock(), self._rng, requester=requester)
            self.metrics.held.labels("peer" if decision.peer else "seed" if decision.reason == "seed" else
                                     "timeout").inc()
        self.metrics.redirects.labels(decision.reason).inc()
        if decision.peer is None:
            if requester is not None:
                self.policy.served(digest, start, end + 1, self._clock(), requester=requester)
            return None
        ticket = make_ticket(peer_key(self._secret, decision.peer), digest, self._wall() + TICKET_SECONDS)
        return f"{decision.peer}/v2/{quote(repository)}/blobs/{digest}?{TICKET_PARAM}={ticket}"

    def _gauges(self) -> None:
        self.metrics.peers.set(len(self.tracker.peers))
        self.metrics.tracked_pieces.set(self.tracker.piece_count())
