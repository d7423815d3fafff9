"""The node's chunk fetcher (dadi/node/fetch.py): exact bytes, coalescing, single-flight, failover, lying
and dead and hanging sources, deadlines; and against a real docker-registry that goes away and comes back.

Tests that assert on time use trio's MockClock with autojump, so timeouts cost no real time. Autojump
also jumps while a worker thread is busy (trio sees every task blocked), so those tests only use sources
whose requests block or fail, where "the reply came late" and "it failed" end alike; tests that count
what a reply contained use the real clock and assert nothing about it.
"""

from __future__ import annotations

import hashlib
import io
import random
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from dadi.format.blob import BlobWriter, decode_chunk, read_blob_tables
from dadi.format.model import Chunk
from dadi.node.fetch import (
    Fetcher,
    FetchError,
    FetchTimeout,
    HttpChunkSource,
    LayoutChunkSource,
    RegistryChunkSource,
    SourceError,
)
from dadi.registry import RegistryClient

CHUNK_SIZE = 4096 * 4


class Blob:
    """A real dadi layer blob in a local OCI layout: many chunks, some compressed, some stored raw."""

    def __init__(self, layout: Path, seed: int = 1):
        rng = random.Random(seed)
        data = bytearray()
        for k in range(24):
            if k % 3 == 0:
                data += rng.randbytes(CHUNK_SIZE)  # incompressible: stored raw
            else:
                data += (f"line {k} of a compressible chunk\n" * 1000).encode()[:CHUNK_SIZE]
        data += rng.randbytes(8192)  # a shorter last chunk
        out = io.BytesIO()
        writer = BlobWriter(out, disk_size=64 << 20, block_size=4096, chunk_size=CHUNK_SIZE)
        writer.add_data(16, bytes(data))
        info = writer.finish()
        self.bytes = out.getvalue()
        self.digest = info.digest
        self.tables = read_blob_tables(io.BytesIO(self.bytes))
        self.chunks: tuple[Chunk, ...] = self.tables.chunks
        self.layout = layout
        path = layout / "blobs" / "sha256" / self.digest.removeprefix("sha256:")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.bytes)

    def stored(self, i: int) -> bytes:
        chunk = self.chunks[i]
        return self.bytes[chunk.offset : chunk.offset + chunk.length]


@pytest.fixture
def blob(tmp_path) -> Blob:
    b = Blob(tmp_path / "layout")
    assert len(b.chunks) == 25
    assert any(c.compressed for c in b.chunks) and not all(c.compressed for c in b.chunks)
    return b


# --- test sources ----------------------------------------------------------------------------------


class Recording:
    """Passes requests on to `inner`, after `delay` seconds, and remembers each (offset, length)."""

    def __init__(self, inner, name: str | None = None, delay: float = 0.0):
        self.inner = inner
        self.name = name or inner.name
        self.delay = delay
        self.calls: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def fetch_range(self, digest: str, offset: int, length: int, timeout: float) -> bytes:
        with self._lock:
            self.calls.append((offset, length))
        if self.delay:
            time.sleep(self.delay)
        return self.inner.fetch_range(digest, offset, length, timeout)


class Liar(Recording):
    """Answers with the right length and every byte flipped."""

    def fetch_range(self, digest: str, offset: int, length: int, timeout: float) -> bytes:
        return bytes(b ^ 0xFF for b in super().fetch_range(digest, offset, length, timeout))


class Dead:
    def __init__(self, name: str = "dead"):
        self.name = name
        self.calls = 0

    def fetch_range(self, digest: str, offset: int, length: int, timeout: float) -> bytes:
        self.calls += 1
        raise SourceError(f"{self.name}: connection refused")


class Hanging:
    """Never answers until `release` is set (a registry that accepted the connection and went silent)."""

    def __init__(self, name: str = "hanging"):
        self.name = name
        self.release = threading.Event()
        self.calls = 0

    def fetch_range(self, digest: str, offset: int, length: int, timeout: float) -> bytes:
        self.calls += 1
        self.release.wait()
        raise SourceError(f"{self.name}: released")


def fetcher(sources, **kwargs) -> Fetcher:
    return Fetcher(sources, limiter=trio.CapacityLimiter(8), **kwargs)


def run_mock(fn, autojump_threshold: float = 0.0):
    """trio.run with a clock that jumps ahead once every task has been blocked for `autojump_threshold`
    real seconds: timeouts and backoff cost (next to) no real time."""
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=autojump_threshold))


# --- sources ---------------------------------------------------------------------------------------


def test_layout_source_returns_exact_ranges(blob):
    source = LayoutChunkSource(blob.layout)
    assert source.name == "local"
    for offset, length in [(0, 64), (blob.chunks[3].offset, 5000), (len(blob.bytes) - 80, 80)]:
        assert source.fetch_range(blob.digest, offset, length, 1.0) == blob.bytes[offset : offset + length]
    assert source.fetch_range(blob.digest, len(blob.bytes) - 10, 100, 1.0) == blob.bytes[-10:]  # short at EOF
    with pytest.raises(SourceError, match="cannot open"):
        source.fetch_range("sha256:" + "0" * 64, 0, 10, 1.0)
    with pytest.raises(SourceError, match="not a sha256 digest"):
        source.fetch_range("sha256:../../etc/passwd", 0, 10, 1.0)


def test_fetch_returns_verified_stored_bytes_of_every_chunk(blob):
    f = fetcher([LayoutChunkSource(blob.layout)])
    indexes = list(range(len(blob.chunks)))

    async def main():
        return await f.fetch(blob.digest, blob.chunks, indexes, deadline=trio.current_time() + 30)

    got = trio.run(main)
    assert sorted(got) == indexes
    for i in indexes:
        assert got[i] == blob.stored(i)
        decode_chunk(got[i], blob.chunks[i])  # sha256 and lz4 both fine
    total = sum(c.length for c in blob.chunks)
    assert f.stats.bytes_by_source == {"local": total}
    assert f.stats.bytes_by_purpose == {"on_demand": total}
    assert f.stats.requests == 1  # 25 adjacent chunks, under 4 MiB: one range
    assert (f.stats.errors, f.stats.corrupt_chunks, f.stats.timeouts) == (0, 0, 0)
    assert trio.run(lambda: f.fetch(blob.digest, blob.chunks, [], deadline=0.0)) == {}
    with pytest.raises(ValueError, match="outside the table"):
        trio.run(lambda: f.fetch(blob.digest, blob.chunks, [25], deadline=1e9))


# --- coalescing ------------------------------------------------------------------------------------


def test_adjacent_chunks_are_coalesced_into_one_request(blob):
    source = Recording(LayoutChunkSource(blob.layout))
    f = fetcher([source])
    c = blob.chunks

    async def main():
        deadline = trio.current_time() + 30
        got = await f.fetch(blob.digest, c, [3, 4, 5, 6, 7], deadline=deadline)
        assert got == {i: blob.stored(i) for i in range(3, 8)}
        assert source.calls == [(c[3].offset, c[7].offset + c[7].length - c[3].offset)]

        source.calls.clear()
        got = await f.fetch(blob.digest, c, [16, 11, 10, 17], deadline=deadline)  # order does not matter
        assert got == {i: blob.stored(i) for i in (10, 11, 16, 17)}
        assert sorted(source.calls) == [
            (c[10].offset, c[10].length + c[11].length),
            (c[16].offset, c[16].length + c[17].length),
        ]

    trio.run(main)
    assert f.stats.requests == 3


def test_coalescing_is_capped_at_max_request_bytes(blob):
    source = Recording(LayoutChunkSource(blob.layout))
    c = blob.chunks
    f = fetcher([source], max_request_bytes=c[0].length + c[1].length)

    async def main():
        got = await f.fetch(blob.digest, c, [0, 1, 2], deadline=trio.current_time() + 30)
        assert got == {i: blob.stored(i) for i in range(3)}

    trio.run(main)
    assert sorted(source.calls) == [(c[0].offset, c[0].length + c[1].length), (c[2].offset, c[2].length)]


# --- single-flight ---------------------------------------------------------------------------------


def test_concurrent_fetches_of_one_chunk_share_one_request(blob):
    source = Recording(LayoutChunkSource(blob.layout), delay=0.2)
    f = fetcher([source])
    results: list[dict[int, bytes]] = []

    async def one():
        results.append(await f.fetch(blob.digest, blob.chunks, [5], deadline=trio.current_time() + 30))

    async def main():
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)

    trio.run(main)
    assert source.calls == [(blob.chunks[5].offset, blob.chunks[5].length)]
    assert results == [{5: blob.stored(5)}] * 20
    assert f.stats.singleflight_waits == 19
    assert f.stats.bytes_by_source == {"local": blob.chunks[5].length}  # counted once


def test_overlapping_fetches_only_request_what_is_not_in_flight(blob):
    source = Recording(LayoutChunkSource(blob.layout), delay=0.2)
    f = fetcher([source])
    c = blob.chunks

    async def main():
        got: dict[str, dict[int, bytes]] = {}

        async def fetch(key, indexes):
            got[key] = await f.fetch(blob.digest, c, indexes, deadline=trio.current_time() + 30)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, "first", [4, 5, 6])
            await trio.testing.wait_all_tasks_blocked()  # the first one has claimed 4-6
            nursery.start_soon(fetch, "second", [5, 6, 7, 8])
        assert got["first"] == {i: blob.stored(i) for i in (4, 5, 6)}
        assert got["second"] == {i: blob.stored(i) for i in (5, 6, 7, 8)}

    trio.run(main)
    assert sorted(source.calls) == [
        (c[4].offset, c[6].offset + c[6].length - c[4].offset),
        (c[7].offset, c[7].length + c[8].length),
    ]
    assert f.stats.singleflight_waits == 2


def test_a_follower_whose_deadline_passes_stops_waiting_while_the_leader_finishes(blob):
    source = Recording(LayoutChunkSource(blob.layout), delay=0.3)
    f = fetcher([source])

    async def main():
        leader_got = {}

        async def leader():
            leader_got.update(await f.fetch(blob.digest, blob.chunks, [2], deadline=trio.current_time() + 30))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(leader)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(FetchTimeout):
                await f.fetch(blob.digest, blob.chunks, [2], deadline=trio.current_time() + 0.05)
        assert leader_got == {2: blob.stored(2)}

    trio.run(main)
    assert len(source.calls) == 1
    assert (f.stats.singleflight_waits, f.stats.timeouts) == (1, 1)


def test_a_follower_takes_over_when_the_leader_gives_up_first(blob):
    source = Recording(LayoutChunkSource(blob.layout), delay=0.3)
    f = fetcher([source])

    async def main():
        outcome = {}

        async def leader():
            with pytest.raises(FetchTimeout):
                await f.fetch(blob.digest, blob.chunks, [2], deadline=trio.current_time() + 0.05)
            outcome["leader"] = "timed out"

        async def follower():
            outcome["follower"] = await f.fetch(blob.digest, blob.chunks, [2], deadline=trio.current_time() + 30)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(leader)
            await trio.testing.wait_all_tasks_blocked()  # the leader has claimed chunk 2
            nursery.start_soon(follower)
        assert outcome == {"leader": "timed out", "follower": {2: blob.stored(2)}}

    trio.run(main)
    assert len(source.calls) == 2  # the leader's abandoned request, and the follower's own
    assert f.stats.singleflight_waits == 1


# --- lies, failures, deadlines ---------------------------------------------------------------------


def test_a_lying_source_is_never_believed_and_goes_to_the_back(blob):
    liar = Liar(LayoutChunkSource(blob.layout), name="liar")
    honest = Recording(LayoutChunkSource(blob.layout))
    f = fetcher([liar, honest])

    async def main():
        got = await f.fetch(blob.digest, blob.chunks, [0, 1, 2, 3], deadline=trio.current_time() + 30)
        assert got == {i: blob.stored(i) for i in range(4)}
        assert len(liar.calls) == 1 and len(honest.calls) == 1
        # Penalized: the next fetch asks the honest source first and never needs the liar.
        got = await f.fetch(blob.digest, blob.chunks, [9, 10], deadline=trio.current_time() + 30)
        assert got == {i: blob.stored(i) for i in (9, 10)}
        assert len(liar.calls) == 1 and len(honest.calls) == 2

    trio.run(main)
    assert f.stats.corrupt_chunks == 4
    assert f.stats.corrupt_by_source == {"liar": 4}
    assert f.stats.bytes_by_source["liar"] == 0
    assert f.stats.bytes_by_source["local"] == sum(blob.chunks[i].length for i in (0, 1, 2, 3, 9, 10))


def test_only_liars_means_an_error_not_bad_bytes(blob):
    f = fetcher([Liar(LayoutChunkSource(blob.layout), name="liar")], retries=2, backoff=0.01)

    async def main():
        with pytest.raises(FetchError, match="every source failed 3 time") as info:
            await f.fetch(blob.digest, blob.chunks, [7], deadline=trio.current_time() + 1000)
        assert not isinstance(info.value, FetchTimeout)

    trio.run(main)
    assert f.stats.corrupt_chunks == 3
    assert f.stats.failures == 1


def test_a_dead_source_fails_over_to_the_next(blob):
    dead = Dead()
    f = fetcher([dead, LayoutChunkSource(blob.layout)])

    async def main():
        return await f.fetch(blob.digest, blob.chunks, [1, 2, 20], deadline=trio.current_time() + 30)

    assert trio.run(main) == {i: blob.stored(i) for i in (1, 2, 20)}
    assert dead.calls == 2  # two ranges: 1-2 and 20
    assert f.stats.errors == 2 and f.stats.errors_by_source == {"dead": 2}
    assert f.stats.bytes_by_source == {"local": sum(blob.chunks[i].length for i in (1, 2, 20))}


def test_short_reads_keep_the_complete_chunks_and_fetch_the_rest_elsewhere(blob):
    class Short(Recording):
        def fetch_range(self, digest, offset, length, timeout):
            return super().fetch_range(digest, offset, length, timeout)[: length // 2]

    short = Short(LayoutChunkSource(blob.layout), name="short")
    f = fetcher([short, LayoutChunkSource(blob.layout)])

    async def main():
        return await f.fetch(blob.digest, blob.chunks, [0, 1, 2, 3], deadline=trio.current_time() + 30)

    assert trio.run(main) == {i: blob.stored(i) for i in range(4)}
    assert f.stats.bytes_by_source["short"] > 0 and f.stats.bytes_by_source["local"] > 0
    assert f.stats.errors == 1


def test_all_sources_dead_raises_fetch_timeout_at_the_deadline(blob):
    f = fetcher([Dead("a"), Dead("b")], retries=1000)

    async def main():
        deadline = trio.current_time() + 5.0
        with pytest.raises(FetchTimeout, match="2 of 2 chunk.s. not fetched by the deadline"):
            await f.fetch(blob.digest, blob.chunks, [0, 1], deadline=deadline)
        assert deadline <= trio.current_time() <= deadline + 0.01

    # A little real time before each jump lets the dead sources' threads report back (they take
    # microseconds), so the backoff-and-retry rounds really run; a late one only ends the test sooner.
    run_mock(main, autojump_threshold=0.1)
    assert f.stats.timeouts == 1
    assert f.stats.retries > 3  # backed off and retried until the deadline


def test_retries_are_bounded(blob):
    dead = Dead()
    f = fetcher([dead], retries=2, backoff=0.01)

    async def main():
        with pytest.raises(FetchError, match="every source failed 3 time"):
            await f.fetch(blob.digest, blob.chunks, [0], deadline=trio.current_time() + 1000)

    trio.run(main)
    assert dead.calls == 3
    assert f.stats.retries == 2


def test_a_hanging_source_cannot_outlast_the_deadline(blob):
    hanging = Hanging()
    limiter = trio.CapacityLimiter(3)
    f = Fetcher([hanging], limiter=limiter, request_timeout=1.0, retries=1000)

    async def main():
        deadline = trio.current_time() + 5.0
        try:
            with pytest.raises(FetchTimeout, match="no answer within 1s"):
                await f.fetch(blob.digest, blob.chunks, [4], deadline=deadline)
            assert deadline <= trio.current_time() <= deadline + 0.01
            # The abandoned threads still hold their limiter tokens: stuck sources cannot pile up threads.
            assert limiter.borrowed_tokens == 3
        finally:
            hanging.release.set()
        for _ in range(3):  # each token comes back as its thread ends
            await limiter.acquire_on_behalf_of(object())

    run_mock(main)
    assert hanging.calls == 3
    assert f.stats.request_timeouts == 3


def test_a_hanging_source_fails_over_after_the_request_timeout(blob):
    hanging = Hanging()
    f = fetcher([hanging, LayoutChunkSource(blob.layout)], request_timeout=0.2)

    async def main():
        try:
            return await f.fetch(blob.digest, blob.chunks, [6], deadline=trio.current_time() + 30)
        finally:
            hanging.release.set()

    assert trio.run(main) == {6: blob.stored(6)}
    assert f.stats.request_timeouts == 1
    assert f.stats.bytes_by_source == {"local": blob.chunks[6].length}


def test_a_deadline_in_the_past_fails_at_once(blob):
    source = Recording(LayoutChunkSource(blob.layout))
    f = fetcher([source])

    async def main():
        with pytest.raises(FetchTimeout, match="already passed"):
            await f.fetch(blob.digest, blob.chunks, [0], deadline=trio.current_time())

    trio.run(main)
    assert source.calls == []


def test_source_names_must_be_unique(blob):
    with pytest.raises(ValueError, match="unique"):
        fetcher([LayoutChunkSource(blob.layout), LayoutChunkSource(blob.layout)])
    with pytest.raises(ValueError, match="at least one"):
        fetcher([])


# --- a real registry -------------------------------------------------------------------------------


def test_registry_source_survives_a_registry_restart(registry, blob, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config-unused"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    repo = "dadi/fetch-test"
    with RegistryClient(registry.host, plain_http=True) as client:
        assert client.put_blob(repo, blob.digest, blob.bytes, len(blob.bytes)) == "uploaded"
    source = RegistryChunkSource.connect(registry.host, repo, plain_http=True, timeout=2.0)
    peer = HttpChunkSource(registry.url, repo, "peer")
    everything = list(range(len(blob.chunks)))
    expected = {i: blob.stored(i) for i in everything}

    async def main():
        f = Fetcher([source], limiter=trio.CapacityLimiter(4), request_timeout=2.0, retries=1000, backoff=0.05)
        assert await f.fetch(blob.digest, blob.chunks, everything, deadline=trio.current_time() + 30) == expected
        assert f.stats.bytes_by_source == {"registry": sum(c.length for c in blob.chunks)}

        # A peer that serves the registry's blob API: same bytes, ranges coalesced and capped.
        g = Fetcher([peer], limiter=trio.CapacityLimiter(4), max_request_bytes=64 << 10)
        assert await g.fetch(blob.digest, blob.chunks, everything, deadline=trio.current_time() + 30) == expected
        assert g.stats.requests > 1

        await trio.to_thread.run_sync(registry.stop)
        deadline = trio.current_time() + 1.5
        with pytest.raises(FetchTimeout, match="registry"):
            await f.fetch(blob.digest, blob.chunks, [0, 1], deadline=deadline)
        # Generous: returns at the deadline, whatever the connection attempts are doing.
        assert trio.current_time() < deadline + 1.0
        assert f.stats.errors > 0

        await trio.to_thread.run_sync(registry.start)
        got = await f.fetch(blob.digest, blob.chunks, [0, 1, 24], deadline=trio.current_time() + 30)
        assert got == {i: blob.stored(i) for i in (0, 1, 24)}

    try:
        trio.run(main)
    finally:
        source.close()
        peer.close()
    assert all(hashlib.sha256(blob.stored(i)).digest() == blob.chunks[i].sha256 for i in everything)


# --- HttpChunkSource against a plain HTTP server --------------------------------------------------


class _BlobServer:
    """A keep-alive HTTP/1.1 server of one blob: answers Range with 206 (or, `ignore_range`, the whole
    blob with 200), and /redirect with an empty 307, as a supernode sends a node to a peer. Counts the
    connections it accepted."""

    def __init__(self, data: bytes, *, ignore_range: bool = False):
        import http.server

        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                server.connections += 1

            def do_GET(self):
                if self.path.startswith("/redirect"):
                    self.send_response(307)
                    self.send_header("Location", "http://192.0.2.1:8901/elsewhere")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                first, last = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
                body = data if ignore_range else data[first:last + 1]
                self.send_response(200 if ignore_range else 206)
                if not ignore_range:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.connections = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_http_source_keeps_its_connection_across_ranges_and_redirects():
    data = random.Random(5).randbytes(3 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with _BlobServer(data) as server:
        source = HttpChunkSource(server.url, "repo", "supernode")
        try:
            assert source.fetch_range(digest, 1000, 1 << 20, 5) == data[1000:1000 + (1 << 20)]
            with pytest.raises(SourceError, match="307") as redirect:
                source.fetch_url(server.url + "/redirect", 0, 10, 5, follow_redirects=False)
            assert redirect.value.location == "http://192.0.2.1:8901/elsewhere"
            # The empty 307 was read to its end: the next range goes over the same connection.
            assert source.fetch_range(digest, 5, 100, 5) == data[5:105]
            assert server.connections == 1
        finally:
            source.close()


def test_http_source_reads_only_its_range_of_a_server_that_ignores_range():
    data = random.Random(6).randbytes(3 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with _BlobServer(data, ignore_range=True) as server:
        source = HttpChunkSource(server.url, "repo", "peer")
        try:
            assert source.fetch_range(digest, (1 << 20) + 7, 4096, 5) == data[(1 << 20) + 7:(1 << 20) + 7 + 4096]
            # The rest of that body was not read: the connection was dropped, not reused mid-body.
            assert source.fetch_range(digest, 0, 10, 5) == data[:10]
            assert server.connections == 2
        finally:
            source.close()
