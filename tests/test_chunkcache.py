"""The node's chunk cache: round trips, corruption, crash consistency, whole-blob verification, eviction."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import pseudo_random

from dadi.errors import DadiError
from dadi.format.blob import (
    FOOTER_SIZE,
    HEADER_SIZE,
    BlobWriter,
    decode_chunk,
    read_blob_tables,
    tables_offset,
)
from dadi.format.model import LayerTables
from dadi.node import chunkcache
from dadi.node.chunkcache import ChunkCache

BLOCK = 4096
REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Blob:
    """A real layer blob (bytes), its digest and its parsed tables."""

    def __init__(self, seed: int, blocks: int = 24):
        out = io.BytesIO()
        writer = BlobWriter(out, disk_size=64 * BLOCK * 16, block_size=BLOCK, chunk_size=BLOCK)
        for block in range(blocks):
            if block % 3 == 2:  # compressible, so the blob holds compressed and raw chunks
                data = (b"layer %d block %d " % (seed, block)) * (BLOCK // 16)
            else:
                data = pseudo_random(f"{seed}:{block}", BLOCK)
            writer.add_data(block, data[:BLOCK].ljust(BLOCK, b"\0"))
        info = writer.finish()
        self.data = out.getvalue()
        self.digest = info.digest
        self.size = len(self.data)
        self.tables: LayerTables = read_blob_tables(io.BytesIO(self.data))
        self.tables_size = info.tables_size

    def stored(self, index: int) -> bytes:
        chunk = self.tables.chunks[index]
        return self.data[chunk.offset : chunk.offset + chunk.length]

    def metadata(self) -> tuple[bytes, bytes, bytes]:
        start = tables_offset(self.size, self.tables_size)
        return self.data[:HEADER_SIZE], self.data[start : self.size - FOOTER_SIZE], self.data[-FOOTER_SIZE:]

    def fill(self, cache_blob, indexes=None) -> None:
        for i in range(len(self.tables.chunks)) if indexes is None else indexes:
            cache_blob.put_stored(i, self.stored(i))


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def blob() -> Blob:
    return Blob(1)


def blob_dir(root: Path, digest: str) -> Path:
    return root / "blobs" / digest.removeprefix("sha256:")


def test_put_and_read_round_trip(tmp_path, blob):
    assert any(c.compressed for c in blob.tables.chunks) and not all(c.compressed for c in blob.tables.chunks)
    with ChunkCache(tmp_path) as cache:
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)
        assert (cached.chunk_count, cached.present_count, cached.complete) == (24, 0, False)
        assert cached.read_stored(0) is None
        blob.fill(cached, [0, 2, 5])
        assert cached.present_count == 3
        assert cached.missing(range(7)) == [1, 3, 4, 6]
        for i in (0, 2, 5):
            stored = cached.read_stored(i)
            assert stored == blob.stored(i)
            chunk = blob.tables.chunks[i]
            packed = decode_chunk(stored, chunk, verify="sha256")
            assert packed == decode_chunk(blob.stored(i), chunk)
        assert cached.read_stored(1) is None
        # The same object for the same blob, so two users never keep two bitmaps of one file.
        assert cache.open_blob(blob.digest, blob.size, blob.tables) is cached


def test_bad_input_is_refused_with_what_and_where(tmp_path, blob):
    with ChunkCache(tmp_path) as cache:
        with pytest.raises(DadiError, match="not a sha256 digest"):
            cache.open_blob("sha256:XYZ", blob.size, blob.tables)
        with pytest.raises(DadiError, match="not a sha256 digest"):
            cache.open_blob("sha256:../../etc", blob.size, blob.tables)
        with pytest.raises(DadiError, match="cannot hold its tables' chunk data"):
            cache.open_blob(blob.digest, 1000, blob.tables)
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)
        with pytest.raises(ValueError, match="chunk 3 at blob offset .* has .* stored bytes, got 5"):
            cached.put_stored(3, b"short")
        with pytest.raises(IndexError, match="chunk index -1"):
            cached.put_stored(-1, blob.stored(23))
        with pytest.raises(IndexError, match="chunk index 24"):
            cached.read_stored(24)
        with pytest.raises(ValueError, match="nothing acquired"):
            cache.release(blob.digest)
        header, tables_bytes, footer = blob.metadata()
        with pytest.raises(ValueError, match="tables of .* would start at blob offset"):
            cached.put_metadata(header, tables_bytes + b"x", footer)
        assert cached.present_count == 0
    other = Blob(2, blocks=10)
    with ChunkCache(tmp_path) as cache:
        with pytest.raises(DadiError, match=f"cached as {blob.size} bytes in 24 chunks, but was opened as"):
            cache.open_blob(blob.digest, other.size, other.tables)


def test_xxh3_catches_a_flipped_byte_and_the_chunk_is_fetched_again(tmp_path, blob):
    with ChunkCache(tmp_path) as cache:
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)
        blob.fill(cached, [3, 4])
        cached.flush()
        flip_byte(blob_dir(tmp_path, blob.digest) / "data", blob.tables.chunks[3].offset + 7)
        assert cached.read_stored(3) is None
        assert not cached.has(3)
        assert cached.corrupt == 1
        assert cached.read_stored(4) == blob.stored(4)
    # The absence was persisted: a restart does not trust the bad bytes.
    with ChunkCache(tmp_path) as cache:
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)
        assert cached.missing([3, 4]) == [3]
        cached.put_stored(3, blob.stored(3))
        assert cached.read_stored(3) == blob.stored(3)


def test_chunks_survive_a_restart(tmp_path, blob):
    with ChunkCache(tmp_path) as cache:
        blob.fill(cache.open_blob(blob.digest, blob.size, blob.tables), range(0, 24, 2))
    with ChunkCache(tmp_path) as cache:
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)
        assert cached.present_count == 12
        assert cached.missing(range(24)) == list(range(1, 24, 2))
        assert all(cached.read_stored(i) == blob.stored(i) for i in range(0, 24, 2))
        [info] = cache.blobs()
    assert info["digest"] == blob.digest and info["present"] == 12 and info["complete"] is False


def test_automatic_flush_every_n_puts(tmp_path, blob, monkeypatch):
    monkeypatch.setattr(chunkcache, "FLUSH_EVERY", 4)
    with ChunkCache(tmp_path) as cache:
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)
        blob.fill(cached, range(6))
        # What another process would find after a crash now: the first 4 (flushed), not the last 2.
        [info] = ChunkCache(tmp_path).blobs()
        assert info["present"] == 4


CRASHING_CHILD = textwrap.dedent("""
    import io, os, signal, sys
    from pathlib import Path
    from dadi.format.blob import read_blob_tables
    from dadi.node.chunkcache import ChunkCache

    root, blob_path, digest = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    data = blob_path.read_bytes()
    tables = read_blob_tables(io.BytesIO(data))
    cached = ChunkCache(root).open_blob(digest, len(data), tables)
    def put(i):
        c = tables.chunks[i]
        cached.put_stored(i, data[c.offset : c.offset + c.length])
    for i in range(5):
        put(i)
    cached.flush()
    for i in range(5, 12):
        put(i)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_sigkill_after_unflushed_puts_leaves_them_absent(tmp_path, blob):
    blob_path = tmp_path / "blob"
    blob_path.write_bytes(blob.data)
    child = subprocess.run(
        [sys.executable, "-c", CRASHING_CHILD, str(tmp_path / "cache"), str(blob_path), blob.digest],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    with ChunkCache(tmp_path / "cache") as cache:
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)
        assert cached.missing(range(24)) == list(range(5, 24))
        assert [cached.read_stored(i) for i in range(5)] == [blob.stored(i) for i in range(5)]


def test_torn_temp_files_and_damaged_bitmap_or_meta_are_survived(tmp_path, blob, caplog):
    with ChunkCache(tmp_path) as cache:
        blob.fill(cache.open_blob(blob.digest, blob.size, blob.tables), range(10))
    directory = blob_dir(tmp_path, blob.digest)
    # A crash in the middle of replacing the bitmap leaves a torn temp file and the old bitmap intact.
    present = (directory / "present").read_bytes()
    (directory / "present.tmp").write_bytes(present[: len(present) // 2])
    (directory / "meta.json.tmp").write_bytes(b'{"dig')
    with ChunkCache(tmp_path) as cache:
        assert cache.open_blob(blob.digest, blob.size, blob.tables).present_count == 10
    assert sorted(p.name for p in directory.iterdir()) == ["data", "meta.json", "present"]

    # A bitmap damaged some other way (truncated, or bits flipped) counts as empty: refetch, no crash.
    for damaged in (present[:-1], present[:-1] + bytes([present[-1] ^ 1])):
        (directory / "present").write_bytes(damaged)
        caplog.clear()
        with caplog.at_level(logging.WARNING), ChunkCache(tmp_path) as cache:
            cached = cache.open_blob(blob.digest, blob.size, blob.tables)
            assert cached.present_count == 0
            assert cached.read_stored(0) is None
        assert "treating every chunk as absent" in caplog.text

    (directory / "meta.json").write_bytes(b"\xff not json")
    caplog.clear()
    with caplog.at_level(logging.WARNING), ChunkCache(tmp_path) as cache:
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)
        blob.fill(cached, [1])
        assert cached.read_stored(1) == blob.stored(1)
    assert "meta.json: damaged" in caplog.text


def test_complete_blob_is_the_registry_blob_and_verifies(tmp_path, blob):
    with ChunkCache(tmp_path) as cache:
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)
        blob.fill(cached, reversed(range(24)))
        assert cached.complete and not cached.verified
        assert cached.verify_complete() is False  # no header, tables, footer yet: not the blob
        cached.put_metadata(*blob.metadata())
        assert cached.verify_complete() is True
        assert cached.verified
    data = (blob_dir(tmp_path, blob.digest) / "data").read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest
    assert data == blob.data
    # Completeness needs no explicit flush, and the verification is remembered.
    with ChunkCache(tmp_path) as cache:
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)
        assert cached.complete and cached.verified
        [info] = cache.blobs()
        assert (info["complete"], info["verified"], info["in_use"]) == (True, True, 0)


def test_verify_complete_marks_only_the_bad_chunk_absent(tmp_path, blob):
    with ChunkCache(tmp_path) as cache:
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)
        blob.fill(cached)
        cached.put_metadata(*blob.metadata())
        flip_byte(blob_dir(tmp_path, blob.digest) / "data", blob.tables.chunks[17].offset)
        assert cached.verify_complete() is False
        assert cached.missing(range(24)) == [17]
        assert not cached.complete and not cached.verified and cached.corrupt == 1
        cached.put_stored(17, blob.stored(17))
        assert cached.verify_complete() is True

        # Good chunks but a damaged footer: the metadata is what must be written again.
        flip_byte(blob_dir(tmp_path, blob.digest) / "data", blob.size - 1)
        assert cached.verify_complete() is False
        assert cached.complete and not cached.has_metadata and not cached.verified
        cached.put_metadata(*blob.metadata())
        assert cached.verify_complete() is True
    with ChunkCache(tmp_path) as cache:
        assert cache.open_blob(blob.digest, blob.size, blob.tables).verified


def test_a_lost_bitmap_also_loses_the_verification(tmp_path, blob):
    with ChunkCache(tmp_path) as cache:
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)
        blob.fill(cached)
        cached.put_metadata(*blob.metadata())
        assert cached.verify_complete()
    (blob_dir(tmp_path, blob.digest) / "present").write_bytes(b"")
    with ChunkCache(tmp_path) as cache:
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)
        blob.fill(cached)
        assert cached.complete and not cached.verified


def test_lru_eviction_respects_use_and_frees_disk(tmp_path):
    clock = FakeClock()
    blobs = [Blob(seed, blocks=64) for seed in range(3)]
    with ChunkCache(tmp_path, clock=clock) as cache:
        for b in blobs:  # opened and used at 1000, 1100, 1200
            b.fill(cache.open_blob(b.digest, b.size, b.tables))
            clock.now += 100
        # The oldest is used again later: now blobs[1] is the least recently used.
        clock.now += 100
        assert cache.open_blob(blobs[0].digest, blobs[0].size, blobs[0].tables).read_stored(0)
        cache.acquire(blobs[1].digest)

        full = cache.usage()
        assert full >= 3 * 64 * BLOCK // 2  # roughly half of it compresses away
        assert cache.evict(full) == []
        # Just under the total: one blob must go; blobs[1] is in use, so the next oldest, blobs[2].
        assert cache.evict(full - 1) == [blobs[2].digest]
        assert cache.usage() < full - 64 * BLOCK // 2
        assert not blob_dir(tmp_path, blobs[2].digest).exists()
        # Everything that is not in use goes; what is in use stays, even over the quota.
        assert cache.evict(0) == [blobs[0].digest]
        assert [info["digest"] for info in cache.blobs()] == [blobs[1].digest]
        assert cache.blobs()[0]["in_use"] == 1
        assert cache.usage() > 0

        cache.release(blobs[1].digest)
        assert cache.evict(0) == [blobs[1].digest]
        assert cache.usage() == 0 and cache.blobs() == []


def test_evicted_blob_object_refuses_io_and_reopens_empty(tmp_path, blob):
    with ChunkCache(tmp_path) as cache:
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)
        blob.fill(cached, [0])
        assert cache.evict(0) == [blob.digest]
        with pytest.raises(DadiError, match="no longer open"):
            cached.read_stored(0)
        with pytest.raises(DadiError, match="no longer open"):
            cached.put_stored(1, blob.stored(1))
        fresh = cache.open_blob(blob.digest, blob.size, blob.tables)
        assert fresh is not cached and fresh.present_count == 0


def test_lru_order_comes_from_disk_after_a_restart(tmp_path):
    clock = FakeClock()
    blobs = [Blob(seed) for seed in range(3)]
    with ChunkCache(tmp_path, clock=clock) as cache:
        for b in reversed(blobs):  # blobs[2] used first, blobs[0] last
            b.fill(cache.open_blob(b.digest, b.size, b.tables))
            clock.now += 100
    with ChunkCache(tmp_path, clock=clock) as cache:
        assert cache.evict(0) == [blobs[2].digest, blobs[1].digest, blobs[0].digest]


def test_quota_evicts_before_a_new_blob_is_created(tmp_path):
    clock = FakeClock()
    old, new = Blob(1, blocks=64), Blob(2, blocks=64)
    with ChunkCache(tmp_path, clock=clock) as cache:
        old.fill(cache.open_blob(old.digest, old.size, old.tables))
        used = cache.usage()
    with ChunkCache(tmp_path, quota=used - 1, clock=clock) as cache:
        cache.open_blob(old.digest, old.size, old.tables)  # already cached: nothing to make room for
        assert [info["digest"] for info in cache.blobs()] == [old.digest]
        cache.open_blob(new.digest, new.size, new.tables)
        assert [info["digest"] for info in cache.blobs()] == [new.digest]


def test_touch_writes_last_use_at_most_every_few_seconds(tmp_path, blob):
    clock = FakeClock()
    with ChunkCache(tmp_path, clock=clock) as cache:
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)
        blob.fill(cached, [0])
        clock.now += 1
        cached.read_stored(0)
        assert cache.blobs()[0]["last_used"] == 1000.0
        clock.now += chunkcache.TOUCH_INTERVAL
        cached.read_stored(0)
    with ChunkCache(tmp_path, clock=clock) as cache:
        assert cache.blobs()[0]["last_used"] == 1001.0 + chunkcache.TOUCH_INTERVAL


def test_gc_removes_unused_blobs_and_leftovers(tmp_path):
    kept, dropped = Blob(1), Blob(2)
    with ChunkCache(tmp_path) as cache:
        for b in (kept, dropped):
            b.fill(cache.open_blob(b.digest, b.size, b.tables), range(4))
        cache.acquire(kept.digest)
        # What a crash in the middle of a removal or an atomic write leaves behind.
        trash = tmp_path / "blobs" / ".trash-0123-1-2"
        trash.mkdir()
        (trash / "data").write_bytes(b"x" * 10000)
        (tmp_path / "blobs" / "stray.tmp").write_bytes(b"partial")

        assert cache.gc() == [dropped.digest]
        assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == [kept.digest.removeprefix("sha256:")]
        assert cache.open_blob(kept.digest, kept.size, kept.tables).read_stored(3) == kept.stored(3)
        cache.release(kept.digest)
        assert cache.gc() == [kept.digest]
        assert cache.usage() == 0


def test_concurrent_puts_and_reads_from_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(chunkcache, "FLUSH_EVERY", 7)
    blob = Blob(5, blocks=200)
    count = len(blob.tables.chunks)
    wrong = []
    with ChunkCache(tmp_path) as cache:
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)

        def work(i: int) -> None:
            cached.put_stored(i, blob.stored(i))
            neighbour = cached.read_stored((i * 7) % count)
            if neighbour is not None and neighbour != blob.stored((i * 7) % count):
                wrong.append(i)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(work, range(count)))
        assert wrong == [] and cached.complete and cached.corrupt == 0
    with ChunkCache(tmp_path) as cache:
        cached = cache.open_blob(blob.digest, blob.size, blob.tables)
        assert cached.complete
        cached.put_metadata(*blob.metadata())
        assert cached.verify_complete()
    assert not any(name.endswith(".tmp") for name in os.listdir(blob_dir(tmp_path, blob.digest)))
