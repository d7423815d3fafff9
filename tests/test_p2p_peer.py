"""The peer server (dadi/p2p/peer.py) over real HTTP on loopback, in front of a real chunk cache: what a
node asking it gets, and which pieces it says it can serve."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import requests
import trio
from test_chunkcache import Blob, flip_byte
from test_supernode import env  # noqa: F401  (a fixture)

from dadi.node.chunkcache import ChunkCache
from dadi.p2p import peer
from dadi.p2p.peerproto import TICKET_PARAM, make_ticket

KEY = b"k" * 32


@pytest.fixture
def cached(tmp_path):
    """A real blob, its chunk cache, and a LayerBlob-like view of it as the daemon has."""
    blob = Blob(3, blocks=24)  # 24 chunks of up to 4 KiB
    with ChunkCache(tmp_path / "cache") as cache:
        entry = cache.open_blob(blob.digest, blob.size, blob.tables)
        yield blob, SimpleNamespace(digest=blob.digest, size=blob.size, tables=blob.tables, cache=entry), tmp_path


def test_held_pieces_are_those_every_byte_of_which_is_cached(cached):
    blob, layer, _ = cached
    piece = 8192
    assert peer.held_pieces(layer, piece) == set()
    blob.fill(layer.cache)  # every chunk, but not header, tables and footer
    held = peer.held_pieces(layer, piece)
    first_data, last = blob.tables.chunks[0].offset, blob.tables.chunks[-1]
    assert held == {p for p in range(blob.size // piece + 1)
                    if p * piece >= first_data and min((p + 1) * piece, blob.size) <= last.offset + last.length}
    layer.cache.put_metadata(*blob.metadata())
    assert layer.cache.verify_complete()
    assert peer.held_pieces(layer, piece) == set(range(-(-blob.size // piece)))  # verified: all of it


def test_read_range_serves_cached_chunks_only_and_rechecks_them(cached):
    blob, layer, _ = cached
    chunks = blob.tables.chunks
    blob.fill(layer.cache, [3, 4])
    start, end = chunks[3].offset + 10, chunks[4].offset + 100
    assert peer.read_range(layer, start, end) == blob.data[start:end]
    assert peer.read_range(layer, chunks[3].offset, chunks[5].offset + 1) is None  # chunk 5 missing
    assert peer.read_range(layer, 0, chunks[3].offset + 1) is None  # header: only from a verified blob
    flip_byte(layer.cache.path / "data", chunks[4].offset + 1)
    assert peer.read_range(layer, start, end) is None  # rot on disk: refused, and dropped from the cache
    assert not layer.cache.has(4) and layer.cache.corrupt == 1


def test_a_fetch_of_most_of_a_piece_takes_all_of_it_so_that_the_node_can_announce_it(cached):
    from dadi.node.view import round_to_pieces

    blob, layer, _ = cached
    chunks, piece = blob.tables.chunks, 16384
    overlapping = [i for i, c in enumerate(chunks) if c.offset < 2 * piece and c.offset + c.length > piece]
    inside = [i for i in overlapping if chunks[i].offset >= piece and chunks[i].offset + chunks[i].length <= 2 * piece]
    most = inside[1:]  # a run of chunks that covers 75% or more of piece 1, not all of it
    assert 0.75 * piece <= sum(chunks[i].length for i in most) < piece
    rounded = round_to_pieces(layer, most, piece, 0.75)
    assert rounded == overlapping  # the chunks straddling its edges too
    blob.fill(layer.cache, most)
    assert not peer.piece_is_held(layer, 1, piece)  # what the run alone gives: nothing to announce
    blob.fill(layer.cache, rounded)
    assert peer.piece_is_held(layer, 1, piece)
    # A small part of a piece (a sparse read) is left as it is; chunks already cached are not fetched again.
    around = [i for i, c in enumerate(chunks) if c.offset < 4 * piece and c.offset + c.length > 3 * piece]
    assert round_to_pieces(layer, around[1:3], piece, 0.75) == around[1:3]
    blob.fill(layer.cache, [around[1]])
    assert round_to_pieces(layer, around[2:], piece, 0.75) == [around[0], *around[2:]]


def test_the_server_answers_ranges_with_a_ticket_and_refuses_the_rest(cached):
    blob, layer, _ = cached
    blob.fill(layer.cache)
    chunks = blob.tables.chunks
    gate = threading.Event()
    entered = threading.Event()
    real_read = layer.cache.read_stored

    def slow_read(index):  # lets the test hold one upload in flight
        if index == 0:
            entered.set()
            gate.wait(30)
        return real_read(index)

    blocking = SimpleNamespace(digest=layer.digest, size=layer.size, tables=layer.tables,
                               cache=SimpleNamespace(read_stored=slow_read, verified=False))
    blobs = {blob.digest: layer}
    app = peer.PeerApp(lambda d: blobs.get(d), lambda: [KEY], uploads=1)
    results = {}

    def client(base: str) -> None:
        url = f"{base}/v2/any/repo/blobs/{blob.digest}"
        ticket = make_ticket(KEY, blob.digest, time.time() + 60)
        rng = {"Range": f"bytes={chunks[1].offset}-{chunks[2].offset + 9}"}
        results["ok"] = requests.get(f"{url}?{TICKET_PARAM}={ticket}", headers=rng, timeout=10)
        results["no_ticket"] = requests.get(url, headers=rng, timeout=10)
        results["forged"] = requests.get(f"{url}?{TICKET_PARAM}={make_ticket(b'x' * 32, blob.digest, time.time() + 60)}",
                                         headers=rng, timeout=10)
        results["past_end"] = requests.get(f"{url}?{TICKET_PARAM}={ticket}", headers={"Range": f"bytes={blob.size}-"},
                                           timeout=10)
        other = "sha256:" + "0" * 64
        results["not_held"] = requests.get(
            f"{base}/v2/any/repo/blobs/{other}?{TICKET_PARAM}={make_ticket(KEY, other, time.time() + 60)}",
            headers=rng, timeout=10)
        blobs[blob.digest] = blocking  # one upload in flight: the next asker is told to go elsewhere
        hold = threading.Thread(target=lambda: requests.get(
            f"{url}?{TICKET_PARAM}={ticket}", headers={"Range": f"bytes={chunks[0].offset}-{chunks[0].offset}"},
            timeout=30))
        hold.start()
        entered.wait(10)
        results["busy"] = requests.get(f"{url}?{TICKET_PARAM}={ticket}", headers=rng, timeout=10)
        gate.set()
        hold.join()

    async def main():
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(peer.serve, app, "127.0.0.1:0")
            await trio.to_thread.run_sync(client, binds[0])
            nursery.cancel_scope.cancel()

    trio.run(main)
    ok = results["ok"]
    assert ok.status_code == 206 and ok.content == blob.data[chunks[1].offset:chunks[2].offset + 10]
    assert results["no_ticket"].status_code == 403 and results["forged"].status_code == 403
    assert results["past_end"].status_code == 416 and results["not_held"].status_code == 404
    assert results["busy"].status_code == 503
    assert app.stats.uploads == 2 and app.stats.forbidden == 2 and app.stats.busy == 1


def test_p2p_listen_in_the_daemon_config(tmp_path):
    from dadi.errors import DadiError
    from dadi.node.config import load_config

    path = tmp_path / "daemon.toml"
    path.write_text('p2p_listen = "0.0.0.0:8901"\nsupernodes = ["http://sn1:8900"]\n')
    assert load_config(path).p2p_listen == "0.0.0.0:8901"
    path.write_text("p2p_listen = 8901\n")
    with pytest.raises(DadiError, match=r"daemon.toml: p2p_listen must be \"HOST:PORT\""):
        load_config(path)


def test_a_supernode_without_peers_never_makes_a_request_wait_or_redirects(registry, tmp_path, env):  # noqa: F811
    from conftest import pseudo_random
    from test_supernode import Supernode, push_blob

    data = pseudo_random("no peers", 3 << 20)
    digest = push_blob(registry, data)
    with Supernode(tmp_path, registry.host, tmp_path / "cache") as supernode:
        for _ in range(5):  # hot, and served whole each time: seeds, were these nodes peers
            answer = supernode.get(digest, "bytes=0-1048575")
            assert answer.status_code == 206 and answer.content == data[:1 << 20]
        assert supernode.metric("dadi_supernode_held_requests_total") == 0
        assert supernode.metric("dadi_supernode_redirects_total", result="peer") == 0
        assert supernode.metric("dadi_supernode_redirects_total", result="no_peer") == 4


@pytest.mark.parametrize("answer", [b"{}", b"[1]", b'{"key": "not hex"}', b"not json"])
def test_an_announce_answered_with_garbage_is_a_failure_not_a_crash(answer):
    import http.server

    from dadi.p2p.announce import Announcer, _Target
    from dadi.p2p.peerproto import Announce

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        announcer = Announcer(8901, lambda: {})
        target = _Target(sent={})
        sent = trio.run(announcer._send, f"http://127.0.0.1:{server.server_address[1]}", target,
                        Announce(8901, {}, {}, full=True))
        assert (sent, target.failed, announcer.stats.failures, announcer.keys()) == (False, True, 1, [])
    finally:
        server.shutdown()
        server.server_close()
