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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import xxhash

from dadi.node.fetch import HttpChunkSource, SourceError
from dadi.p2p.piececache import PIECE_SIZE

DEFAULT_COOLDOWN = 10.0  # seconds a failed supernode is passed over


def rendezvous_order(key: bytes, members: Sequence[str]) -> list[str]:
    """`members` ranked for `key`, best first: by a 64-bit hash of (member, key), highest first."""
    return sorted(members, key=lambda m: (xxhash.xxh3_64_intdigest(m.encode() + b"\0" + key), m), reverse=True)


def piece_key(digest: str, piece: int) -> bytes:
    return f"{digest}#{piece}".encode()


class SupernodeSet:
    """A ChunkSource (dadi.node.fetch) over supernodes, each piece from its rendezvous-ranked supernode."""

    def __init__(self, urls: Sequence[str], repository: str, *, authorization: str | None = None,
                 name: str = "supernode", piece_size: int = PIECE_SIZE, cooldown: float = DEFAULT_COOLDOWN,
                 clock=time.monotonic):
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

    @property
    def urls(self) -> list[str]:
        return list(self._sources)

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
            try:
                data = self._sources[url].fetch_range(digest, offset, length, timeout)
            except SourceError as e:
                with self._lock:
                    self._down_until[url] = self._clock() + self.cooldown
                errors.append(str(e))
                continue
            with self._lock:
                self._down_until.pop(url, None)
                self.bytes_by_supernode[url] += len(data)
            return data
        raise SourceError(f"{self.name}: every supernode failed piece {piece} of {digest}: " + "; ".join(errors))

    def _ranked(self, digest: str, piece: int) -> list[str]:
        """Supernodes for this piece: rendezvous order, the ones cooling down after a failure last."""
        order = rendezvous_order(piece_key(digest, piece), list(self._sources))
        now = self._clock()
        with self._lock:
            up = [u for u in order if self._down_until.get(u, 0) <= now]
        return up + [u for u in order if u not in up]
