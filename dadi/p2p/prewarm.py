"""Prewarm: fill the supernode's cache with an image before a rollout, so that the first node to start it
finds every piece local, and the registry sees each blob once.

`POST /prewarm` with {"image": "HOST/REPO:TAG" or "REPO:TAG", "trace_only": false, "platform": "linux/amd64"}
and the caller's registry credentials (Authorization: Basic, as for blob requests). Fetching the manifest
with those credentials is the access check: whoever may pull the image may prewarm it.

- Everything: every piece of the config and of every layer blob, dadi image or not.
- trace_only: the pieces holding the chunks of the image's trace (docs/FORMAT.md, "Traces"), plus those
  holding each layer's tables and footer, which every mount reads first. A dadi image only; chunk
  offsets come from the layer tables, which are read through the cache and checked against the
  manifest's tables digest.

Planning (manifest, trace, tables) happens before the answer starts, so its failures are ordinary HTTP
errors. Then the answer streams JSON lines (application/x-ndjson), a "start" line, "progress" lines at
most every PROGRESS_INTERVAL, and a final "done" (or "error") line; see docs/ARCHITECTURE.md. Pieces go
through the same single-flight as node requests (a node asking during the prewarm waits for the same
fetch), PREWARM_CONCURRENCY at a time. A caller that hangs up stops the prewarm; what it fetched stays.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from dadi.errors import FormatError, ImageError
from dadi.format.blob import parse_tables
from dadi.image.dadi_layers import require_dadi_image, tables_location
from dadi.image.manifest import ImageManifest
from dadi.image.registry_store import RegistrySource
from dadi.node.trace import read_trace, trace_tag
from dadi.p2p.errors import BadRequest, NotFound, SupernodeError, UpstreamError
from dadi.p2p.metrics import SupernodeMetrics
from dadi.p2p.piececache import pieces_spanning
from dadi.p2p.pieces import HIT, PieceService
from dadi.p2p.upstream import Upstream, classify
from dadi.registry.auth import Credentials
from dadi.registry.reference import RegistryRef, parse_registry_ref

log = logging.getLogger(__name__)

PREWARM_CONCURRENCY = 4  # pieces in flight per prewarm: enough to fill a link, polite to the registry
PROGRESS_INTERVAL = 0.5  # seconds between progress lines
MAX_BODY = 64 << 10
DEFAULT_PLATFORM = "linux/amd64"


@dataclass(frozen=True)
class PrewarmRequest:
    ref: RegistryRef
    trace_only: bool
    platform: str


def parse_request(body: bytes, registry_host: str) -> PrewarmRequest:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest('prewarm: the body must be JSON: {"image": "REPO:TAG", "trace_only": false}') from None
    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
        raise BadRequest('prewarm: the body must be a JSON object with "image": "[HOST/]REPO:TAG"')
    trace_only = obj.get("trace_only", False)
    platform = obj.get("platform", DEFAULT_PLATFORM)
    if not isinstance(trace_only, bool) or not isinstance(platform, str):
        raise BadRequest('prewarm: "trace_only" must be true or false, "platform" a string like linux/amd64')
    return PrewarmRequest(resolve_image(obj["image"], registry_host), trace_only, platform)


def resolve_image(text: str, registry_host: str) -> RegistryRef:
    """`HOST/REPO:TAG` (HOST must be the supernode's registry) or `REPO:TAG` (in that registry)."""
    text = text.removeprefix("docker://")
    first = text.partition("/")[0]
    # The reference grammar's rule for "is the first component a host" (dadi.registry.reference).
    has_host = "/" in text and ("." in first or ":" in first or first == "localhost" or first.startswith("["))
    try:
        ref = parse_registry_ref(text if has_host else f"{registry_host}/{text}")
    except ImageError as exc:
        raise BadRequest(f"prewarm: {exc}") from None
    if ref.host != registry_host:
        raise BadRequest(f"prewarm: {text}: this supernode serves the registry {registry_host}, not {ref.host}")
    return ref


@dataclass
class _Blob:
    digest: str
    size: int
    pieces: list[int]


@dataclass
class Plan:
    image: str
    manifest: str
    repository: str
    blobs: list[_Blob]
    trace_chunks: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def pieces(self) -> int:
        return sum(len(b.pieces) for b in self.blobs)

    def bytes_total(self, piece_size: int) -> int:
        return sum(min(piece_size, b.size - i * piece_size) for b in self.blobs for i in b.pieces)


Emit = Callable[[dict[str, Any]], Awaitable[None]]


class Prewarmer:
    def __init__(
        self, service: PieceService, upstream: Upstream, metrics: SupernodeMetrics, limiter: trio.CapacityLimiter
    ):
        self._service = service
        self._upstream = upstream
        self._metrics = metrics
        self._limiter = limiter

    async def plan(self, request: PrewarmRequest, creds: Credentials | None) -> Plan:
        ref = request.ref
        where = f"{ref.host}/{ref.repository}:{ref.reference}"
        node_client = self._upstream.client_for(creds)
        try:
            fetched = await trio.to_thread.run_sync(
                partial(node_client.get_manifest, ref.repository, ref.reference, platform=request.platform),
                limiter=self._limiter, abandon_on_cancel=True,
            )  # fmt: skip
            manifest = ImageManifest.parse(fetched.body, f"{where}: manifest {fetched.digest}", fetched.media_type)
        except ImageError as exc:
            raise BadRequest(f"prewarm: {exc}") from exc
        except Exception as exc:
            raise classify(exc, f"prewarm {where}") from exc
        blobs: dict[str, _Blob] = {}
        plan = Plan(where, manifest.digest, ref.repository, [])
        if request.trace_only:
            await self._plan_trace(plan, ref, manifest, creds, blobs)
        else:
            for desc in (manifest.config, *manifest.layers):
                if desc.size and desc.digest not in blobs:
                    count = -(-desc.size // self._service.piece_size)
                    blobs[desc.digest] = _Blob(desc.digest, desc.size, list(range(count)))
        plan.blobs = list(blobs.values())
        quota = self._service.cache.quota
        if quota is not None and plan.bytes_total(self._service.piece_size) > quota:
            plan.warnings.append(
                f"the image ({plan.bytes_total(self._service.piece_size)} bytes) is larger than the cache "
                f"quota ({quota} bytes): not all of it will stay cached"
            )
        return plan

    async def _plan_trace(
        self, plan: Plan, ref: RegistryRef, manifest: ImageManifest, creds: Credentials | None, blobs: dict
    ) -> None:
        where = plan.image
        try:
            require_dadi_image(manifest, where)
        except ImageError as exc:
            raise BadRequest(f"prewarm --trace-only: {exc}") from exc
        trace_ref = RegistryRef(ref.host, ref.repository, trace_tag(manifest.digest), None)
        source = RegistrySource(trace_ref, self._upstream.fetch_client(ref.repository, creds))
        try:
            trace = await trio.to_thread.run_sync(
                read_trace, source, str(trace_ref), limiter=self._limiter, abandon_on_cancel=True
            )
        except ImageError as exc:
            raise UpstreamError(f"prewarm {where}: the stored trace is broken: {exc}") from exc
        except Exception as exc:
            raise classify(exc, f"prewarm {where}: reading its trace") from exc
        if trace is None:
            raise NotFound(f"prewarm {where}: no trace stored beside the image (dadi trace push stores one)")
        plan.trace_chunks = 0
        piece_size = self._service.piece_size
        for desc in manifest.layers:
            if desc.digest in blobs:
                continue
            try:
                offset, size, digest = tables_location(desc, where)
            except ImageError as exc:
                raise BadRequest(f"prewarm {where}: {exc}") from exc
            # Tables and footer, through the cache: every mount reads them first.
            raw = await self._service.read(ref.repository, desc.digest, desc.size, offset, desc.size, creds)
            try:
                tables = await trio.to_thread.run_sync(
                    partial(parse_tables, raw[:size], blob_size=desc.size, expected_digest=digest)
                )
            except FormatError as exc:
                raise UpstreamError(f"prewarm {where}: layer {desc.digest}: {exc}") from exc
            pieces = set(pieces_spanning(offset, desc.size, piece_size))
            chunks = trace.chunks_of(desc.digest, len(tables.chunks))
            plan.trace_chunks += len(chunks)
            for i in chunks:
                chunk = tables.chunks[i]
                pieces.update(pieces_spanning(chunk.offset, chunk.offset + chunk.length, piece_size))
            blobs[desc.digest] = _Blob(desc.digest, desc.size, sorted(pieces))

    async def run(self, plan: Plan, creds: Credentials | None, emit: Emit) -> dict[str, Any]:
        """Fetch the plan's pieces, emitting progress; returns the last line sent ("done" or "error")."""
        piece_size = self._service.piece_size
        total = plan.bytes_total(piece_size)
        state = {"bytes_done": 0, "pieces_done": 0, "bytes_fetched": 0, "bytes_cached": 0}
        started = trio.current_time()
        failure: list[SupernodeError] = []
        start = {
            "event": "start", "image": plan.image, "manifest": plan.manifest, "blobs": len(plan.blobs),
            "pieces_total": plan.pieces, "bytes_total": total,
        }  # fmt: skip
        if plan.trace_chunks is not None:
            start["trace_chunks"] = plan.trace_chunks
        if plan.warnings:
            start["warnings"] = plan.warnings
        log.info("prewarm %s (%s): %d pieces, %d bytes%s", plan.image, plan.manifest, plan.pieces, total,
                 ", trace only" if plan.trace_chunks is not None else "")  # fmt: skip
        await emit(start)

        send_work, receive_work = trio.open_memory_channel[tuple[_Blob, int]](0)

        async def feed() -> None:
            async with send_work:
                for blob in plan.blobs:
                    for index in blob.pieces:
                        await send_work.send((blob, index))

        async def work(receive: trio.MemoryReceiveChannel[tuple[_Blob, int]]) -> None:
            async with receive:
                async for blob, index in receive:
                    length = min(piece_size, blob.size - index * piece_size)
                    try:
                        how = await self._service.ensure(plan.repository, blob.digest, blob.size, index, creds)
                    except SupernodeError as exc:
                        failure.append(exc)
                        workers.cancel_scope.cancel()
                        return
                    state["bytes_done"] += length
                    state["pieces_done"] += 1
                    state["bytes_cached" if how == HIT else "bytes_fetched"] += length

        def progress(event: str) -> dict[str, Any]:
            return {"event": event, **state, "bytes_total": total, "pieces_total": plan.pieces}

        async def report() -> None:
            last = None
            while True:
                await trio.sleep(PROGRESS_INTERVAL)
                if state["bytes_done"] != last:
                    last = state["bytes_done"]
                    await emit(progress("progress"))

        async with trio.open_nursery() as outer:
            outer.start_soon(report)
            async with trio.open_nursery() as workers:
                workers.start_soon(feed)
                async with receive_work:
                    for _ in range(PREWARM_CONCURRENCY):
                        workers.start_soon(work, receive_work.clone())
            outer.cancel_scope.cancel()
        final = progress("error" if failure else "done")
        final["seconds"] = round(trio.current_time() - started, 3)
        if failure:
            final["error"] = str(failure[0])
            self._metrics.prewarms.labels("error").inc()
            log.warning("prewarm %s failed: %s", plan.image, failure[0])
        else:
            self._metrics.prewarms.labels("done").inc()
            log.info("prewarm %s done: %d bytes, %d fetched from the registry, %d were cached, %.1fs",
                     plan.image, state["bytes_done"], state["bytes_fetched"], state["bytes_cached"],
                     final["seconds"])  # fmt: skip
        await emit(final)
        return final

