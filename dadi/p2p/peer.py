"""A node's peer server: the verified chunks this node holds, served to other nodes over HTTP.

Same URL shape as a registry and a supernode, so that a supernode's 307 just works:

    GET|HEAD /v2/<repository>/blobs/sha256:<hex>?dadi-ticket=T   Range: bytes=A-B  -> 206
    GET      /healthz                                             200 JSON (uploads in flight, limit)

What is served, and what is not:
- Only bytes of chunks present in the local cache, each re-checked against its xxh3 as it is read
  (dadi/node/chunkcache.py; a chunk that fails is dropped from the cache and the request gets 404). Bytes
  outside the chunks (header, tables, footer) only once the whole blob was hashed against its digest.
  Anything else is 404: this node does not hold it, ask the supernode. The requester still checks every
  chunk's sha256: a peer is never trusted.
- Only with a valid ticket (dadi/p2p/peerproto.py): a supernode that checked the requester's registry
  credentials made it for this peer and this blob. No ticket or a bad one: 403.
- At most `uploads` requests at once (PEER_FANOUT by default, the tracker's assumption); more get 503
  at once, and the requester goes back to its supernode instead of queueing here.

`held_pieces` says which supernode pieces a blob can serve whole: what the announcer (announce.py) tells
the supernodes.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import trio

from dadi.p2p import httpserver
from dadi.p2p.errors import BadRequest, RangeNotSatisfiable
from dadi.p2p.peerproto import TICKET_PARAM, check_ticket
from dadi.p2p.piececache import PIECE_SIZE, piece_count
from dadi.p2p.supernode import parse_range
from dadi.p2p.tracker import PEER_FANOUT

log = logging.getLogger(__name__)

KEEP_ALIVE_SECONDS = 30.0  # a peer's connection is kept across the gaps between its requests
GRACEFUL_SECONDS = 1.0  # uploads in flight get this long to finish when the daemon stops
MAX_RANGE = 8 << 20  # bytes one request may ask for: nodes ask at most a piece (1 MiB) of a peer
_BLOB_PATH = re.compile(r"^/v2/(?P<repo>[a-z0-9._/-]+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")


# --- what a blob can serve ---------------------------------------------------------------------------


def _covered(layer: Any) -> list[tuple[int, int]]:
    """Blob byte intervals [start, end) this node can serve from `layer` (a dadi.node.view.LayerBlob)."""
    if layer.cache.verified:
        return [(0, layer.size)]
    out: list[tuple[int, int]] = []
    for i, chunk in enumerate(layer.tables.chunks):
        if not layer.cache.has(i):
            continue
        if out and out[-1][1] == chunk.offset:
            out[-1] = (out[-1][0], chunk.offset + chunk.length)
        else:
            out.append((chunk.offset, chunk.offset + chunk.length))
    return out


def held_pieces(layer: Any, piece_size: int = PIECE_SIZE) -> set[int]:
    """Pieces of the blob every byte of which this node can serve."""
    held: set[int] = set()
    for start, end in _covered(layer):
        first = -(-start // piece_size)
        for piece in range(first, piece_count(layer.size, piece_size)):
            if min((piece + 1) * piece_size, layer.size) > end:
                break
            held.add(piece)
    return held


def pieces_of_chunks(layer: Any, indexes: set[int], piece_size: int = PIECE_SIZE) -> set[int]:
    """The pieces chunks `indexes` of the blob overlap."""
    chunks = layer.tables.chunks
    return {p for i in indexes for p in range(chunks[i].offset // piece_size,
                                              (chunks[i].offset + chunks[i].length - 1) // piece_size + 1)}


def piece_is_held(layer: Any, piece: int, piece_size: int = PIECE_SIZE) -> bool:
    """Every byte of the piece can be served (the cheap check of one piece, for announces as chunks arrive)."""
    if layer.cache.verified:
        return True
    start, end = piece * piece_size, min((piece + 1) * piece_size, layer.size)
    chunks = layer.tables.chunks
    i = max(0, bisect.bisect_right(_offsets(layer), start) - 1)
    position = start
    while position < end:
        if i >= len(chunks) or chunks[i].offset > position or not layer.cache.has(i):
            return False
        position = chunks[i].offset + chunks[i].length
        i += 1
    return True


def _offsets(layer: Any) -> list[int]:
    """Chunk offsets of the blob (sorted: chunks are packed in blob order), computed once per blob (a
    digest names one blob, and so one chunk table)."""
    offsets = _OFFSETS.get(layer.digest)
    if offsets is None:
        offsets = _OFFSETS[layer.digest] = [c.offset for c in layer.tables.chunks]
        while len(_OFFSETS) > 64:  # the blobs of the mounted views; old entries go first
            del _OFFSETS[next(iter(_OFFSETS))]
    return offsets


_OFFSETS: dict[str, list[int]] = {}


def read_range(layer: Any, start: int, end: int) -> bytes | None:
    """Blob bytes [start, end) from the local cache, every chunk xxh3-checked; None when any byte is not
    held (or a chunk fails its check: the cache drops it). Blocking: run it in a thread."""
    chunks = layer.tables.chunks
    offsets = _offsets(layer)
    parts = []
    position = start
    first = max(0, bisect.bisect_right(offsets, start) - 1)
    for i in range(first, len(chunks)):
        chunk = chunks[i]
        if position >= end or chunk.offset >= end:
            break
        if chunk.offset + chunk.length <= position:
            continue
        if chunk.offset > position:  # bytes between chunks (header, tables): whole verified blobs only
            gap = _verified_bytes(layer, position, min(chunk.offset, end))
            if gap is None:
                return None
            parts.append(gap)
            position = min(chunk.offset, end)
            if position >= end:
                break
        stored = layer.cache.read_stored(i)
        if stored is None:
            return None
        take = stored[position - chunk.offset:min(end, chunk.offset + chunk.length) - chunk.offset]
        parts.append(take)
        position += len(take)
    if position < end:  # past the last chunk: tables and footer
        tail = _verified_bytes(layer, position, end)
        if tail is None:
            return None
        parts.append(tail)
    return b"".join(parts)


def _verified_bytes(layer: Any, start: int, end: int) -> bytes | None:
    """Bytes outside the chunks, from the cache's data file, which is the blob itself once verified."""
    if not layer.cache.verified:
        return None
    with open(layer.cache.path / "data", "rb") as f:
        data = os.pread(f.fileno(), end - start, start)
    return data if len(data) == end - start else None


# --- the server --------------------------------------------------------------------------------------


@dataclass
class UploadStats:
    uploads: int = 0  # ranges served
    sent_bytes: int = 0
    busy: int = 0  # refused with 503: `uploads` already in flight
    forbidden: int = 0  # refused with 403: no valid ticket
    not_held: int = 0  # 404: bytes this node does not hold (or that failed their xxh3)


class PeerApp:
    """The ASGI application. `find_blob(digest)` gives the LayerBlob of a blob a view uses (or None);
    `keys()` the ticket keys the supernodes gave this node."""

    def __init__(self, find_blob: Callable[[str], Any], keys: Callable[[], list[bytes]], *,
                 uploads: int = PEER_FANOUT, wall_clock: Callable[[], float] = time.time):
        self.find_blob = find_blob
        self.keys = keys
        self.limit = uploads
        self.stats = UploadStats()
        self.in_flight = 0
        self._wall = wall_clock
        self._threads = trio.CapacityLimiter(uploads)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        match = _BLOB_PATH.match(scope["path"])
        if scope["path"] == "/healthz":
            await _reply(send, 200, {"uploads": self.in_flight, "limit": self.limit, **self.stats.__dict__})
        elif match is None or scope["method"] not in ("GET", "HEAD"):
            await _reply(send, 404, {"error": f"{scope['method']} {scope['path']}: not served here"})
        else:
            await self._blob(scope, send, match["digest"])

    async def _blob(self, scope: dict, send: Callable, digest: str) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if not check_ticket(self.keys(), digest, (query.get(TICKET_PARAM) or [None])[0], self._wall()):
            self.stats.forbidden += 1
            await _reply(send, 403, {"error": "no valid ticket: ask a supernode, which redirects here with one"})
            return
        if self.in_flight >= self.limit:
            self.stats.busy += 1
            await _reply(send, 503, {"error": f"{self.limit} uploads in flight"}, [(b"retry-after", b"1")])
            return
        layer = self.find_blob(digest)
        if layer is None:
            self.stats.not_held += 1
            await _reply(send, 404, {"error": f"{digest}: not held here"})
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            span = parse_range(headers.get("range"), layer.size)
        except RangeNotSatisfiable as e:
            await _reply(send, 416, {"error": str(e)}, [(b"content-range", f"bytes */{layer.size}".encode())])
            return
        except BadRequest as e:
            await _reply(send, 400, {"error": str(e)})
            return
        start, end = span if span is not None else (0, layer.size)
        if end - start > MAX_RANGE:
            await _reply(send, 416, {"error": f"ranges of at most {MAX_RANGE} bytes are served by peers"})
            return
        self.in_flight += 1
        try:
            data = await trio.to_thread.run_sync(read_range, layer, start, end, limiter=self._threads)
        finally:
            self.in_flight -= 1
        if data is None:
            self.stats.not_held += 1
            await _reply(send, 404, {"error": f"{digest}: bytes {start}-{end - 1} not held here"})
            return
        out = [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(data)).encode()),
               (b"content-range", f"bytes {start}-{end - 1}/{layer.size}".encode()),
               (b"docker-content-digest", digest.encode())]
        body = b"" if scope["method"] == "HEAD" else data
        self.stats.uploads += 1  # counted before it goes out: a requester that has it sees it counted
        self.stats.sent_bytes += len(body)
        await send({"type": "http.response.start", "status": 206, "headers": out})
        await send({"type": "http.response.body", "body": body, "more_body": False})


async def _reply(send: Callable[[dict], Awaitable[None]], status: int, body: dict,
                 extra: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body, sort_keys=True).encode() + b"\n"
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def serve(app: PeerApp, listen: str, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
                shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve `app` on HOST:PORT (dadi/p2p/httpserver.py, as the supernode) until cancelled or `shutdown`
    returns; task_status gets the bound addresses."""
    await httpserver.serve(app, listen, keep_alive=KEEP_ALIVE_SECONDS, graceful=GRACEFUL_SECONDS,
                           shutdown=shutdown, task_status=task_status)
