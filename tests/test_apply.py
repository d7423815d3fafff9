"""The user-space layer applier and block diff, on a real ext4 disk made by mke2fs and read back by the kernel."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest
from conftest import fsck_clean, loop_mounted
from imagebuilder import TarBuilder

from dadi.convert.apply import apply_layer
from dadi.convert.blockdiff import BlockHashes, changed_extents, data_regions, hash_disk
from dadi.convert.spool import Spool
from dadi.convert.tree import TreeModel
from dadi.convert.workdisk import create_disk
from dadi.errors import DadiError, LayerError
from dadi.readahead import read_ahead

DISK_SIZE = 64 << 20


@pytest.fixture
def disk(tmp_path) -> Path:
    path = tmp_path / "disk.img"
    create_disk(path, disk_size=DISK_SIZE, seed=b"test")
    return path


def apply(disk: Path, tree: TreeModel, tar: bytes, tmp_path: Path, layer: str = "L"):
    return apply_layer(disk, tree, io.BytesIO(tar), layer=layer, workdir=tmp_path / f"spool-{layer}")


def test_the_same_seed_gives_the_same_disk_and_another_seed_does_not(tmp_path):
    paths = []
    for name, seed in (("a", b"x"), ("b", b"x"), ("c", b"y")):
        paths.append(tmp_path / name)
        create_disk(paths[-1], disk_size=DISK_SIZE, seed=seed)
    a, b, c = (hash_disk(p).by_block for p in paths)
    assert a == b
    assert a != c
    fsck_clean(paths[0])


def test_create_disk_refuses_a_size_that_is_not_whole_blocks(tmp_path):
    with pytest.raises(DadiError, match="multiple of 4096"):
        create_disk(tmp_path / "d", disk_size=DISK_SIZE + 1, seed=b"x")


@pytest.mark.needs_root
def test_awkward_names_arrive_intact(disk, tmp_path):
    names = ["with space", 'dou"ble"quote', "-leading-dash", "semi;colon", "tab\there", "ünïcødé", "$HOME"]
    tar = TarBuilder()
    for name in names:
        tar.file(f"d/{name}", name.encode())
    tar.file(os.fsdecode(b"d/latin1-\xe9"), b"raw bytes")
    tree = TreeModel.empty()
    apply(disk, tree, tar.build(), tmp_path)
    fsck_clean(disk)
    with loop_mounted(disk, tmp_path / "mnt") as mnt:
        for name in names:
            assert (mnt / "d" / name).read_bytes() == name.encode()
        assert (mnt / "d" / os.fsdecode(b"latin1-\xe9")).read_bytes() == b"raw bytes"


def test_a_name_with_a_newline_is_refused_naming_the_entry(disk, tmp_path):
    with pytest.raises(LayerError, match=r"layer L, entry 'bad\\nname'.*LF"):
        apply(disk, TreeModel.empty(), TarBuilder().file("bad\nname", b"x").build(), tmp_path)


def test_writing_through_a_symlink_is_refused(disk, tmp_path):
    tree = TreeModel.empty()
    apply(disk, tree, TarBuilder().dir("etc").symlink("link", "/etc").build(), tmp_path, "0")
    with pytest.raises(LayerError, match=r"layer 1, entry 'link/passwd': refused: parent 'link' is a symlink"):
        apply(disk, tree, TarBuilder().file("link/passwd", b"owned").build(), tmp_path, "1")


def test_a_hard_link_through_a_symlink_is_refused(disk, tmp_path):
    tree = TreeModel.empty()
    apply(disk, tree, TarBuilder().file("etc/shadow", b"secret").symlink("link", "etc").build(), tmp_path, "0")
    with pytest.raises(LayerError, match=r"entry 'grab'.*passes through symlink 'link'"):
        apply(disk, tree, TarBuilder().hardlink("grab", "link/shadow").build(), tmp_path, "1")


def test_a_hard_link_to_nothing_is_refused(disk, tmp_path):
    with pytest.raises(LayerError, match=r"entry 'a': hard link to missing file 'nowhere'"):
        apply(disk, TreeModel.empty(), TarBuilder().hardlink("a", "nowhere").build(), tmp_path)


def test_a_symlink_is_stored_not_followed(disk, tmp_path):
    # An absolute symlink target names a path of the image, never of the converting machine.
    tree = TreeModel.empty()
    apply(disk, tree, TarBuilder().symlink("escape", "/root").symlink("up", "../../..").build(), tmp_path)
    fsck_clean(disk)
    assert tree.kind("escape") == "l" and tree.kind("up") == "l"
    for name, target in (("escape", "/root"), ("up", "../../..")):
        shown = subprocess.run(["debugfs", "-R", f"stat /{name}", str(disk)], capture_output=True, text=True).stdout
        assert f'Fast link dest: "{target}"' in shown, shown


def test_the_tree_model_survives_a_round_trip_and_matches_the_layer(disk, tmp_path):
    tree = TreeModel.empty()
    tar = TarBuilder().file("a/b/c", b"1").hardlink("a/link", "a/b/c").symlink("s", "a").fifo("p").build()
    apply(disk, tree, tar, tmp_path)
    again = TreeModel.from_bytes(tree.to_bytes())
    assert again == tree
    assert again.kind("a/b") == "d" and again.kind("p") == "p"
    assert again.get("a/link")[1] == again.get("a/b/c")[1]  # one inode, two names
    with pytest.raises(DadiError, match="tree model is corrupt"):
        TreeModel.from_bytes(b"\x93garbage")


# -- block diff ---------------------------------------------------------------------------------------


def test_data_regions_skip_holes(tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(16 << 20)
        f.seek(4096 * 10)
        f.write(b"x" * 4096 * 2)
        f.seek(8 << 20)
        f.write(b"y")
    with open(path, "rb") as f:
        regions = data_regions(f.fileno(), 16 << 20)
    covered = [(o // 4096, (o + n) // 4096) for o, n in regions]
    # The file system may round regions out, but never misses data or reports the whole file.
    assert any(a <= 10 and b >= 12 for a, b in covered)
    assert any(a <= 2048 < b for a, b in covered)
    assert sum(n for _, n in regions) < 4 << 20


def test_changed_extents_finds_new_changed_and_zeroed_blocks(tmp_path):
    path = tmp_path / "disk"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
        for block in (1, 2, 3, 7):
            f.seek(block * 4096)
            f.write(bytes([block]) * 4096)
    before = hash_disk(path)
    assert sorted(before.by_block) == [1, 2, 3, 7]
    runs, _ = changed_extents(path, BlockHashes.empty())
    assert runs == [(1, 3, False), (7, 1, False)]
    with open(path, "r+b") as f:
        f.seek(2 * 4096)
        f.write(b"changed".ljust(4096, b"\0"))  # changed
        f.seek(3 * 4096)
        f.write(bytes(4096))  # zeroed: a zero extent, not data
        f.seek(4 * 4096)
        f.write(bytes(4096))  # zeros where there was a hole: no change at all
        f.seek(9 * 4096)
        f.write(b"new" * 1000)  # new
    runs, after = changed_extents(path, before)
    assert runs == [(2, 1, False), (3, 1, True), (9, 1, False)]
    assert changed_extents(path, after)[0] == []


def test_applying_a_layer_changes_only_the_blocks_it_touches(disk, tmp_path):
    tree = TreeModel.empty()
    apply(disk, tree, TarBuilder().file("big", os.urandom(1 << 20)).file("small", b"s").build(), tmp_path, "0")
    base = hash_disk(disk)
    apply(disk, tree, TarBuilder().file("small", b"changed").build(), tmp_path, "1")
    runs, _ = changed_extents(disk, base)
    changed_blocks = sum(count for _, count, _ in runs)
    # The 1 MiB file is untouched: a few blocks of metadata and one of data changed, not 256.
    assert 0 < changed_blocks < 32, runs


# -- spool and read-ahead -------------------------------------------------------------------------------


def test_spool_puts_files_in_memory_until_the_budget_is_used_then_on_disk(tmp_path):
    with Spool(tmp_path / "disk", memory_budget=3 * 4096) as spool:
        assert spool.memory_dir is not None and spool.memory_dir.is_relative_to("/dev/shm")
        small = [spool.new_path(100) for _ in range(3)]  # a page each
        big = spool.new_path(10)
        for path in [*small, big]:
            Path(path).write_bytes(b"x")
        assert all(Path(p).parent == spool.memory_dir for p in small)
        assert Path(big).parent == tmp_path / "disk"
        memory_dir = spool.memory_dir
    assert not memory_dir.exists() and not (tmp_path / "disk").exists()


def test_read_ahead_passes_bytes_through_and_raises_the_producers_error():
    data = os.urandom(5 << 20)
    with read_ahead(io.BytesIO(data)) as stream:
        assert stream.read() == data

    class Failing(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, buffer):
            raise DadiError("the source broke")

    with read_ahead(Failing()) as stream, pytest.raises(DadiError, match="the source broke"):
        stream.read(10)
