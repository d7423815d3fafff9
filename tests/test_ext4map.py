"""dadi.convert.ext4map: the read hints, checked against e2fsprogs' own view of a real ext4 image.

The image is made by the real mke2fs (-d populates it from a directory); debugfs says which blocks each
file and directory holds. What a node relies on: every file's hint is exactly its data blocks, and
directories and inode tables are metadata, so a mount that fetched the metadata finds lookups local.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from pathlib import Path

import pytest

from dadi.convert.ext4map import clip, file_extents, layer_hints, metadata_ranges
from dadi.convert.workdisk import FEATURES

pytestmark = pytest.mark.skipif(not os.path.exists("/sbin/mke2fs") and not os.path.exists("/usr/sbin/mke2fs"),
                                reason="needs e2fsprogs")


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True,
                          check=True).stdout


def blocks_of(image: Path, path: str) -> set[int]:
    return {int(b) for b in debugfs(image, f"blocks {path}").split()}


def expand(ranges) -> set[int]:
    return {block for start, count in ranges for block in range(start, start + count)}


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[Path, list[str]]:
    top = tmp_path_factory.mktemp("tree")
    rng = random.Random(7)
    names = []
    for d in range(6):
        (top / f"pkg{d}").mkdir()
        for f in range(40):
            size = rng.choice([0, 100, 5000, 70_000, 300_000])
            name = f"pkg{d}/mod{f}.py"
            (top / name).write_bytes(rng.randbytes(size))
            names.append(name)
    (top / "big.bin").write_bytes(rng.randbytes(20 << 20))  # more extents than fit in the inode
    names.append("big.bin")
    os.symlink("pkg0/mod1.py", top / "link")
    disk = tmp_path_factory.mktemp("disk") / "disk.img"
    subprocess.run(["truncate", "-s", "4G", str(disk)], check=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-O", FEATURES, "-d", str(top), str(disk)],
                   check=True, env={**os.environ, "PATH": "/usr/sbin:/sbin:" + os.environ["PATH"]})
    return disk, names


def test_each_file_hint_is_exactly_the_blocks_debugfs_lists(image):
    disk, names = image
    hinted = sorted((expand(ranges) for ranges in file_extents(disk)), key=min)
    expected = sorted((b for b in (blocks_of(disk, "/" + name) for name in names) if b), key=min)
    assert hinted == expected  # empty files hold no block and get no hint


def test_metadata_holds_directories_and_inode_tables_and_no_file_data(image):
    disk, names = image
    metadata = expand(metadata_ranges(disk))
    for directory in ["/", "/pkg0", "/pkg5"]:
        assert blocks_of(disk, directory) <= metadata, directory
    stat = debugfs(disk, "imap /pkg3/mod7.py")  # "located at block N, offset ..."
    inode_block = int(stat.split("located at block")[1].split(",")[0])
    assert inode_block in metadata
    data = set().union(*(expand(r) for r in file_extents(disk)))
    assert not metadata & data
    assert len(metadata) * 4096 < 2 << 20  # metadata is small next to the 44 MiB of file data
    groups = subprocess.run(["dumpe2fs", str(disk)], capture_output=True, text=True, check=True).stdout
    unread = [int(n) for n in re.findall(r"(?:Block bitmap|Inode bitmap|Reserved GDT blocks) at (\d+)", groups)]
    assert len(unread) > 3  # only allocation and online resizing read these
    assert not metadata & set(unread)


def test_layer_hints_keep_only_the_blocks_the_layer_stores(image):
    disk, _ = image
    files = file_extents(disk)
    big = max(files, key=lambda r: sum(c for _, c in r))
    start = big[0][0]
    runs = [(start, 10, False), (start + 10, 5, True)]  # 10 stored blocks, 5 zero blocks (no data)
    metadata, hinted = layer_hints(disk, runs)
    assert metadata == []
    assert hinted == [[(start, 10)]]


def test_clip():
    assert clip([(0, 10), (20, 5)], [(5, 20)]) == [(5, 5), (20, 5)]
    assert clip([(0, 4)], [(4, 4)]) == []
    assert clip([(3, 1), (4, 1)], [(0, 100)]) == [(3, 2)]
