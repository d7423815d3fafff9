"""The node daemon's chunk fetcher: verified stored bytes of layer chunks from a list of sources.

A FUSE read that misses the local cache ends up here with a few chunk indexes of one layer blob and a
deadline. The fetcher returns the stored bytes of exactly those chunks, each checked against the sha256
in the chunk table (the trust anchor, docs/FORMAT.md "Trust chain"), or raises. Design choices:

- **Single-flight per (blob digest, chunk index).** A starting container reads the same hot files from
  many processes at once, and prefetch walks the same chunks that reads are asking for. Without
  single-flight each of them would fetch the chunk again: N requests, N times the bytes, for one result.
  The first caller leads the fetch; later callers wait on its flight. A follower waits only until its
  own deadline; if the leader gives up first (its deadline was earlier), a follower that still has time
  takes the chunk over instead of failing with the leader.
- **Coalescing.** A chunk is 64 KiB by default and the registry round trip costs more than its
  transfer, so the missing chunks of one call that are adjacent in the blob (chunk i+1 starts where
  chunk i ends) go out as one range request, capped at `max_request_bytes` so that one request never
  holds a worker thread (and the read waiting on its first chunk) for long.
- **Deadlines, not just timeouts.** A read must not hang because a registry hangs: the kernel request
  and the process behind it would hang with it. Every call carries an absolute trio deadline; when it
  passes the call raises FetchTimeout, whatever the sources are doing. Blocking IO runs in worker
  threads that are *abandoned* at the deadline (their result is dropped); the shared CapacityLimiter
  token stays taken until the thread really ends, so stuck sources cannot pile up unbounded threads.
  Each request also has its own `request_timeout`, after which the next source is tried; it starts
  once a limiter token is held, so queueing behind other work does not count against a source.
- **Failover, then retries.** Sources are tried in order (local layout, peers, registry: whatever the
  daemon configures); a failure, timeout or short read moves to the next source. When all have failed,
  the fetcher backs off (exponential, jittered so that many nodes do not retry in lockstep, capped) and
  tries them all again, up to `retries` more rounds or the deadline. A chunk whose bytes fail sha256 is
  never returned; it is counted as corrupt and refetched from the next source, and the source that sent
  it goes to the back of the order for `corrupt_penalty` seconds (a failing one for `failure_penalty`).
- **Verification in the worker thread.** Hashing up to `max_request_bytes` per request would stall the
  event loop (and every other read); the thread that fetched the bytes hashes them too.

`stats` holds plain counters (easy to export to prometheus later); the caller stores what it gets
(dadi.node.view.View._store).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio
import urllib3

from dadi.errors import DadiError, RegistryError
from dadi.format.model import Chunk

if TYPE_CHECKING:
    import requests

    from dadi.registry.client import RegistryClient

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_MAX_REQUEST_BYTES = 4 * MiB
_HEX = frozenset("0123456789abcdef")


class FetchError(DadiError):
    """Chunks could not be fetched: every source failed, in every retry round."""


class FetchTimeout(FetchError):
    """The caller's deadline passed before every requested chunk was fetched and verified."""


class SourceError(DadiError):
    """One source could not deliver a range (unreachable, missing blob, HTTP error, IO error)."""


class Redirected(SourceError):
    """An HttpChunkSource asked not to follow redirects got one (a supernode sending the node to a peer)."""

    def __init__(self, message: str, location: str):
        super().__init__(message)
        self.location = location


class ChunkSource(Protocol):
    """Somewhere a layer blob's byte ranges can be read from. `fetch_range` blocks (it runs in a worker
    thread) and raises SourceError on failure; it may return fewer bytes than asked (a short read)."""

    name: str

    def fetch_range(self, digest: str, offset: int, length: int, timeout: float) -> bytes: ...


def _blob_hex(digest: str) -> str:
    """The hex part of a sha256 digest, checked: it becomes a path and a URL component."""
    hex_part = digest[7:] if digest.startswith("sha256:") else ""
    if len(hex_part) != 64 or not _HEX.issuperset(hex_part):
        raise SourceError(f"not a sha256 digest: {digest!r}")
    return hex_part


# --- sources ----------------------------------------------------------------------------------------


class LayoutChunkSource:
    """Blobs of a local OCI layout (`<layout>/blobs/sha256/<hex>`), read with pread."""

    def __init__(self, layout_dir: Path, name: str = "local"):
        self.layout_dir = Path(layout_dir)
        self.name = name

    def fetch_range(self, digest: str, offset: int, length: int, timeout: float) -> bytes:
        path = self.layout_dir / "blobs" / "sha256" / _blob_hex(digest)
        try:
            # Opened per request: no descriptors to manage or leak, and it costs microseconds.
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise SourceError(f"{self.name}: cannot open {path}: {e.strerror}") from e
        try:
            parts = []
            got = 0
            while got < length:
                piece = os.pread(fd, length - got, offset + got)
                if not piece:
                    break  # end of file: the fetcher sees a short read
                parts.append(piece)
                got += len(piece)
            return b"".join(parts)
        except OSError as e:
            raise SourceError(f"{self.name}: reading {path} at offset {offset}: {e.strerror}") from e
        finally:
            os.close(fd)


class RegistryChunkSource:
    """Byte ranges of a blob in one registry repository, through a RegistryClient.

    RegistryClient has no per-call timeout: the `timeout` it was built with bounds each connect and
    each socket read, and its own `retries` sleep in the calling thread. `connect` builds a client for
    the fetcher (timeout = the request timeout, retries=0: failover and backoff are the Fetcher's
    job). With a shared client built for other purposes the Fetcher still keeps every deadline, by
    abandoning the thread; that thread then holds a limiter token until requests gives up.
    """

    def __init__(self, client: RegistryClient, repository: str, name: str = "registry"):
        self.client = client
        self.repository = repository
        self.name = name

    @classmethod
    def connect(
        cls,
        host: str,
        repository: str,
        *,
        plain_http: bool = False,
        authfile: str | None = None,
        timeout: float = 10.0,
        session: requests.Session | None = None,
        name: str = "registry",
    ) -> RegistryChunkSource:
        from dadi.registry.client import RegistryClient

        client = RegistryClient(
            host, plain_http=plain_http, authfile=authfile, timeout=timeout, retries=0, session=session
        )
        return cls(client, repository, name)

    def fetch_range(self, digest: str, offset: int, length: int, timeout: float) -> bytes:
        import requests

        try:
            return self.client.get_blob(self.repository, digest, offset=offset, length=length)
        except RegistryError as e:
            raise SourceError(f"{self.name}: {e}") from e
        except requests.RequestException as e:  # what RegistryClient does not wrap (bad URL, decoding)
            raise SourceError(f"{self.name}: {self.client.host}: {e}") from e

    def close(self) -> None:
        self.client.close()


class HttpChunkSource:
    """A peer or supernode that serves blobs like a registry (`GET {base_url}/v2/{repo}/blobs/{digest}`
    with a Range header). A server that ignores Range is read only up to the range.

    `authorization` is sent as the Authorization header of every request: a supernode checks it against
    the registry (the node's own registry credentials, `dadi.registry.basic_authorization`), so that
    nobody reads through it what the registry would not give them. A followed redirect to another host
    drops the header (urllib3's default), and the supernodes' redirects to peers are not followed here:
    dadi.p2p.sources asks the peer itself, without the header.

    On urllib3 directly, not requests: these ranges are the bulk of a P2P start's bytes. A 1 MiB range
    from a local server costs 0.45 ms of client CPU here; through a requests session (hooks, cookies,
    proxy variables looked up on every request, streaming) 0.9-1.1 ms, and 3.3 ms as this class read it
    before, copying each block twice more into fresh memory. Peers and supernodes are in the node's own
    data centre, so HTTP(S)_PROXY does not apply to them.
    """

    def __init__(self, base_url: str, repository: str, name: str, *, authorization: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.repository = repository
        self.name = name
        # One pool of keep-alive connections per host: a supernode, or each peer a redirect names.
        self.pool = urllib3.PoolManager(num_pools=64, maxsize=HTTP_CONNECTIONS)
        self.authorization = authorization

    def close(self) -> None:
        self.pool.clear()

    def fetch_range(self, digest: str, offset: int, length: int, timeout: float, *,
                    headers: dict[str, str] | None = None, follow_redirects: bool = True) -> bytes:
        """`headers` are added to the request; with follow_redirects=False a redirect raises Redirected."""
        url = f"{self.base_url}/v2/{self.repository}/blobs/sha256:{_blob_hex(digest)}"
        return self.fetch_url(url, offset, length, timeout, headers=headers, follow_redirects=follow_redirects)

    def fetch_url(self, url: str, offset: int, length: int, timeout: float, *,
                  headers: dict[str, str] | None = None, follow_redirects: bool = True,
                  send_authorization: bool = True) -> bytes:
        """fetch_range at a URL of its own (a redirect's Location); send_authorization=False for a peer."""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity", **(headers or {})}
        if self.authorization and send_authorization:
            headers["Authorization"] = self.authorization
        try:
            resp = self.pool.request(
                "GET", url, headers=headers, preload_content=False, decode_content=False,
                timeout=urllib3.Timeout(connect=timeout, read=timeout),
                redirect=follow_redirects, retries=_FOLLOW_REDIRECTS if follow_redirects else False)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise SourceError(f"{self.name}: {url}: {e}") from e
        try:
            if resp.status in _REDIRECTS and not follow_redirects and resp.headers.get("Location"):
                raise Redirected(f"{self.name}: {url}: HTTP {resp.status} to {resp.headers['Location']}",
                                 resp.headers["Location"])
            if resp.status == 206:
                start = _content_range_start(resp.headers.get("Content-Range", ""))
                if start != offset:
                    raise SourceError(f"{self.name}: {url}: asked for offset {offset}, got Content-Range "
                                      f"{resp.headers.get('Content-Range')!r}")
                skip = 0
            elif resp.status == 200:
                skip = offset  # the whole blob: skip to the range instead of reading it all
            else:
                raise SourceError(f"{self.name}: {url}: HTTP {resp.status} {resp.reason}")
            return _read_range(resp, skip, length)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise SourceError(f"{self.name}: {url}: {e}") from e
        finally:
            if resp.length_remaining == 0:
                resp.drain_conn()  # ends the response (a 307 has an empty body), so the connection can be reused
            else:  # not read to its end: the connection cannot carry another request
                resp.close()
            resp.release_conn()


HTTP_CONNECTIONS = 16  # keep-alive connections kept per host: the fetch threads (8) and the prefetch's, with room
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Followed redirects (a registry-like server that sends blobs elsewhere): up to 5, and no retries of a
# failed request (the Fetcher fails over to the next source instead).
_FOLLOW_REDIRECTS = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5)


def _content_range_start(header: str) -> int | None:
    unit, _, spec = header.partition(" ")
    start = spec.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _read_range(resp: urllib3.BaseHTTPResponse, skip: int, length: int) -> bytes:
    """`length` bytes of the body after the first `skip`, or fewer at its end; never reads beyond. One
    read into one buffer: a 1 MiB range is not copied around (each fresh MiB costs page faults)."""
    while skip > 0:
        block = resp.read(min(skip, 1 << 20))
        if not block:
            return b""
        skip -= len(block)
    return resp.read(length)


# --- stats ------------------------------------------------------------------------------------------


@dataclass
class FetchStats:
    """Plain counters. Bytes are verified stored bytes, counted once per chunk (under the leader's
    purpose when callers with different purposes shared a flight)."""

    requests: int = 0  # range requests sent to sources
    retries: int = 0  # retry rounds (all sources failed, backed off, tried again)
    errors: int = 0  # requests that failed: source error, request timeout, short read
    request_timeouts: int = 0  # requests abandoned at request_timeout (also counted in errors)
    corrupt_chunks: int = 0  # chunks whose bytes failed sha256
    singleflight_waits: int = 0  # chunks a caller waited for instead of fetching them itself
    timeouts: int = 0  # fetch calls that ended with FetchTimeout
    failures: int = 0  # fetch calls that ended with FetchError after every retry round
    bytes_by_source: Counter[str] = field(default_factory=Counter)
    bytes_by_purpose: Counter[str] = field(default_factory=Counter)
    requests_by_source: Counter[str] = field(default_factory=Counter)
    errors_by_source: Counter[str] = field(default_factory=Counter)
    corrupt_by_source: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {k: dict(v) if isinstance(v, Counter) else v for k, v in self.__dict__.items()}


# --- the fetcher ------------------------------------------------------------------------------------


class _Flight:
    """One chunk being fetched. Settled once: stored bytes, an error, or neither (abandoned: the
    leader gave up at its deadline, and a follower with time left takes over)."""

    __slots__ = ("event", "stored", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.stored: bytes | None = None
        self.error: FetchError | None = None


@dataclass
class _Reply:
    """What one request to one source produced, verified in the worker thread."""

    verified: dict[int, bytes]
    corrupt: list[int]
    error: str | None


def _request_and_verify(
    source: ChunkSource, digest: str, chunks: Sequence[Chunk], run: list[int], timeout: float
) -> _Reply:
    """Runs in a worker thread: one range request covering `run`, each chunk hashed against its table."""
    offset = chunks[run[0]].offset
    length = chunks[run[-1]].offset + chunks[run[-1]].length - offset
    try:
        data = source.fetch_range(digest, offset, length, timeout)
    except SourceError as e:
        return _Reply({}, [], str(e))
    except Exception as e:
        # Sources are unreliable by design: an unexpected error (a library's, a bug's) must fail over
        # to the next source like any other, not fail a read that another source can serve.
        log.warning("chunk source %s raised unexpectedly", source.name, exc_info=True)
        return _Reply({}, [], f"{source.name}: {type(e).__name__}: {e}")
    if len(data) > length:
        return _Reply({}, [], f"{source.name}: sent {len(data)} bytes for a {length}-byte range")
    view = memoryview(data)
    verified: dict[int, bytes] = {}
    corrupt: list[int] = []
    for i in run:
        chunk = chunks[i]
        start = chunk.offset - offset
        piece = view[start : start + chunk.length]
        if len(piece) < chunk.length:
            break  # a short read: the complete chunks before it are still good
        if hashlib.sha256(piece).digest() == chunk.sha256:
            verified[i] = bytes(piece)
        else:
            corrupt.append(i)
    error = None
    if len(data) < length:
        error = f"{source.name}: short read, {len(data)} of {length} bytes at blob offset {offset}"
    return _Reply(verified, corrupt, error)


class _HeldToken:
    """Hands trio.to_thread a CapacityLimiter token taken beforehand, so that the request timeout
    starts when the request does, not while it queues behind other work for a thread. to_thread gives
    the token back when the thread ends, also a thread abandoned at a timeout."""

    def __init__(self, limiter: trio.CapacityLimiter):
        self._limiter = limiter
        self._borrower = object()
        self.handed_over = False

    async def take(self) -> None:
        await self._limiter.acquire_on_behalf_of(self._borrower)

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        self.handed_over = True  # from here on to_thread releases it, whatever happens

    def release_on_behalf_of(self, borrower: object) -> None:
        self._limiter.release_on_behalf_of(self._borrower)

    def release_unused(self) -> None:
        if not self.handed_over:  # cancelled before to_thread got to start the thread
            self._limiter.release_on_behalf_of(self._borrower)


class Fetcher:
    """Verified chunks of layer blobs from `sources` (in order of preference); see the module docstring."""

    def __init__(
        self,
        sources: Sequence[ChunkSource],
        *,
        limiter: trio.CapacityLimiter,
        request_timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        corrupt_penalty: float = 300.0,
        failure_penalty: float = 5.0,
        on_request: Callable[[str, float, bool], None] | None = None,
    ):
        if not sources:
            raise ValueError("Fetcher needs at least one chunk source")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"chunk source names must be unique (stats are kept by name): {names}")
        if request_timeout <= 0 or retries < 0 or backoff < 0 or max_request_bytes <= 0:
            raise ValueError("request_timeout and max_request_bytes must be positive, retries and backoff >= 0")
        self.sources = list(sources)
        self.request_timeout = request_timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_request_bytes = max_request_bytes
        self.corrupt_penalty = corrupt_penalty
        self.failure_penalty = failure_penalty
        self.on_request = on_request  # (source name, seconds, ok) after every range request: metrics
        self.stats = FetchStats()
        self._limiter = limiter
        self._inflight: dict[tuple[str, int], _Flight] = {}
        self._penalized_until: dict[str, float] = {}
        self._last_error: tuple[float, str] | None = None  # (trio time, message), for FetchTimeout's text

    # -- the API ---------------------------------------------------------------------------------

    @property
    def pieces(self) -> tuple[int, float] | None:
        """(piece size, seed share) when the first source serves in pieces and this node can seed them
        (supernodes, while it serves peers: SupernodeSet.seed_share): a fetch covering that share of a
        piece should cover all of it. None otherwise (a registry serves any range alike)."""
        source = self.sources[0]
        piece_size, share = getattr(source, "piece_size", None), getattr(source, "seed_share", None)
        return (piece_size, share) if piece_size and share else None

    async def fetch(
        self,
        digest: str,
        chunks: Sequence[Chunk],
        indexes: Sequence[int],
        *,
        deadline: float,
        purpose: str = "on_demand",
    ) -> dict[int, bytes]:
        """The verified stored bytes of chunks `indexes` of blob `digest` (whose chunk table is
        `chunks`), by trio time `deadline`; FetchTimeout when it passes, FetchError when every source
        failed in every retry round first."""
        wanted = _check_indexes(chunks, indexes)
        if not wanted:
            return {}
        started = trio.current_time()
        if started >= deadline:
            self.stats.timeouts += 1
            raise FetchTimeout(f"{digest}: deadline already passed, {len(wanted)} chunk(s) not fetched")
        results: dict[int, bytes] = {}
        failures: dict[int, FetchError] = {}
        # Claimed with no checkpoint in between, so a caller arriving later finds these flights.
        mine, theirs = self._claim(digest, wanted)
        try:
            with trio.move_on_at(deadline) as scope:
                async with trio.open_nursery() as nursery:
                    for i, flight in theirs.items():
                        self.stats.singleflight_waits += 1
                        nursery.start_soon(self._follow, digest, chunks, i, flight, purpose, results, failures)
                    if mine:
                        nursery.start_soon(self._lead, digest, chunks, mine, purpose)
        finally:
            self._abandon(digest, mine)
        for i, flight in mine.items():
            if flight.stored is not None:
                results[i] = flight.stored
            elif flight.error is not None:
                failures[i] = flight.error
        if scope.cancelled_caught and len(results) < len(wanted):
            self.stats.timeouts += 1
            raise FetchTimeout(
                f"{digest}: {len(wanted) - len(results)} of {len(wanted)} chunk(s) not fetched by the "
                f"deadline ({deadline - started:.3g}s){self._last_error_since(started)}"
            )
        if failures:
            self.stats.failures += 1
            raise next(iter(failures.values()))
        return results

    # -- single-flight ---------------------------------------------------------------------------

    def _claim(self, digest: str, indexes: list[int]) -> tuple[dict[int, _Flight], dict[int, _Flight]]:
        """(flights this caller leads, flights already in progress that it follows)."""
        mine: dict[int, _Flight] = {}
        theirs: dict[int, _Flight] = {}
        for i in indexes:
            flight = self._inflight.get((digest, i))
            if flight is None:
                flight = mine[i] = _Flight()
                self._inflight[(digest, i)] = flight
            else:
                theirs[i] = flight
        return mine, theirs

    def _abandon(self, digest: str, flights: dict[int, _Flight]) -> None:
        """Wake the followers of flights this caller leads but did not settle (deadline, cancellation)."""
        for i, flight in flights.items():
            if not flight.event.is_set():
                if self._inflight.get((digest, i)) is flight:
                    del self._inflight[(digest, i)]
                flight.event.set()

    def _settle(self, digest: str, i: int, flight: _Flight, stored: bytes | None, error: FetchError | None) -> None:
        flight.stored, flight.error = stored, error
        if self._inflight.get((digest, i)) is flight:
            del self._inflight[(digest, i)]
        flight.event.set()

    async def _follow(
        self,
        digest: str,
        chunks: Sequence[Chunk],
        i: int,
        flight: _Flight,
        purpose: str,
        results: dict[int, bytes],
        failures: dict[int, FetchError],
    ) -> None:
        """Wait for another caller's flight; lead the chunk ourselves if that caller gave up first."""
        while True:
            await flight.event.wait()
            if flight.stored is not None:
                results[i] = flight.stored
                return
            if flight.error is not None:
                # Every source failed every round just now: sharing that beats hammering them again.
                failures[i] = flight.error
                return
            current = self._inflight.get((digest, i))
            if current is not None:
                flight = current  # another follower took it over first
                continue
            mine, _ = self._claim(digest, [i])
            try:
                await self._lead(digest, chunks, mine, purpose)
            finally:
                self._abandon(digest, mine)
            flight = mine[i]

    # -- fetching --------------------------------------------------------------------------------

    async def _lead(self, digest: str, chunks: Sequence[Chunk], flights: dict[int, _Flight], purpose: str) -> None:
        """Fetch the chunks of `flights`, one task per coalesced range; every flight ends settled."""
        async with trio.open_nursery() as nursery:
            for run in self._coalesce(chunks, sorted(flights)):
                nursery.start_soon(self._fetch_run, digest, chunks, run, flights, purpose)

    def _coalesce(self, chunks: Sequence[Chunk], indexes: list[int]) -> list[list[int]]:
        """Sorted indexes cut into runs of chunks contiguous in the blob, at most max_request_bytes each
        (a single larger chunk is a run of its own)."""
        runs: list[list[int]] = []
        size = 0
        for i in indexes:
            chunk = chunks[i]
            if runs:
                prev = chunks[runs[-1][-1]]
                adjacent = i == runs[-1][-1] + 1 and chunk.offset == prev.offset + prev.length
                if adjacent and size + chunk.length <= self.max_request_bytes:
                    runs[-1].append(i)
                    size += chunk.length
                    continue
            runs.append([i])
            size = chunk.length
        return runs

    async def _fetch_run(
        self, digest: str, chunks: Sequence[Chunk], run: list[int], flights: dict[int, _Flight], purpose: str
    ) -> None:
        """One coalesced range: sources in order, then backoff and another round, until all verified.
        Runs until its flights are settled or the caller's deadline cancels it."""
        missing = run
        last_error = "no source answered"
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
                await trio.sleep(self._backoff_delay(attempt))
            for source in self._ordered_sources():
                # After a lie or a short read the missing chunks may no longer be contiguous.
                for part in self._coalesce(chunks, missing):
                    reply = await self._ask(source, digest, chunks, part)
                    self._take_reply(source, digest, chunks, reply, flights, purpose)
                    if reply.error or reply.corrupt:
                        last_error = reply.error or f"{source.name}: {len(reply.corrupt)} corrupt chunk(s)"
                        break  # the rest from the next source
                missing = [i for i in missing if not flights[i].event.is_set()]
                if not missing:
                    return
        error = FetchError(
            f"{digest}: chunk(s) {_describe(missing)} not fetched: every source failed "
            f"{self.retries + 1} time(s); last: {last_error}"
        )
        for i in missing:
            self._settle(digest, i, flights[i], None, error)

    async def _ask(self, source: ChunkSource, digest: str, chunks: Sequence[Chunk], run: list[int]) -> _Reply:
        """One request to one source in a worker thread, abandoned at request_timeout."""
        token = _HeldToken(self._limiter)
        await token.take()
        try:
            remaining = trio.current_effective_deadline() - trio.current_time()
            timeout = max(0.001, min(self.request_timeout, remaining))  # the source's own socket timeout
            self.stats.requests += 1
            self.stats.requests_by_source[source.name] += 1
            started = trio.current_time()
            with trio.move_on_after(self.request_timeout) as scope:
                reply = await trio.to_thread.run_sync(
                    _request_and_verify, source, digest, chunks, run, timeout,
                    limiter=token, abandon_on_cancel=True,  # type: ignore[arg-type]  # a limiter-like object
                )  # fmt: skip
                self._report(source, started, not reply.error)
                return reply
        finally:
            token.release_unused()
        # Only this request's own timeout gets here; the caller's deadline propagates as Cancelled.
        assert scope.cancelled_caught
        self.stats.request_timeouts += 1
        self._report(source, started, False)
        return _Reply({}, [], f"{source.name}: no answer within {self.request_timeout:g}s")

    def _report(self, source: ChunkSource, started: float, ok: bool) -> None:
        if self.on_request is not None:
            try:
                self.on_request(source.name, trio.current_time() - started, ok)
            except Exception:
                log.exception("on_request hook failed")

    def _take_reply(
        self,
        source: ChunkSource,
        digest: str,
        chunks: Sequence[Chunk],
        reply: _Reply,
        flights: dict[int, _Flight],
        purpose: str,
    ) -> None:
        for i, stored in reply.verified.items():
            self.stats.bytes_by_source[source.name] += len(stored)
            self.stats.bytes_by_purpose[purpose] += len(stored)
            self._settle(digest, i, flights[i], stored, None)
        if reply.corrupt:
            self.stats.corrupt_chunks += len(reply.corrupt)
            self.stats.corrupt_by_source[source.name] += len(reply.corrupt)
            log.warning(
                "chunk source %s sent corrupt bytes for %s chunk(s) %s; trying the next source",
                source.name, digest, _describe(reply.corrupt),
            )  # fmt: skip
            # A source that passes on bytes from others (supernodes redirecting to peers) may know who
            # sent these; then that one is penalised, not the whole source.
            blame = getattr(source, "blame_corrupt", None)
            spans = [(chunks[i].offset, chunks[i].length) for i in reply.corrupt]
            if blame is None or not blame(digest, spans):
                self._penalize(source, self.corrupt_penalty)
        if reply.error:
            self.stats.errors += 1
            self.stats.errors_by_source[source.name] += 1
            self._last_error = (trio.current_time(), reply.error)
            log.info("chunk source failed: %s", reply.error)
            self._penalize(source, self.failure_penalty)

    # -- source order and backoff ----------------------------------------------------------------

    def _ordered_sources(self) -> list[ChunkSource]:
        """Sources in their configured order, the penalized ones moved to the back (still tried)."""
        now = trio.current_time()
        return sorted(self.sources, key=lambda s: self._penalized_until.get(s.name, -math.inf) > now)

    def _penalize(self, source: ChunkSource, seconds: float) -> None:
        until = trio.current_time() + seconds
        self._penalized_until[source.name] = max(until, self._penalized_until.get(source.name, -math.inf))

    def _backoff_delay(self, attempt: int) -> float:
        # Jittered within [half, full] of the exponential step: spread out, but never much shorter.
        step = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return step * random.uniform(0.5, 1.0)

    def _last_error_since(self, since: float) -> str:
        if self._last_error is None or self._last_error[0] < since:
            return ""
        return f"; last source error: {self._last_error[1]}"


def _check_indexes(chunks: Sequence[Chunk], indexes: Sequence[int]) -> list[int]:
    wanted = sorted(set(indexes))
    if wanted and (wanted[0] < 0 or wanted[-1] >= len(chunks)):
        raise ValueError(f"chunk indexes {_describe(wanted)} outside the table of {len(chunks)} chunks")
    return wanted


def _describe(indexes: Sequence[int]) -> str:
    shown = ", ".join(map(str, indexes[:8]))
    return shown + (f", ... ({len(indexes)} in all)" if len(indexes) > 8 else "")
