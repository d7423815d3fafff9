"""Pieces of registry blobs for the supernode's requests and prewarms: from the disk cache, else fetched
from the registry once however many ask (single-flight per (digest, piece)), then cached.

- A byte range is served from the pieces it spans (fixed-size, aligned to blob offset 0: see
  piececache.PIECE_SIZE). Pieces are gathered READ_AHEAD at a time, concurrently; while one window goes
  out to the node, the next is being gathered. The first window is complete before the response starts,
  so any registry failure of an ordinary node request (up to 4 MiB) is a clean 502, not a cut transfer.
  A longer range that fails later can only be cut short; the node sees a short read and fails over.
- A piece is cached only as the registry sent it, whole (RegistryClient checks the length and the
  Content-Range): a short read or an error caches nothing and fails every request waiting for it.
- The supernode cannot check a piece (it has no chunk tables; the nodes verify every chunk). It checks
  what it can: a blob whose every piece is cached is hashed against its digest, in the background, and
  dropped when wrong; a cached piece is re-checked against the xxh3 recorded when it was written, and
  its blob dropped when that fails.
- Registry IO runs in worker threads under `upstream_limiter`, disk IO under `disk_limiter`: two
  limiters, so that cache hits never queue behind slow registry fetches.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import trio

from dadi.p2p import metrics as m
from dadi.p2p.errors import SupernodeError, UpstreamError
from dadi.p2p.metrics import SupernodeMetrics
from dadi.p2p.piececache import CachedBlob, CacheGone, CorruptPiece, PieceCache, pieces_spanning
from dadi.p2p.singleflight import SingleFlight
from dadi.p2p.upstream import Upstream, classify
from dadi.registry.auth import Credentials

log = logging.getLogger(__name__)

READ_AHEAD = 4  # pieces gathered at once per request: a node's largest request (4 MiB) plus alignment
HIT, FETCHED, SHARED = "hit", "fetched", "shared"  # where ensure() found a piece


class PieceService:
    def __init__(
        self,
        cache: PieceCache,
        upstream: Upstream,
        metrics: SupernodeMetrics,
        nursery: trio.Nursery,
        *,
        upstream_limiter: trio.CapacityLimiter,
        disk_limiter: trio.CapacityLimiter,
    ):
        self.cache = cache
        self.piece_size = cache.piece_size
        self._upstream = upstream
        self._metrics = metrics
        self._nursery = nursery
        self._upstream_limiter = upstream_limiter
        self._disk_limiter = disk_limiter
        self._flights: SingleFlight[bytes] = SingleFlight(nursery, on_wait=metrics.singleflight_waits.inc)
        self._verifying: set[str] = set()

    # --- one piece ----------------------------------------------------------------------------------

    async def piece(self, repository: str, digest: str, size: int, index: int, creds: Credentials | None) -> bytes:
        """The bytes of piece `index` of the blob (of `size` bytes, per the registry)."""
        data, _ = await self._get(repository, digest, size, index, creds, want_bytes=True)
        assert data is not None
        return data

    async def ensure(self, repository: str, digest: str, size: int, index: int, creds: Credentials | None) -> str:
        """Make sure piece `index` is cached (prewarm); HIT, FETCHED or SHARED. A piece the quota has no
        room for is fetched all the same (and counted as uncached)."""
        _, how = await self._get(repository, digest, size, index, creds, want_bytes=False)
        return how

    async def _get(self, repository, digest, size, index, creds, *, want_bytes: bool) -> tuple[bytes | None, str]:
        blob = await self._blob(digest, size)
        if blob is not None and blob.has(index):
            if not want_bytes:
                blob.touch()
                self._metrics.piece_hits.inc()
                return None, HIT
            data = await self._read(blob, index)
            if data is not None:
                self._metrics.piece_hits.inc()
                self._metrics.bytes.labels("cache").inc(len(data))
                return data, HIT
        self._metrics.piece_misses.inc()
        fetch = partial(self._fetch, repository, digest, size, index, creds)
        data, shared = await self._flights.run((digest, index), fetch)
        self._metrics.bytes.labels("singleflight" if shared else "registry").inc(len(data))
        return data, SHARED if shared else FETCHED

    async def _blob(self, digest: str, size: int) -> CachedBlob | None:
        blob = self.cache.lookup(digest)
        if blob is not None and blob.size == size:
            return blob
        # Creating one writes to disk and may evict others.
        try:
            blob = await trio.to_thread.run_sync(self.cache.get, digest, size, limiter=self._disk_limiter)
        except OSError as exc:
            self._cache_failed(f"opening {digest} in the piece cache", exc)
            return None
        if blob is not None and blob.complete and not blob.verified:
            self._start_verify(blob)  # complete, but a crash came before its check
        return blob

    async def _read(self, blob: CachedBlob, index: int) -> bytes | None:
        try:
            return await trio.to_thread.run_sync(blob.read, index, limiter=self._disk_limiter)
        except CacheGone:
            return None  # evicted meanwhile: fetch it again
        except CorruptPiece as exc:
            log.warning("%s; dropping the blob, it will be fetched again", exc)
            self._metrics.errors.labels(m.CORRUPT_PIECE).inc()
            await trio.to_thread.run_sync(partial(self.cache.drop, blob.digest, "corrupt piece", only=blob))
            return None
        except OSError as exc:
            self._cache_failed(f"reading piece {index} of {blob.digest}", exc)
            return None

    async def _fetch(self, repository: str, digest: str, size: int, index: int, creds: Credentials | None) -> bytes:
        """One registry fetch of one piece, then into the cache. Runs in the service's nursery."""
        offset = index * self.piece_size
        length = min(self.piece_size, size - offset)
        client = self._upstream.fetch_client(repository, creds)
        what = f"piece {index} (bytes {offset}-{offset + length - 1}) of {repository}@{digest}"
        self._metrics.registry_fetches.inc()
        started = trio.current_time()
        try:
            data = await trio.to_thread.run_sync(
                partial(client.get_blob, repository, digest, offset=offset, length=length),
                limiter=self._upstream_limiter, abandon_on_cancel=True,
            )  # fmt: skip
        except Exception as exc:
            self._metrics.errors.labels(m.UPSTREAM).inc()
            error = classify(exc, f"fetching {what} from {self._upstream.host}")
            log.warning("%s", error)
            # Whatever the registry said, the node was allowed a moment ago: to it, this is a bad gateway.
            raise (error if isinstance(error, UpstreamError) else UpstreamError(str(error))) from exc
        self._metrics.registry_fetch_seconds.observe(trio.current_time() - started)
        log.debug("fetched %s in %.3fs", what, trio.current_time() - started)
        await self._store(digest, size, index, data)
        return data

    async def _store(self, digest: str, size: int, index: int, data: bytes) -> None:
        blob = await self._blob(digest, size)
        result = "no_room"
        if blob is not None:
            try:
                result = await trio.to_thread.run_sync(self.cache.store, blob, index, data, limiter=self._disk_limiter)
            except OSError as exc:
                self._cache_failed(f"writing piece {index} of {digest}", exc)
                result = "error"
        if result in ("no_room", "gone", "error"):
            self._metrics.uncached_pieces.inc()
            log.debug("piece %d of %s served without caching it (%s)", index, digest, result)
        elif result == "complete" and blob is not None:
            self._start_verify(blob)

    def _cache_failed(self, what: str, exc: OSError) -> None:
        # A failing cache disk must not fail the nodes: the bytes are served from memory all the same.
        self._metrics.errors.labels(m.CACHE_IO).inc()
        log.error("piece cache: %s: %s", what, exc)

    # --- whole blobs --------------------------------------------------------------------------------

    def _start_verify(self, blob: CachedBlob) -> None:
        if blob.digest not in self._verifying:
            self._verifying.add(blob.digest)
            self._nursery.start_soon(self._verify, blob)

    async def _verify(self, blob: CachedBlob) -> None:
        try:
            ok = await trio.to_thread.run_sync(blob.verify, limiter=self._disk_limiter, abandon_on_cancel=True)
        except (CacheGone, OSError):
            return
        finally:
            self._verifying.discard(blob.digest)
        if ok:
            self._metrics.verified_blobs.inc()
            log.info("cached blob %s complete and verified (%d bytes)", blob.digest, blob.size)
        elif blob.complete:
            self._metrics.errors.labels(m.BLOB_DIGEST).inc()
            log.warning("cached blob %s does not hash to its digest; dropping it", blob.digest)
            await trio.to_thread.run_sync(partial(self.cache.drop, blob.digest, "wrong digest", only=blob))

    async def verify_pending(self) -> None:
        """Check blobs a previous run completed but did not get to check (it was stopped first)."""
        for info in self.cache.blobs():
            if info["complete"] and not info["verified"]:
                blob = self.cache.lookup(info["digest"])
                if blob is not None:
                    self._start_verify(blob)

    # --- ranges -------------------------------------------------------------------------------------

    async def gather(
        self, repository: str, digest: str, size: int, indexes: Sequence[int], creds: Credentials | None
    ) -> list[bytes]:
        """The bytes of these pieces, fetched concurrently; the first failure is raised."""
        results: dict[int, bytes] = {}
        errors: list[SupernodeError] = []

        async def one(index: int) -> None:
            try:
                results[index] = await self.piece(repository, digest, size, index, creds)
            except SupernodeError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for index in indexes:
                nursery.start_soon(one, index)
        if errors:
            raise errors[0]
        return [results[i] for i in indexes]

    async def _gather_into(self, repository, digest, size, indexes, creds, into: list, failed: list) -> None:
        try:
            into.append(await self.gather(repository, digest, size, indexes, creds))
        except SupernodeError as exc:
            failed.append(exc)

    async def read(self, repository: str, digest: str, size: int, start: int, end: int, creds: Credentials | None) -> bytes:
        """Blob bytes [start, end) through the pieces (which stay cached)."""
        indexes = list(pieces_spanning(start, end, self.piece_size))
        data = b"".join(await self.gather(repository, digest, size, indexes, creds))
        base = indexes[0] * self.piece_size
        return data[start - base : end - base]

    async def stream(
        self,
        repository: str,
        digest: str,
        size: int,
        start: int,
        end: int,
        creds: Credentials | None,
        *,
        begin: Callable[[], Awaitable[None]],
        send: Callable[[bytes], Awaitable[None]],
    ) -> None:
        """Blob bytes [start, end) to `send`, after `begin()` (the response headers) once the first
        window of pieces is in memory; errors before that raise and nothing was sent."""
        indexes = list(pieces_spanning(start, end, self.piece_size))
        windows = [indexes[i : i + READ_AHEAD] for i in range(0, len(indexes), READ_AHEAD)]
        current = await self.gather(repository, digest, size, windows[0], creds)
        await begin()
        for k, window in enumerate(windows):
            following: list[list[bytes]] = []
            failed: list[SupernodeError] = []
            async with trio.open_nursery() as nursery:
                if k + 1 < len(windows):
                    nursery.start_soon(self._gather_into, repository, digest, size, windows[k + 1], creds,
                                       following, failed)  # fmt: skip
                for index, data in zip(window, current, strict=True):
                    base = index * self.piece_size
                    lo, hi = max(start, base) - base, min(end, base + len(data)) - base
                    await send(data[lo:hi])
            if failed:
                raise failed[0]  # the response has begun: the caller can only cut it short
            current = following[0] if following else []
