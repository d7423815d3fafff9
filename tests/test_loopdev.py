"""Attaching and detaching loop devices with the kernel's ioctls (dadi/node/loopdev.py): real loop devices."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from dadi.errors import DadiError
from dadi.node import loopdev

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/loop-control"), reason="needs loop devices")


def _sysfs(loop: str, item: str) -> str:
    return Path(f"/sys/block/{Path(loop).name}/{item}").read_text().strip()


@pytest.fixture
def attached():
    """Loop devices a test attached; detached afterwards, even when it fails."""
    devices: list[str] = []
    yield devices
    for loop in devices:
        loopdev.detach(loop)


def _disk(path: Path, fill: bytes) -> Path:
    path.write_bytes(fill * (1 << 20))
    return path


def test_an_attached_device_reads_the_file_with_the_settings_asked_for(tmp_path, attached):
    disk = _disk(tmp_path / "disk", b"d")
    loop = loopdev.attach(disk, read_only=True)
    attached.append(loop)
    assert loopdev.backing_file(loop) == str(disk)
    assert _sysfs(loop, "ro") == "1"
    assert _sysfs(loop, "queue/logical_block_size") == "4096"
    assert loopdev.direct_io(loop)
    with open(loop, "rb") as device:
        assert device.read(4096) == b"d" * 4096
    with pytest.raises(OSError), open(loop, "r+b", buffering=0) as device:  # read-only: the kernel refuses
        device.write(b"x" * 4096)
    assert disk.read_bytes() == b"d" * (1 << 20)

    writable = loopdev.attach(_disk(tmp_path / "rw", b"w"), read_only=False, direct_io=False, sector_size=512)
    attached.append(writable)
    assert (_sysfs(writable, "ro"), _sysfs(writable, "queue/logical_block_size")) == ("0", "512")
    assert not loopdev.direct_io(writable)
    with open(writable, "r+b") as device:
        device.write(b"x" * 512)
    assert (tmp_path / "rw").read_bytes()[:513] == b"x" * 512 + b"w"


def _attach_in_process(disk: str) -> str:
    return loopdev.attach(disk, read_only=True)


def test_processes_attaching_at_once_each_get_a_device_of_their_own(tmp_path, attached):
    # `losetup --find` in 8 processes at once: two pick the same free device, and the loser sleeps 200 ms
    # before it looks again. attach asks for another at once; every process must still end up with its file.
    disks = [str(_disk(tmp_path / f"disk{i}", bytes([65 + i]))) for i in range(8)]
    with multiprocessing.get_context("fork").Pool(len(disks)) as pool:
        loops = pool.map(_attach_in_process, disks)
    attached.extend(loops)
    assert len(set(loops)) == len(disks)
    assert [loopdev.backing_file(loop) for loop in loops] == disks


def test_detaching_frees_the_device_and_a_second_detach_is_harmless(tmp_path, attached):
    loop = loopdev.attach(_disk(tmp_path / "disk", b"d"), read_only=True)
    loopdev.detach(loop)
    assert loopdev.backing_file(loop) is None
    loopdev.detach(loop)


def test_a_file_that_cannot_be_opened_is_named_in_the_error(tmp_path):
    with pytest.raises(DadiError, match=r"attaching .*missing to a loop device: cannot open it"):
        loopdev.attach(tmp_path / "missing", read_only=True)
