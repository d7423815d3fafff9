"""`dadi supernode`: an HTTP cache in front of one registry, for the nodes of a data centre.

The HTTP side is a small ASGI application served on trio by dadi/p2p/httpserver.py. Routes:

    GET|HEAD /v2/<repository>/blobs/sha256:<hex>   a blob, or with `Range: bytes=A-B` a range of it (206),
                                                   as a registry serves it (dadi.node.fetch.HttpChunkSource
                                                   speaks this); the node's registry credentials go in
                                                   Authorization (access.py)
    GET      /v2/                                  200: lets registry clients probe the API
    POST     /prewarm                              fill the cache with an image (prewarm.py), JSON lines
    POST     /p2p/announce                         a peer's pieces (peerproto.py); answers its ticket key
    GET      /healthz                              200 with the registry, cache usage and quota as JSON
    GET      /metrics                              Prometheus metrics (metrics.py)

Everything else is 404. Errors are JSON {"error": "..."} with the status of dadi.p2p.errors.

A blob request: access check (the registry's answer for these credentials, cached briefly) -> the peer
redirect seam (peerredirect.py: for a hot piece a peer holds, a 307 to that peer with a ticket) -> the
pieces the range spans (pieces.py: disk cache, else one registry fetch per piece for everyone) -> the response. A node
that hangs up stops its response at once; fetches it started go on for whoever else waits on them.

serve() wires it together with one AsyncExitStack (cache, registry clients, background nursery, server),
so that shutdown runs in reverse order: SIGTERM/SIGINT stop accepting, give open requests
GRACEFUL_SECONDS, cancel registry fetches in flight, and write every piece map to disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import trio

from dadi.p2p import httpserver
from dadi.p2p import metrics as m
from dadi.p2p.access import AccessChecker, parse_authorization, who
from dadi.p2p.errors import BadRequest, NotFound, RangeNotSatisfiable, SupernodeError
from dadi.p2p.metrics import SupernodeMetrics
from dadi.p2p.peerproto import ANNOUNCE_PATH, MAX_ANNOUNCE_BODY, Announce, parse_announce
from dadi.p2p.peerredirect import TrackerRedirector
from dadi.p2p.piececache import PieceCache
from dadi.p2p.pieces import PieceService
from dadi.p2p.prewarm import MAX_BODY, Prewarmer, parse_request
from dadi.p2p.tracker import HOT_REQUESTS, PEER_FANOUT, HotPieces, RedirectPolicy, Tracker
from dadi.p2p.upstream import Upstream

log = logging.getLogger(__name__)

GRACEFUL_SECONDS = 2.0  # open requests get this long to finish at shutdown
KEEP_ALIVE_SECONDS = 30.0  # a node's fetcher comes back in bursts; keep its connection across the gaps
FLUSH_INTERVAL = 5.0  # seconds between writes of the piece maps (besides every FLUSH_EVERY pieces)
# Responses gathering pieces at once; each holds up to two windows of pieces (8 MiB) in memory, so this
# bounds that memory (2 GiB) when a rollout sends a thousand nodes at once. The rest queue for a slot.
MAX_STREAMS = 256
UPSTREAM_CONCURRENCY = 16  # registry requests in flight (worker threads)
DISK_CONCURRENCY = 8  # cache reads and writes in flight (worker threads)

# The distribution spec's repository name grammar: lowercase components separated by slashes.
_BLOB_PATH = re.compile(
    r"^/v2/(?P<repo>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"/blobs/(?P<digest>sha256:[0-9a-f]{64})$"
)
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class SupernodeSettings:
    listen: str  # HOST:PORT
    registry: str  # HOST[:PORT] of the one upstream registry
    cache_dir: Path
    cache_quota: int | None = None
    plain_http: bool = False
    authfile: str | None = None
    upstream_proxy: str | None = None
    allow_ttl: float = 60.0
    deny_ttl: float = 5.0
    upstream_concurrency: int = UPSTREAM_CONCURRENCY
    disk_concurrency: int = DISK_CONCURRENCY
    hot_requests: int | None = None  # None: dadi.p2p.tracker.HOT_REQUESTS
    peer_fanout: int | None = None  # None: dadi.p2p.tracker.PEER_FANOUT


class PeerRedirector(Protocol):
    """The tracker (peerredirect.TrackerRedirector): where a node at address `client` should get bytes
    [start, end] of a blob instead of here, as an absolute URL for a 307, or None to serve them. Asked
    after the access check, so a redirect never tells an unauthorised node where a blob is. `headers`
    are the request's (the node's peer port and reports, peerproto.py). `announce` records a peer's."""

    async def redirect(self, repository: str, digest: str, start: int, end: int, client: str,
                       headers: dict[str, str]) -> str | None: ...

    def announce(self, client: str, announce: Announce) -> dict: ...


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Bytes [start, end) of a `Range: bytes=...` header for a blob of `size` bytes; None for the whole
    blob. Single ranges only (nodes never send more); a range past the end is 416, as RFC 9110 says."""
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise BadRequest(f"Range {header!r}: only a single range, bytes=A-B, bytes=A- or bytes=-N, is served")
    first, last = match.groups()
    if first == "":  # a suffix: the last N bytes
        count = int(last)
        if count == 0 or size == 0:
            raise RangeNotSatisfiable(f"Range {header!r}: empty suffix of a {size}-byte blob", size)
        return max(0, size - count), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if last != "" and int(last) < start:
        raise BadRequest(f"Range {header!r}: the last byte comes before the first")
    if start >= size:
        raise RangeNotSatisfiable(f"Range {header!r}: the blob has {size} bytes", size)
    return start, end


class _Response:
    """The ASGI send side of one request, counting body bytes for dadi_supernode_sent_bytes_total."""

    def __init__(self, send: Callable[[dict], Awaitable[None]], metrics: SupernodeMetrics, count_body: bool):
        self._send = send
        self._metrics = metrics
        self._count = count_body
        self.started = False

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.started = True
        self._count = self._count and status in (200, 206)  # blob bytes, not error or redirect bodies
        raw = [(k.lower().encode(), v.encode()) for k, v in headers]
        await self._send({"type": "http.response.start", "status": status, "headers": raw})

    async def body(self, data: bytes, more: bool = True) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})
        if self._count and data:
            self._metrics.sent_bytes.inc(len(data))

    async def whole(self, status: int, body: bytes, content_type: str, extra: list[tuple[str, str]] = ()) -> None:
        await self.start(status, [("content-type", content_type), ("content-length", str(len(body))), *extra])
        await self.body(body, more=False)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True).encode() + b"\n"


class SupernodeApp:
    """The ASGI application (see the module docstring for the routes)."""

    def __init__(
        self,
        settings: SupernodeSettings,
        service: PieceService,
        access: AccessChecker,
        prewarmer: Prewarmer,
        metrics: SupernodeMetrics,
        redirector: PeerRedirector | None = None,
    ):
        self.settings = settings
        self.service = service
        self.access = access
        self.prewarmer = prewarmer
        self.metrics = metrics
        self.redirector = redirector
        self._streams = trio.Semaphore(MAX_STREAMS)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        match = _BLOB_PATH.match(path)
        response = _Response(send, self.metrics, count_body=match is not None)
        try:
            if match is not None:
                if method not in ("GET", "HEAD"):
                    raise _MethodNotAllowed("GET, HEAD")
                await self._until_disconnect(receive, self._blob(scope, response, match["repo"], match["digest"]))
            elif path == "/prewarm":
                if method != "POST":
                    raise _MethodNotAllowed("POST")
                await self._prewarm(scope, receive, response)
            elif path == ANNOUNCE_PATH and self.redirector is not None:
                if method != "POST":
                    raise _MethodNotAllowed("POST")
                await self._announce(scope, receive, response)
            elif path in ("/healthz", "/metrics", "/v2/", "/v2"):
                if method not in ("GET", "HEAD"):
                    raise _MethodNotAllowed("GET, HEAD")
                await self._simple(path, response)
            else:
                raise NotFound(f"{path}: no such endpoint (blobs are at /v2/REPOSITORY/blobs/sha256:HEX)")
        except SupernodeError as exc:
            await self._fail(response, exc, scope)

    # --- plumbing -----------------------------------------------------------------------------------

    async def _until_disconnect(self, receive: Callable, work: Awaitable[None]) -> None:
        """Run `work` (a response) until it ends or the client hangs up, whichever comes first."""

        async def watch(cancel_scope: trio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            cancel_scope.cancel()

        failed: list[SupernodeError] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            try:
                await work
            except SupernodeError as exc:
                failed.append(exc)  # raised below, not wrapped in the nursery's ExceptionGroup
            nursery.cancel_scope.cancel()
        if failed:
            raise failed[0]

    async def _fail(self, response: _Response, exc: SupernodeError, scope: dict) -> None:
        if exc.status in (400, 405, 416):  # registry failures and refusals are counted where they happen
            self.metrics.errors.labels(m.BAD_REQUEST).inc()
        if response.started:
            # Headers are out: all that is left is to cut the transfer. Returning without the body's end
            # makes the server close the connection, and the client sees a body shorter than its
            # Content-Length (a short read), never a complete-looking wrong answer.
            log.warning("%s %s: cut short: %s", scope["method"], scope["path"], exc)
            return
        extra: list[tuple[str, str]] = []
        if exc.status == 401:
            extra.append(("www-authenticate", f'Basic realm="{self.settings.registry} (dadi supernode)"'))
        if isinstance(exc, RangeNotSatisfiable):
            extra.append(("content-range", f"bytes */{exc.size}"))
        if isinstance(exc, _MethodNotAllowed):
            extra.append(("allow", exc.allow))
        if exc.status >= 500:
            log.warning("%s %s: %d: %s", scope["method"], scope["path"], exc.status, exc)
        else:
            log.debug("%s %s: %d: %s", scope["method"], scope["path"], exc.status, exc)
        await response.whole(exc.status, _json({"error": str(exc)}), "application/json", extra)

    async def _simple(self, path: str, response: _Response) -> None:
        if path == "/metrics":
            self.metrics.cache_bytes.set(self.service.cache.usage)
            body, content_type = self.metrics.render()
            await response.whole(200, body, content_type)
        elif path == "/healthz":
            cache = self.service.cache
            body = {
                "status": "ok", "registry": self.settings.registry, "cache_bytes": cache.usage,
                "cache_quota": cache.quota, "cache_blobs": len(cache.blobs()),
            }  # fmt: skip
            await response.whole(200, _json(body), "application/json")
        else:
            await response.whole(200, b"{}", "application/json")

    # --- blobs --------------------------------------------------------------------------------------

    async def _blob(self, scope: dict, response: _Response, repository: str, digest: str) -> None:
        started = trio.current_time()
        headers = _headers(scope)
        authorization = headers.get("authorization")
        creds = parse_authorization(authorization)
        size = await self.access.check_blob(authorization, creds, repository, digest)
        span = parse_range(headers.get("range"), size)
        start, end = span if span is not None else (0, size)
        if self.redirector is not None and scope["method"] == "GET" and end > start:
            client = (scope.get("client") or ("", 0))[0]
            location = await self.redirector.redirect(repository, digest, start, end - 1, client, headers)
            if location is not None:
                await response.whole(307, b"", "application/octet-stream",
                                     [("location", location), ("cache-control", "no-store")])
                return
        status = 206 if span is not None else 200
        out = [
            ("content-type", "application/octet-stream"), ("content-length", str(end - start)),
            ("accept-ranges", "bytes"), ("docker-content-digest", digest),
        ]  # fmt: skip
        if span is not None:
            out.append(("content-range", f"bytes {start}-{end - 1}/{size}"))

        async def begin() -> None:
            self.metrics.first_byte_seconds.observe(trio.current_time() - started)
            await response.start(status, out)

        if scope["method"] == "HEAD" or end == start:
            await begin()
            await response.body(b"", more=False)
            return
        async with self._streams:
            await self.service.stream(repository, digest, size, start, end, creds, begin=begin, send=response.body)
        await response.body(b"", more=False)
        log.debug("%s %s@%s bytes %d-%d for %s", scope["method"], repository, digest, start, end - 1, who(creds))

    # --- peers --------------------------------------------------------------------------------------

    async def _announce(self, scope: dict, receive: Callable, response: _Response) -> None:
        body = await _read_body(receive, MAX_ANNOUNCE_BODY, "announce")
        if body is None:
            return
        client = (scope.get("client") or ("", 0))[0]
        if not client:
            raise BadRequest("announce: the connection has no peer address (a unix socket?)")
        answer = self.redirector.announce(client, parse_announce(body))
        await response.whole(200, _json(answer), "application/json", [("cache-control", "no-store")])

    # --- prewarm ------------------------------------------------------------------------------------

    async def _prewarm(self, scope: dict, receive: Callable, response: _Response) -> None:
        body = await _read_body(receive, MAX_BODY, "prewarm")
        if body is None:
            return
        headers = _headers(scope)
        creds = parse_authorization(headers.get("authorization"))
        request = parse_request(body, self.settings.registry)

        async def run() -> None:
            try:
                plan = await self.prewarmer.plan(request, creds)
            except SupernodeError as exc:
                self.metrics.prewarms.labels("refused" if exc.status < 500 else "error").inc()
                raise
            await response.start(200, [("content-type", "application/x-ndjson"), ("cache-control", "no-store")])

            async def emit(event: dict[str, Any]) -> None:
                await response.body(_json(event))

            await self.prewarmer.run(plan, creds, emit)
            await response.body(b"", more=False)

        await self._until_disconnect(receive, run())


class _MethodNotAllowed(SupernodeError):
    status = 405

    def __init__(self, allow: str):
        super().__init__(f"method not allowed here; allowed: {allow}")
        self.allow = allow


async def _read_body(receive: Callable, limit: int, what: str) -> bytes | None:
    """A request's whole body (BadRequest past `limit` bytes); None when the client hung up."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            raise BadRequest(f"{what}: request body larger than {limit} bytes")
        if not message.get("more_body", False):
            return bytes(body)


def _headers(scope: dict) -> dict[str, str]:
    # Header names arrive lowercased; a repeated header keeps its last value (none of ours repeat).
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


# --- the server -------------------------------------------------------------------------------------


async def _signalled(receiver: Any) -> None:
    async for signum in receiver:
        log.info("%s: stopping", signal.Signals(signum).name)
        return


async def serve(
    settings: SupernodeSettings,
    *,
    shutdown: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a supernode until `shutdown()` returns (default: until SIGTERM or SIGINT). task_status gets
    the addresses it listens on (useful with port 0)."""
    with contextlib.ExitStack() as signals:
        if shutdown is None:
            receiver = signals.enter_context(trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT))
            shutdown = partial(_signalled, receiver)
        async with contextlib.AsyncExitStack() as stack:
            metrics = SupernodeMetrics()
            cache = await trio.to_thread.run_sync(
                partial(PieceCache, settings.cache_dir, settings.cache_quota,
                        on_evict=lambda digest, reason: metrics.evicted_blobs.labels(reason).inc())
            )  # fmt: skip
            stack.callback(_close_cache, cache)  # last: after every task that writes to it has ended
            metrics.cache_quota_bytes.set(settings.cache_quota or 0)
            upstream = Upstream(
                settings.registry, plain_http=settings.plain_http, authfile=settings.authfile,
                proxy=settings.upstream_proxy,
            )  # fmt: skip
            stack.callback(upstream.close)
            nursery = await stack.enter_async_context(trio.open_nursery())
            upstream_limiter = trio.CapacityLimiter(settings.upstream_concurrency)
            disk_limiter = trio.CapacityLimiter(settings.disk_concurrency)
            service = PieceService(
                cache, upstream, metrics, nursery, upstream_limiter=upstream_limiter, disk_limiter=disk_limiter
            )
            access = AccessChecker(
                upstream, metrics, nursery, upstream_limiter, allow_ttl=settings.allow_ttl, deny_ttl=settings.deny_ttl
            )
            redirector = TrackerRedirector(metrics, policy=RedirectPolicy(
                Tracker(fanout=settings.peer_fanout or PEER_FANOUT),
                HotPieces(threshold=settings.hot_requests or HOT_REQUESTS)))
            app = SupernodeApp(settings, service, access, Prewarmer(service, upstream, metrics, upstream_limiter), metrics,
                               redirector)

            usage = cache.usage
            log.info(
                "registry %s%s%s; cache %s: %d blobs, %d bytes%s",
                settings.registry, " (plain HTTP)" if settings.plain_http else "",
                f" through proxy {settings.upstream_proxy}" if settings.upstream_proxy else "",
                settings.cache_dir, len(cache.blobs()), usage,
                f" of a {settings.cache_quota}-byte quota" if settings.cache_quota is not None else "",
            )  # fmt: skip

            async def run_server(task_status: trio.TaskStatus[list[str]]) -> None:
                await httpserver.serve(app, settings.listen, keep_alive=KEEP_ALIVE_SECONDS, graceful=GRACEFUL_SECONDS,
                                       shutdown=shutdown, task_status=task_status)
                # The server has stopped: cancel what is still in flight (fetches, checks, flushes).
                nursery.cancel_scope.cancel()

            binds = await nursery.start(run_server)
            log.info("listening on %s", " ".join(binds))
            nursery.start_soon(_flush_regularly, cache, disk_limiter)
            await service.verify_pending()
            task_status.started(binds)
        log.info("stopped")


async def _flush_regularly(cache: PieceCache, limiter: trio.CapacityLimiter) -> None:
    while True:
        await trio.sleep(FLUSH_INTERVAL)
        await trio.to_thread.run_sync(cache.flush_all, limiter=limiter)


def _close_cache(cache: PieceCache) -> None:
    cache.close()
    log.info("piece maps written: %d blobs, %d bytes cached", len(cache.blobs()), cache.usage)

