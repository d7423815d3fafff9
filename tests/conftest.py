"""Shared fixtures: real test images (built once per session), a real docker-registry, loop mounts."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Built images survive between runs here (debootstrap takes minutes); `make clean` removes it.
IMAGE_CACHE = REPO / ".cache" / "test-images"
# The `node` fixture (a daemon root, always cleaned up) for every test file that mounts.
pytest_plugins = ["mounthelpers"]


def pytest_collection_modifyitems(config, items):
    # Everything here needs root for loop mounts / umoci unpack; say so instead of failing obscurely.
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root (loop mounts, umoci unpack as root)")
        for item in items:
            if "needs_root" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory):
    from images import build_busybox_image

    return build_busybox_image(tmp_path_factory.mktemp("busybox"))


@pytest.fixture(scope="session")
def busybox_rootfs(busybox_image, tmp_path_factory):
    """`umoci unpack` of the busybox test image: what every mount of it must show."""
    from images import umoci_unpack

    layout, tag = busybox_image
    return umoci_unpack(layout, tag, tmp_path_factory.mktemp("busybox-umoci") / "bundle")


@pytest.fixture(scope="session")
def debian_image(tmp_path_factory):
    from images import build_debian_image

    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    return build_debian_image(tmp_path_factory.mktemp("debian"), IMAGE_CACHE)


@pytest.fixture
def registry(tmp_path):
    from registry_server import RegistryServer

    with RegistryServer(tmp_path / "registry") as server:
        yield server


@contextlib.contextmanager
def loop_mounted(disk: Path, mountpoint: Path, *, readonly: bool = True):
    """Mount an ext4 disk file through a loop device; always unmounted (and the loop freed) after."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    opts = "loop,ro" if readonly else "loop"
    subprocess.run(["mount", "-t", "ext4", "-o", opts, str(disk), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


def pseudo_random(seed: object, size: int) -> bytes:
    """Incompressible, reproducible bytes that differ at every offset: sha256 in counter mode
    (random.Random's bytes may change across Python versions, and golden tests must not)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def fsck_clean(disk: Path) -> str:
    """Run `e2fsck -fn`; returns its output, raising AssertionError if it found anything."""
    result = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert result.returncode == 0, f"e2fsck -fn {disk} exit {result.returncode}:\n{result.stdout}{result.stderr}"
    return result.stdout


def poll(what: str, check, timeout: float = 60.0, interval: float = 0.1):
    """check()'s first true value; fails the test, naming `what`, when none comes within `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def dadi_cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `dadi` command as a user would."""
    exe = shutil.which("dadi", path=str(REPO / ".venv" / "bin")) or "dadi"
    result = subprocess.run([exe, *args], capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"dadi {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result
