"""The supernode's piece cache (dadi/p2p/piececache.py), without a server: bytes kept across restarts,
the quota as `du` measures it, LRU order, and what it does with damage it finds on its own disk."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest
from conftest import pseudo_random

from dadi.p2p.piececache import (
    PIECE_SIZE,
    CacheGone,
    CorruptPiece,
    PieceCache,
    blob_overhead,
    piece_count,
    pieces_spanning,
)

P = 64 * 1024  # a small piece size keeps these tests fast; the logic does not depend on it


def blob_bytes(seed: str, size: int) -> tuple[str, bytes]:
    data = pseudo_random(seed, size)
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def piece(data: bytes, index: int, size: int = P) -> bytes:
    return data[index * size : (index + 1) * size]


def fill(cache: PieceCache, digest: str, data: bytes) -> str:
    blob = cache.get(digest, len(data))
    assert blob is not None
    result = None
    for i in range(blob.count):
        result = cache.store(blob, i, piece(data, i, cache.piece_size))
    return result


def du(root: Path) -> int:
    total = root.lstat().st_blocks * 512
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_piece_arithmetic():
    assert PIECE_SIZE == 1 << 20
    assert piece_count(0) == 0 and piece_count(1) == 1 and piece_count(PIECE_SIZE) == 1
    assert piece_count(PIECE_SIZE + 1) == 2
    assert pieces_spanning(0, 1) == range(0, 1)
    assert pieces_spanning(PIECE_SIZE - 1, PIECE_SIZE + 1) == range(0, 2)
    assert pieces_spanning(PIECE_SIZE, 2 * PIECE_SIZE) == range(1, 2)


def test_pieces_survive_a_restart_and_a_complete_blob_verifies(tmp_path):
    digest, data = blob_bytes("restart", 3 * P + 1000)
    with_cache = PieceCache(tmp_path, piece_size=P)
    blob = with_cache.get(digest, len(data))
    assert with_cache.store(blob, 1, piece(data, 1)) == "stored"
    assert with_cache.store(blob, 3, piece(data, 3)) == "stored"
    assert blob.read(0) is None and blob.read(1) == piece(data, 1)
    with_cache.close()

    again = PieceCache(tmp_path, piece_size=P)
    blob = again.lookup(digest)
    assert blob is not None and blob.present == 2 and not blob.complete
    assert blob.read(3) == piece(data, 3) and blob.read(2) is None
    assert again.store(blob, 0, piece(data, 0)) == "stored"
    assert again.store(blob, 2, piece(data, 2)) == "complete"
    assert blob.verify() and blob.verified
    assert PieceCache(tmp_path, piece_size=P).lookup(digest).verified  # remembered in the piece map
    assert (tmp_path / "blobs" / digest[7:] / "data").read_bytes() == data  # the blob, byte for byte


def test_a_complete_blob_with_wrong_bytes_fails_verification(tmp_path):
    digest, data = blob_bytes("liar", 2 * P)
    cache = PieceCache(tmp_path, piece_size=P)
    blob = cache.get(digest, len(data))
    cache.store(blob, 0, piece(data, 0))
    assert cache.store(blob, 1, bytes(P)) == "complete"  # the registry (or a proxy) lied
    assert not blob.verify()
    assert cache.drop(digest, "wrong digest", only=blob)
    assert cache.lookup(digest) is None and not (tmp_path / "blobs" / digest[7:]).exists()
    with pytest.raises(CacheGone):
        blob.read(0)


def test_a_piece_that_rotted_on_disk_is_detected(tmp_path):
    digest, data = blob_bytes("rot", 2 * P)
    cache = PieceCache(tmp_path, piece_size=P)
    fill(cache, digest, data)
    with open(tmp_path / "blobs" / digest[7:] / "data", "r+b") as f:
        f.seek(P + 100)
        f.write(b"\xff")
    blob = cache.lookup(digest)
    assert blob.read(0) == piece(data, 0)
    with pytest.raises(CorruptPiece, match="piece 1 at blob offset 65536"):
        blob.read(1)


@pytest.mark.parametrize("damage", ["truncate", "flip", "geometry"])
def test_a_damaged_piece_map_means_nothing_is_cached(tmp_path, damage, caplog):
    digest, data = blob_bytes("map", 2 * P)
    fill(PieceCache(tmp_path, piece_size=P), digest, data)
    path = tmp_path / "blobs" / digest[7:] / "pieces"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:-3]
    elif damage == "flip":
        raw[33] ^= 1
    else:
        struct.pack_into("<I", raw, 12, P * 2)  # another piece size (and a matching checksum would not help)
    path.write_bytes(bytes(raw))
    blob = PieceCache(tmp_path, piece_size=P).lookup(digest)
    assert blob.present == 0 and blob.read(0) is None
    assert "piece map damaged" in caplog.text


def test_the_quota_holds_on_disk_and_evicts_the_least_recently_used(tmp_path):
    clock = Clock()
    evicted = []
    quota = 10 * P
    cache = PieceCache(tmp_path, quota, piece_size=P, clock=clock, on_evict=lambda d, r: evicted.append((d, r)))
    blobs = [blob_bytes(f"lru {k}", 3 * P + 5000) for k in range(6)]
    for digest, data in blobs[:2]:
        clock.now += 10
        assert fill(cache, digest, data) == "complete"
    clock.now += 10
    assert cache.lookup(blobs[0][0]).read(0) is not None  # blob 0 is now more recent than blob 1
    for digest, data in blobs[2:]:
        clock.now += 10
        assert fill(cache, digest, data) == "complete"
        assert du(tmp_path) <= quota and cache.usage <= quota
    assert evicted[0] == (blobs[1][0], "quota")  # the least recently used went first
    assert cache.lookup(blobs[-1][0]).complete
    assert du(tmp_path) <= cache.usage  # the accounting never undercounts


def test_a_blob_larger_than_the_quota_is_cached_only_as_far_as_it_fits(tmp_path):
    digest, data = blob_bytes("huge", 8 * P)
    quota = blob_overhead(8) + 3 * P + 2 * 4096  # the overhead, three pieces and the directories
    cache = PieceCache(tmp_path, quota, piece_size=P)
    blob = cache.get(digest, len(data))
    results = [cache.store(blob, i, piece(data, i)) for i in range(8)]
    assert results == ["stored"] * 3 + ["no_room"] * 5
    assert du(tmp_path) <= quota
    assert [blob.has(i) for i in range(8)] == [True] * 3 + [False] * 5


def test_a_lower_quota_at_start_evicts_at_once_and_leftovers_go(tmp_path):
    cache = PieceCache(tmp_path, piece_size=P)
    for k in range(3):
        fill(cache, *blob_bytes(f"start {k}", 2 * P))
    cache.close()
    (tmp_path / "blobs" / ".trash-deadbeef-1").mkdir()  # a removal a crash interrupted
    smaller = PieceCache(tmp_path, 4 * P, piece_size=P)
    assert len(smaller.blobs()) == 1 and smaller.usage <= 4 * P
    assert not (tmp_path / "blobs" / ".trash-deadbeef-1").exists()
    assert du(tmp_path) <= 4 * P


def test_a_blob_cached_under_another_size_is_dropped_and_started_again(tmp_path):
    digest, data = blob_bytes("sizes", 2 * P)
    cache = PieceCache(tmp_path, piece_size=P)
    fill(cache, digest, data)
    blob = cache.get(digest, 2 * P + 1)
    assert blob.size == 2 * P + 1 and blob.present == 0
