"""The writable layer: block copy-on-write over a lower disk, against a reference model and a real ext4.

The lower disk is a bytes buffer behind `read_lower`: the layer only ever sees that callback.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import fsck_clean
from hypothesis import given, settings
from hypothesis import strategies as st

from dadi.errors import DadiError
from dadi.node.writable import BLOCKS_NAME, WritableLayer

BS = 4096
DISK = 64 * BS  # 256 KiB: small enough to compare whole disks


def make_lower(size: int = DISK, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


class Lower:
    """A read-only lower disk; counts the copy-ups the layer asks it for."""

    def __init__(self, data: bytes):
        self.data = data
        self.calls: list[tuple[int, int]] = []

    def __call__(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        return self.data[offset : offset + length]


def no_lower(offset: int, length: int) -> bytes:
    raise AssertionError(f"unexpected copy-up at {offset}+{length}")


def merged_from_runs(layer: WritableLayer, lower: bytes, offset: int, length: int) -> bytes:
    """What a reader builds from runs(): this layer's written runs, the lower disk elsewhere."""
    out = bytearray()
    for start, size, written in layer.runs(offset, length):
        out += layer.read(start, size) if written else lower[start : start + size]
    return bytes(out)


def check_runs(layer: WritableLayer, offset: int, length: int, written_blocks: set[int]) -> None:
    """runs() tiles the range exactly, alternates, and says written exactly for the written blocks."""
    runs = layer.runs(offset, length)
    pos = offset
    for i, (start, size, written) in enumerate(runs):
        assert start == pos and size > 0
        if i:
            assert written != runs[i - 1][2], "adjacent runs must differ"
        for b in range(start // BS, (start + size - 1) // BS + 1):
            assert (b in written_blocks) == written
        pos += size
    assert pos == offset + length


# -- basic behaviour -----------------------------------------------------------------------------


def test_fresh_layer_is_all_lower(tmp_path):
    lower = make_lower()
    with WritableLayer(tmp_path / "w", DISK) as layer:
        assert layer.runs(0, DISK) == [(0, DISK, False)]
        assert layer.runs(100, 0) == []
        assert layer.written_bytes() == 0
        assert layer.read_through(0, DISK, Lower(lower)) == lower
        assert os.stat(tmp_path / "w" / "data").st_size == DISK


def test_whole_block_writes_need_no_copy_up(tmp_path):
    lower = make_lower()
    with WritableLayer(tmp_path / "w", DISK) as layer:
        layer.write(2 * BS, b"a" * (3 * BS), no_lower)
        layer.write(DISK - BS, b"z" * BS, no_lower)
        assert layer.runs(0, DISK) == [
            (0, 2 * BS, False),
            (2 * BS, 3 * BS, True),
            (5 * BS, DISK - 6 * BS, False),
            (DISK - BS, BS, True),
        ]
        assert layer.runs(2 * BS + 10, 100) == [(2 * BS + 10, 100, True)]  # clipped to the range
        assert layer.read(3 * BS, BS) == b"a" * BS
        assert layer.written_bytes() == 4 * BS
        expected = bytearray(lower)
        expected[2 * BS : 5 * BS] = b"a" * (3 * BS)
        expected[DISK - BS :] = b"z" * BS
        assert merged_from_runs(layer, lower, 0, DISK) == expected


def test_unaligned_write_copies_up_the_edges(tmp_path):
    lower = Lower(make_lower())
    with WritableLayer(tmp_path / "w", DISK) as layer:
        offset, data = BS + 100, b"x" * (2 * BS)  # blocks 1, 2 (whole) and 3
        layer.write(offset, data, lower)
        assert sorted(lower.calls) == [(BS, BS), (3 * BS, BS)]  # only the two partial edges
        assert layer.runs(0, 5 * BS) == [(0, BS, False), (BS, 3 * BS, True), (4 * BS, BS, False)]
        expected = bytearray(lower.data)
        expected[offset : offset + len(data)] = data
        assert layer.read(BS, 3 * BS) == expected[BS : 4 * BS]  # lower bytes kept around the write

        # A second partial write into a block this layer holds completes it from this layer.
        lower.calls.clear()
        layer.write(BS + 10, b"yy", lower)
        assert lower.calls == []
        expected[BS + 10 : BS + 12] = b"yy"
        assert merged_from_runs(layer, lower.data, 0, DISK) == expected


def test_write_inside_one_block(tmp_path):
    lower = Lower(make_lower())
    with WritableLayer(tmp_path / "w", DISK) as layer:
        layer.write(5 * BS + 7, b"hello", lower)
        assert lower.calls == [(5 * BS, BS)]
        assert layer.runs(5 * BS, BS) == [(5 * BS, BS, True)]
        assert layer.written_bytes() == BS
        expected = bytearray(lower.data)
        expected[5 * BS + 7 : 5 * BS + 12] = b"hello"
        assert layer.read_through(0, DISK, lower) == expected


def test_out_of_range_is_refused(tmp_path):
    with WritableLayer(tmp_path / "w", DISK) as layer:
        with pytest.raises(ValueError, match="outside the disk"):
            layer.write(DISK - 10, b"x" * 11, no_lower)
        with pytest.raises(ValueError, match="outside the disk"):
            layer.write(DISK, b"x", no_lower)
        with pytest.raises(ValueError, match="outside the disk"):
            layer.write(-1, b"x", no_lower)
        with pytest.raises(ValueError, match="outside the disk"):
            layer.runs(0, DISK + 1)
        with pytest.raises(ValueError, match="outside the disk"):
            layer.read(DISK - 1, 2)
        layer.write(DISK, b"", no_lower)  # empty at the very end: nothing to do
        assert layer.written_bytes() == 0


def test_bad_geometry_is_refused(tmp_path):
    with pytest.raises(ValueError, match="block size"):
        WritableLayer(tmp_path / "a", DISK, block_size=3000)
    with pytest.raises(ValueError, match="disk size"):
        WritableLayer(tmp_path / "b", DISK + 1)


def test_copy_up_checks_the_lower_length(tmp_path):
    with WritableLayer(tmp_path / "w", DISK) as layer:
        with pytest.raises(ValueError, match="lower layers returned 3 bytes"):
            layer.write(10, b"x", lambda offset, length: b"abc")
        assert layer.written_bytes() == 0


# -- reference model -----------------------------------------------------------------------------

writes = st.lists(
    st.tuples(st.integers(0, DISK - 1), st.integers(1, 3 * BS + 1), st.integers(0, 255)),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(writes=writes, reads=st.lists(st.tuples(st.integers(0, DISK), st.integers(0, DISK)), max_size=8))
def test_random_writes_match_the_model(writes, reads):
    lower = make_lower()
    model = bytearray(lower)
    written: set[int] = set()
    with tempfile.TemporaryDirectory() as tmp:
        with WritableLayer(Path(tmp) / "w", DISK) as layer:
            for offset, length, byte in writes:
                length = min(length, DISK - offset)
                data = bytes([byte]) * length
                layer.write(offset, data, Lower(lower))
                model[offset : offset + length] = data
                written.update(range(offset // BS, (offset + length - 1) // BS + 1))
            for a, b in reads:
                offset, length = min(a, b), abs(a - b)
                assert merged_from_runs(layer, lower, offset, length) == model[offset : offset + length]
                check_runs(layer, offset, length, written)
            check_runs(layer, 0, DISK, written)
            assert layer.written_bytes() == len(written) * BS
        with WritableLayer(Path(tmp) / "w", DISK) as reopened:
            assert reopened.read_through(0, DISK, Lower(lower)) == model
            check_runs(reopened, 0, DISK, written)


def test_runs_over_a_big_disk_span_windows(tmp_path):
    """A bitmap bigger than one scan window: runs crossing window edges come out merged."""
    disk = 1 << 30  # 256 Ki blocks, several windows; the data file is sparse
    with WritableLayer(tmp_path / "w", disk) as layer:
        layer.write(0, bytes(BS * 40000), no_lower)  # crosses the first window edge (32768 blocks)
        layer.write(BS * 70000, bytes(BS), no_lower)
        assert layer.runs(0, disk) == [
            (0, 40000 * BS, True),
            (40000 * BS, 30000 * BS, False),
            (70000 * BS, BS, True),
            (70001 * BS, disk - 70001 * BS, False),
        ]


# -- persistence and crashes ---------------------------------------------------------------------


def test_reopen_keeps_the_writes(tmp_path):
    lower = Lower(make_lower())
    with WritableLayer(tmp_path / "w", DISK) as layer:
        layer.write(3 * BS + 5, b"persist me", lower)
        expected = layer.read_through(0, DISK, lower)
    with WritableLayer(tmp_path / "w", DISK) as layer:
        assert layer.read_through(0, DISK, lower) == expected
        assert layer.runs(0, DISK)[1] == (3 * BS, BS, True)
        assert layer.written_bytes() == BS


def test_geometry_mismatch_is_refused(tmp_path):
    WritableLayer(tmp_path / "w", DISK).close()
    with pytest.raises(DadiError, match=f"made for a disk of {DISK} bytes in blocks of 4096, not {2 * DISK}"):
        WritableLayer(tmp_path / "w", 2 * DISK)
    with pytest.raises(DadiError, match="in blocks of 4096, not .* in blocks of 512"):
        WritableLayer(tmp_path / "w", DISK, block_size=512)
    WritableLayer(tmp_path / "w", DISK).close()  # the refusals released the directory


def test_damaged_or_foreign_directories_are_refused(tmp_path):
    WritableLayer(tmp_path / "w", DISK).close()
    (tmp_path / "w" / BLOCKS_NAME).write_bytes(b"\0" * 3)
    with pytest.raises(DadiError, match="blocks: 3 bytes, expected 8"):
        WritableLayer(tmp_path / "w", DISK)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("not a layer")
    with pytest.raises(DadiError, match="not a writable layer"):
        WritableLayer(tmp_path / "other", DISK)
    assert (tmp_path / "other" / "precious.txt").read_text() == "not a layer"


def test_a_layer_is_used_by_one_owner_at_a_time(tmp_path):
    with WritableLayer(tmp_path / "w", DISK):
        with pytest.raises(DadiError, match="in use"):
            WritableLayer(tmp_path / "w", DISK)
    WritableLayer(tmp_path / "w", DISK).close()


def test_interrupted_creation_is_redone(tmp_path):
    """No meta = creation never finished (meta is written last): the directory is made afresh."""
    with WritableLayer(tmp_path / "w", DISK) as layer:
        layer.write(0, b"x" * BS, no_lower)
    (tmp_path / "w" / "meta").unlink()
    with WritableLayer(tmp_path / "w", DISK) as layer:
        assert layer.written_bytes() == 0
        assert layer.runs(0, DISK) == [(0, DISK, False)]


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from dadi.node.writable import WritableLayer
    layer = WritableLayer(sys.argv[1], int(sys.argv[2]))
    bs = 4096
    layer.write(1 * bs, b"F" * bs, None)           # whole block, flushed below
    layer.write(2 * bs + 100, b"f" * 10, lambda o, n: b"L" * n)  # copy-up, flushed below
    layer.flush()
    layer.write(5 * bs, b"U" * bs, None)           # never flushed
    layer.write(6 * bs + 7, b"u", lambda o, n: b"L" * n)
    os._exit(0)                                     # the daemon dies: no close, no flush
    """
)


def test_crash_loses_only_unflushed_writes(tmp_path):
    """A process killed after flush keeps what was flushed; unflushed blocks read as the lower again."""
    subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path / "w"), str(DISK)], check=True)
    lower = b"L" * DISK
    with WritableLayer(tmp_path / "w", DISK) as layer:
        assert layer.runs(0, 8 * BS) == [(0, BS, False), (BS, 2 * BS, True), (3 * BS, 5 * BS, False)]
        expected = bytearray(lower)
        expected[BS : 2 * BS] = b"F" * BS
        expected[2 * BS + 100 : 2 * BS + 110] = b"f" * 10
        assert layer.read_through(0, DISK, lambda o, n: lower[o : o + n]) == expected
        # Writing the lost blocks again works as on a fresh block (their stale data is overwritten).
        layer.write(5 * BS + 1, b"v", lambda o, n: lower[o : o + n])
        assert layer.read(5 * BS, 3) == b"LvL"


def test_leftover_temp_bitmap_is_ignored(tmp_path):
    """A crash between writing blocks.tmp and the rename leaves the old bitmap in force."""
    with WritableLayer(tmp_path / "w", DISK) as layer:
        layer.write(0, b"a" * BS, no_lower)
    (tmp_path / "w" / (BLOCKS_NAME + ".tmp")).write_bytes(b"\xff" * 8)
    with WritableLayer(tmp_path / "w", DISK) as layer:
        assert layer.runs(0, DISK) == [(0, BS, True), (BS, DISK - BS, False)]
        layer.write(BS, b"b" * BS, no_lower)
        layer.flush()
    assert not (tmp_path / "w" / (BLOCKS_NAME + ".tmp")).exists()


def test_clean_flushes_rewrite_nothing(tmp_path):
    bitmap = tmp_path / "w" / BLOCKS_NAME
    with WritableLayer(tmp_path / "w", DISK) as layer:
        layer.write(0, b"a" * BS, no_lower)
        layer.flush()
        inode = bitmap.stat().st_ino
        layer.flush()  # nothing changed
        assert bitmap.stat().st_ino == inode
        layer.write(0, b"b" * BS, no_lower)  # overwrite: data only, the bitmap is the same
        layer.flush()
        assert bitmap.stat().st_ino == inode
        layer.write(BS, b"c" * BS, no_lower)  # a new block: the bitmap is replaced
        layer.flush()
        assert bitmap.stat().st_ino != inode


# -- isolation, holes, threads -------------------------------------------------------------------


def test_two_layers_never_see_each_others_writes(tmp_path):
    lower = Lower(make_lower())
    with WritableLayer(tmp_path / "a", DISK) as a, WritableLayer(tmp_path / "b", DISK) as b:
        a.write(BS + 1, b"AAAA", lower)
        b.write(2 * BS, b"B" * BS, lower)
        assert a.runs(0, 3 * BS) == [(0, BS, False), (BS, BS, True), (2 * BS, BS, False)]
        assert b.runs(0, 3 * BS) == [(0, 2 * BS, False), (2 * BS, BS, True)]
        assert a.read_through(2 * BS, BS, lower) == lower.data[2 * BS : 3 * BS]
        assert b.read_through(BS, BS, lower) == lower.data[BS : 2 * BS]


def test_punch_hole_reads_as_zeros_and_frees_space(tmp_path):
    lower = Lower(make_lower())
    with WritableLayer(tmp_path / "w", DISK) as layer:
        layer.write(0, b"x" * (16 * BS), lower)
        layer.flush()
        used = os.stat(tmp_path / "w" / "data").st_blocks
        layer.punch_hole(BS + 10, 8 * BS, lower)  # partial block 1, whole 2..8, partial 9
        expected = bytearray(b"x" * (16 * BS)) + lower.data[16 * BS :]
        expected[BS + 10 : 9 * BS + 10] = bytes(8 * BS)
        assert layer.read_through(0, DISK, lower) == expected
        # Punching where the layer held nothing also reads zeros, not the lower layers' data.
        layer.punch_hole(20 * BS, 2 * BS, lower)
        layer.punch_hole(30 * BS + 5, 3, lower)
        expected[20 * BS : 22 * BS] = bytes(2 * BS)
        expected[30 * BS + 5 : 30 * BS + 8] = bytes(3)
        assert layer.read_through(0, DISK, lower) == expected
        layer.flush()
        assert os.stat(tmp_path / "w" / "data").st_blocks < used
    with WritableLayer(tmp_path / "w", DISK) as layer:
        assert layer.read_through(0, DISK, lower) == expected


def test_concurrent_partial_writes_to_shared_blocks_lose_nothing(tmp_path):
    """Threads writing disjoint bytes of the same blocks, with a slow lower: every byte survives."""
    lower_data = make_lower()

    def slow_lower(offset: int, length: int) -> bytes:
        time.sleep(0.001)  # widen the window between copy-up read and write
        return lower_data[offset : offset + length]

    slot = 97  # slots straddle block edges
    threads_n, per_thread = 8, 40
    expected = bytearray(lower_data)
    with WritableLayer(tmp_path / "w", DISK) as layer:

        def worker(t: int) -> None:
            for i in range(per_thread):
                offset = (i * threads_n + t) * slot
                layer.write(offset, bytes([t + 1]) * slot, slow_lower)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for t in range(threads_n):
            for i in range(per_thread):
                offset = (i * threads_n + t) * slot
                expected[offset : offset + slot] = bytes([t + 1]) * slot
        assert layer.read_through(0, DISK, slow_lower) == expected


def test_concurrent_whole_and_partial_writes_serialize(tmp_path):
    """A whole-block write racing a copy-up of the same block ends as one order or the other."""
    lower_data = b"L" * DISK

    def slow_lower(offset: int, length: int) -> bytes:
        time.sleep(0.002)
        return lower_data[offset : offset + length]

    with WritableLayer(tmp_path / "w", DISK) as layer:
        for block in range(20):
            base = block * BS
            partial = threading.Thread(target=layer.write, args=(base + 10, b"p" * 5, slow_lower))
            whole = threading.Thread(target=layer.write, args=(base, b"W" * BS, no_lower))
            partial.start()
            whole.start()
            partial.join()
            whole.join()
            got = layer.read(base, BS)
            a_then_p = b"W" * 10 + b"p" * 5 + b"W" * (BS - 15)
            assert got in (a_then_p, b"W" * BS), f"block {block}: lost the whole-block write"


# -- a real ext4 -----------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("mke2fs") is None or shutil.which("debugfs") is None, reason="no e2fsprogs")
def test_real_ext4_through_the_layer(tmp_path):
    """debugfs's changes to an ext4, replayed into the layer as unaligned byte writes over the pristine
    disk as lower, give back the same disk: e2fsck is clean and the file is there."""
    size = 16 << 20
    pristine = tmp_path / "lower.img"
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-O", "^has_journal", str(pristine), "16M"],
        check=True,
    )
    lower = pristine.read_bytes()
    assert len(lower) == size
    scratch = tmp_path / "scratch.img"
    shutil.copyfile(pristine, scratch)
    payload = tmp_path / "hello.txt"
    payload.write_bytes(b"hello from the writable layer\n" * 500)
    subprocess.run(
        ["debugfs", "-w", "-R", f"write {payload} /hello", str(scratch)], check=True, capture_output=True
    )
    target = scratch.read_bytes()

    def read_lower(offset: int, length: int) -> bytes:
        return lower[offset : offset + length]

    changed = 0
    with WritableLayer(tmp_path / "w", size) as layer:
        for block in range(size // BS):
            old, new = lower[block * BS : (block + 1) * BS], target[block * BS : (block + 1) * BS]
            if old != new:
                # Only the changed byte span: most blocks need a copy-up of the rest.
                first = next(i for i in range(BS) if old[i] != new[i])
                last = next(i for i in reversed(range(BS)) if old[i] != new[i])
                layer.write(block * BS + first, new[first : last + 1], read_lower)
                changed += 1
    assert changed > 0
    merged = tmp_path / "merged.img"
    with WritableLayer(tmp_path / "w", size) as layer, open(merged, "wb") as out:
        assert layer.written_bytes() == changed * BS
        for start, length, written in layer.runs(0, size):
            out.write(layer.read(start, length) if written else lower[start : start + length])
    assert merged.read_bytes() == target
    fsck_clean(merged)
    cat = subprocess.run(["debugfs", "-R", "cat /hello", str(merged)], check=True, capture_output=True)
    assert cat.stdout == payload.read_bytes()
