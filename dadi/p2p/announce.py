"""A peer's announces to its supernodes: which pieces of which blobs this node can serve.

As soon as fetched chunks reach the cache (`chunks_arrived`, the views' on_stored hook), and every
IDLE_CHECK_INTERVAL seconds otherwise, the announcer looks at the blobs of the views and works out the
pieces each can serve whole: only the pieces of the chunks stored since, or the whole blob
(peer.held_pieces) when it lost chunks, was verified, or is new. It sends each supernode what changed
since its last announce: pieces gained (on completion of a piece, at once) and pieces lost (a view
unmounted, a blob evicted, a chunk that failed its xxh3: within IDLE_CHECK_INTERVAL). Chunks that arrive
while an announce is on its way go out together in the next one: batching comes from the round trip,
not from a delay. Every ANNOUNCE_INTERVAL seconds, after a failure, and whenever a supernode hands out a
new ticket key (it restarted, and forgot us), the announce is full instead. At shutdown the node says it
leaves. Requests run in worker threads, on urllib3 (keep-alive, no environment lookups: 0.27-0.34 ms
of CPU per announce to a local supernode, 0.46-0.54 ms with requests); a supernode that does not answer
costs a log line and a full announce next time, never a read.

Why at once: nodes starting together ask for the same piece within milliseconds of each other, and the
supernode holds their requests (tracker.HOLD_SECONDS) until one of the first to get it announces it.
Each millisecond before the announce is one more that those reads wait.

The supernode's answers carry the ticket keys the peer server checks (peerproto.py): `keys()`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
import urllib3

from dadi.p2p.peer import held_pieces, piece_is_held, pieces_of_chunks
from dadi.p2p.peerproto import ANNOUNCE_PATH, Announce
from dadi.p2p.tracker import ANNOUNCE_INTERVAL

log = logging.getLogger(__name__)

# Seconds between looks when no chunk arrived: for what changes without an arrival (a view mounted on chunks
# already cached, a view unmounted, a blob evicted or verified). Looking every 20 ms instead cost each
# daemon 50 wake-ups a second, noticeable when 8 daemons share 2 cores (tools/bench/p2p.py).
IDLE_CHECK_INTERVAL = 0.5
REQUEST_TIMEOUT = 5.0


@dataclass
class AnnounceStats:
    announces: int = 0
    failures: int = 0
    pieces: int = 0  # pieces announced as held right now, summed over supernodes


@dataclass
class _Target:
    sent: dict[str, set[int]]  # what the supernode was last told we hold
    last_full: float = -1e18
    key: bytes | None = None
    failed: bool = True  # the next announce is full


class Announcer:
    """`blobs()` gives, per supernode URL, the LayerBlobs (dadi.node.view) of the views that use it."""

    def __init__(self, port: int, blobs: Callable[[], dict[str, list[Any]]]):
        self.port = port
        self.blobs = blobs
        self.stats = AnnounceStats()
        # Straight to the supernodes, which are in the node's data centre: no HTTP(S)_PROXY (docs/P2P.md).
        # No retries: a failed announce is followed by a full one.
        self._pool = urllib3.PoolManager(retries=False, timeout=REQUEST_TIMEOUT)
        self._targets: dict[str, _Target] = {}
        self._held: dict[str, tuple[tuple[int, bool], set[int]]] = {}  # digest -> (state, pieces)
        self._arrived: dict[str, set[int]] = {}  # digest -> chunks stored since the last look
        self._arrival = trio.Event()  # set by chunks_arrived: look again now

    def chunks_arrived(self, digest: str, indexes: list[int]) -> None:
        """Chunks `indexes` of blob `digest` are in the cache. Called in the daemon's trio thread."""
        self._arrived.setdefault(digest, set()).update(indexes)
        self._arrival.set()

    def keys(self) -> list[bytes]:
        return [t.key for t in self._targets.values() if t.key is not None]

    async def run(self) -> None:
        while True:
            await self.announce_once()
            with trio.move_on_after(IDLE_CHECK_INTERVAL):
                await self._arrival.wait()
            if self._arrival.is_set():
                self._arrival = trio.Event()

    async def announce_once(self) -> None:
        wanted = self.blobs()
        now = trio.current_time()
        for url in list(self._targets):
            if url not in wanted:  # no view uses this supernode any more: tell it we hold nothing
                wanted[url] = []
        held_by_url = {}
        for url, layers in wanted.items():
            held_by_url[url] = {layer.digest: await self._pieces(layer) for layer in layers}
        for url, held in held_by_url.items():
            target = self._targets.setdefault(url, _Target(sent={}))
            full = target.failed or now - target.last_full >= ANNOUNCE_INTERVAL
            add = {d: sorted(p - target.sent.get(d, set())) for d, p in held.items()}
            withdraw = {d: sorted(p - held.get(d, set())) for d, p in target.sent.items()}
            add = {d: p for d, p in add.items() if p}
            withdraw = {d: p for d, p in withdraw.items() if p}
            if full:
                message = Announce(self.port, {d: sorted(p) for d, p in held.items() if p}, {}, full=True)
            elif add or withdraw:
                message = Announce(self.port, add, withdraw)
            else:
                continue
            if await self._send(url, target, message):
                target.sent = {d: set(p) for d, p in held.items() if p}
                if full:
                    target.last_full = now
        for url in [u for u, layers in wanted.items() if not layers and not self._targets[u].sent]:
            del self._targets[url]
        self.stats.pieces = sum(len(p) for t in self._targets.values() for p in t.sent.values())
        live = {layer.digest for layers in wanted.values() for layer in layers}
        for digest in [d for d in self._held if d not in live]:
            del self._held[digest]

    async def _pieces(self, layer: Any) -> set[int]:
        state = (layer.cache.present_count, layer.cache.verified)
        cached = self._held.get(layer.digest)
        if cached is not None and cached[0] == state and not self._arrived.get(layer.digest):
            return cached[1]
        arrived = self._arrived.pop(layer.digest, set())
        if cached is None or state[0] < cached[0][0] or state[1] != cached[0][1]:
            pieces = await trio.to_thread.run_sync(held_pieces, layer)  # new, lost chunks, or verified
        else:
            # A piece still missing other chunks is looked at again when they arrive.
            pieces = set(cached[1])
            pieces |= {p for p in pieces_of_chunks(layer, arrived) - pieces if piece_is_held(layer, p)}
        self._held[layer.digest] = (state, pieces)
        return pieces

    async def _send(self, url: str, target: _Target, message: Announce) -> bool:
        try:
            answer = await trio.to_thread.run_sync(self._post, url, message.to_json(), abandon_on_cancel=True)
        except _FAILURES as e:
            self.stats.failures += 1
            if not target.failed:
                log.warning("announce to supernode %s failed: %s (trying again, in full)", url, e)
            target.failed = True
            return False
        key, peer = answer
        if target.key is not None and key != target.key and not message.full:
            # A new key: the supernode restarted and knows nothing about us. Tell it everything now.
            target.key = key
            target.failed = True
            return False
        if target.failed:
            log.info("announcing to supernode %s as %s", url, peer)
        target.key = key
        target.failed = False
        self.stats.announces += 1
        return True

    def _post(self, url: str, body: bytes) -> tuple[bytes, str | None]:
        """POST an announce; the supernode's ticket key for us and the peer URL it sees us as."""
        resp = self._pool.request("POST", url.rstrip("/") + ANNOUNCE_PATH, body=body,
                                  headers={"Content-Type": "application/json"})
        if resp.status != 200:
            text = resp.data.decode(errors="replace").strip()[:200]
            raise _AnnounceFailed(f"HTTP {resp.status}: {text}")
        try:
            answer = json.loads(resp.data)
            return bytes.fromhex(answer["key"]), answer.get("peer")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise _AnnounceFailed(f"not an announce answer: {resp.data[:200]!r}") from e

    async def leave(self) -> None:
        """Tell every supernode we stop serving (best effort, a second at most)."""
        with trio.move_on_after(1.0) as scope:
            scope.shield = True
            for url in list(self._targets):
                try:
                    await trio.to_thread.run_sync(self._post, url, Announce(self.port, {}, {}, leave=True).to_json(),
                                                  abandon_on_cancel=True)
                except _FAILURES:
                    pass
        self._pool.clear()


class _AnnounceFailed(Exception):
    """The supernode answered an announce with an error."""


# What an announce can fail with: an error answer, the network (urllib3 wraps socket errors), a bad body.
_FAILURES = (_AnnounceFailed, urllib3.exceptions.HTTPError, ValueError)
