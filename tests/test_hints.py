"""Read hints (format version 2): a mount fetches the metadata first, a miss fetches its small file whole.

Unit tests build real blobs with BlobWriter and check LayerHints' chunk arithmetic and its refusal of
hints that disagree with the extents. The end-to-end tests convert the busybox image with the real
converter (mke2fs, debugfs, e2image) and mount it with the real daemon, FUSE, loop device and ext4: what a
user notices is that lookups and stat, and the rest of a file once it was opened, need no network.
"""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import dadi_cli
from mounthelpers import mount, stats

from dadi.format.blob import BlobWriter, read_blob_tables
from dadi.node.hints import HintPolicy, LayerHints

BLOCK = 4096
CHUNK = 8192  # two blocks per chunk: a file of n blocks spans about n/2 chunks


def tables_with(metadata, files, extents=((0, 64),)):
    writer = BlobWriter(io.BytesIO(), disk_size=1 << 20, chunk_size=CHUNK, hints=True)
    for block, count in extents:
        writer.add_data(block, os.urandom(count * BLOCK))
    return writer.finish(metadata=metadata, files=files).tables


def test_metadata_and_small_files_map_to_their_chunks():
    tables = tables_with([(0, 3)], [[(4, 4)], [(8, 1)], [(10, 30)]])
    hints = LayerHints(tables, HintPolicy(whole_file_max=16 * BLOCK, big_file_window=4 * CHUNK, neighbour_window=0))
    assert hints.problem == "" and hints.metadata_chunks == [0, 1]
    assert hints.companions([2]) == [3]  # blocks 4-7: chunks 2-3, the whole file with its first miss
    assert hints.companions([4]) == []  # block 8 alone in chunk 4
    # blocks 10-39 (chunks 5-19) are a big file: the 4 chunks after the miss come along, not the file
    assert hints.companions([6]) == [7, 8, 9, 10]
    assert hints.companions([18]) == [19]  # the window ends with the file


def test_a_small_files_miss_brings_the_small_files_after_it_on_the_disk():
    # four small files of 2 blocks (one chunk each: chunks 8, 9, 10, 11), a big one, one more small one
    tables = tables_with([], [[(22, 2)], [(16, 2)], [(18, 2)], [(20, 2)], [(24, 30)], [(60, 2)]])
    hints = LayerHints(tables, HintPolicy(whole_file_max=16 * BLOCK, big_file_window=4 * CHUNK,
                                          neighbour_window=2 * 2 * BLOCK))
    assert hints.companions([8]) == [9, 10]  # disk order, not the tables' order; 2 files' worth
    assert hints.companions([10]) == [11, 30]  # the big file in between is not a neighbour
    assert hints.companions([30]) == []  # nothing after the last file
    assert hints.companions([15]) == [16, 17, 18, 19]  # a miss in the big file: its window, no neighbours
    assert LayerHints(tables, HintPolicy(neighbour_window=0)).companions([8]) == []


def test_metadata_runs_are_adjacent_chunks_cut_at_the_request_size():
    tables = tables_with([(0, 8), (20, 2)], [])  # chunks 0-3 and 10, filled across no gap (6 apart)
    hints = LayerHints(tables)
    assert hints.metadata_chunks == [0, 1, 2, 3, 10]
    stored = tables.chunks[0].length  # random bytes: every chunk stores about CHUNK bytes
    assert hints.metadata_runs(1 << 20) == [[0, 1, 2, 3], [10]]
    assert hints.metadata_runs(2 * stored + 64) == [[0, 1], [2, 3], [10]]
    assert hints.metadata_runs(1) == [[0], [1], [2], [3], [10]]  # a chunk above the cap goes alone


def test_metadata_chunks_close_together_are_fetched_with_the_gap_between():
    tables = tables_with([(0, 1), (6, 2), (30, 2)], [])  # chunks 0, 3 and 15
    assert LayerHints(tables).metadata_chunks == [0, 1, 2, 3, 15]  # 2 requests, not 3


def test_hints_follow_the_packed_stream_not_the_disk():
    tables = tables_with([(100, 2)], [[(200, 2)]], extents=((100, 2), (200, 2)))
    hints = LayerHints(tables)
    assert hints.metadata_chunks == [0] and hints.companions([1]) == []  # blocks 200-201 are chunk 1


@pytest.mark.parametrize(("metadata", "files", "problem"), [
    ([(70, 2)], [], "blocks 70-71 are not in any extent"),
    ([], [[(60, 10)]], "blocks 64-69 are not in any extent"),
])
def test_hints_that_disagree_with_the_extents_are_ignored(metadata, files, problem, caplog):
    hints = LayerHints(tables_with(metadata, files), name="layer x")
    assert problem in hints.problem
    assert not hints.usable and hints.metadata_chunks == [] and hints.companions([0]) == []
    assert "read hints disagree with the extents and are ignored" in caplog.text


def test_a_zero_extent_is_no_place_for_a_hint():
    writer = BlobWriter(io.BytesIO(), disk_size=1 << 20, chunk_size=CHUNK, hints=True)
    writer.add_data(0, os.urandom(4 * BLOCK))
    writer.add_zero(4, 4)
    hints = LayerHints(writer.finish(files=[[(2, 4)]]).tables)
    assert "are a zero extent" in hints.problem


# --- end to end ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dadi_busybox(busybox_image, tmp_path_factory):
    layout, tag = busybox_image
    out = tmp_path_factory.mktemp("dadi-busybox-hints")
    dadi_cli("convert", f"oci:{layout}:{tag}", f"oci:{out}:dadi", "--cache-dir", str(out / "cache"), "-q")
    return out


def layer_tables(layout: Path):
    import json

    index = json.loads((layout / "index.json").read_text())
    blob = lambda d: layout / "blobs" / "sha256" / d.split(":")[1]  # noqa: E731
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
    out = []
    for layer in manifest["layers"]:
        with open(blob(layer["digest"]), "rb") as f:
            out.append(read_blob_tables(f))
    return out


def test_the_converter_writes_metadata_and_file_hints(dadi_busybox):
    tables = layer_tables(dadi_busybox)
    assert all(t.version == 2 and t.hints_problem == "" for t in tables)
    assert sum(len(t.metadata) for t in tables) > 0 and sum(len(t.files) for t in tables) > 0
    for t in tables:
        assert LayerHints(t).problem == ""  # every range lies in the layer's own data extents


@pytest.mark.needs_root
def test_after_the_mount_lookups_and_stat_need_no_network(dadi_busybox, node, tmp_path):
    mnt = tmp_path / "mnt"
    mount(f"oci:{dadi_busybox}:dadi", mnt, node, "--no-prefetch")
    for _ in range(300):  # the metadata comes beside the mount and the first reads: let it land
        mounted = stats(mnt, node)
        if mounted["metadata_state"] != "fetching":
            break
        time.sleep(0.1)
    assert mounted["metadata_state"] == "done"
    assert mounted["bytes_metadata"] > 0 and mounted["hints_ignored"] == 0
    listing = subprocess.run(["ls", "-laR", str(mnt)], capture_output=True, text=True, check=True).stdout
    assert "busybox" in listing
    walked = stats(mnt, node)
    assert walked["bytes_on_demand"] == mounted["bytes_on_demand"], "a lookup or stat fetched a block"
    assert walked["read_errors"] == 0


@pytest.mark.needs_root
@pytest.mark.parametrize("whole_file_max", ["4MiB", "0"])
def test_the_first_miss_in_a_small_file_fetches_the_file(dadi_busybox, node, tmp_path, whole_file_max):
    node.mkdir(parents=True, exist_ok=True)
    (node / "daemon.toml").write_text(f'whole_file_max = "{whole_file_max}"\n')
    mnt = tmp_path / "mnt"
    mount(f"oci:{dadi_busybox}:dadi", mnt, node, "--no-prefetch", "--read-ahead", "128KiB")
    with open(mnt / "bin" / "busybox", "rb") as f:  # ~2 MiB: one 4 KiB read in its middle (its start
        f.seek(1 << 20)  # shares a chunk with metadata, which the mount fetched)
        f.read(BLOCK)
    first = stats(mnt, node)
    for _ in range(100):  # the rest of the file comes beside the read: let it land
        time.sleep(0.1)
        settled, first = first, stats(mnt, node)
        if settled["bytes_on_demand"] == first["bytes_on_demand"]:
            break
    data = (mnt / "bin" / "busybox").read_bytes()
    assert data == Path("/bin/busybox").read_bytes()
    rest = stats(mnt, node)
    if whole_file_max == "0":  # no file comes whole: only a window after the miss came with it
        assert 0 < rest["bytes_on_demand"] - first["bytes_on_demand"], "nothing was left to read on demand"
    else:
        assert first["bytes_companions"] > 0
        assert rest["bytes_on_demand"] == first["bytes_on_demand"], "the rest of the file was fetched again"
