"""The node benchmark's image: Debian bookworm minbase with python3 and numpy, plus an application layer.

Layer 1 is the debootstrapped rootfs (`umoci insert`), layer 2 the application: /app/start.py, which
imports numpy, computes a little and prints one line (it reads a small part of the image: the python
interpreter, the stdlib modules it imports, numpy and the BLAS/LAPACK libraries), and /app/big.bin,
incompressible pseudo-random bytes that the start never reads (the data an image carries for later).

Both the debootstrap tarball and the finished OCI layout are cached under .cache/bench-images, keyed
by everything that shapes them, so a rerun of the benchmark builds nothing. Needs root.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from images import DEBIAN_MIRROR, DEBIAN_MTIME, _extract, _set_mtimes  # noqa: E402

CACHE = REPO / ".cache" / "bench-images"
SUITE = "bookworm"
INCLUDE = ("python3", "python3-numpy")
BIG_BYTES = 200 * 1024 * 1024
BIG_SEED = 20260101
TAG = "app"
CREATED = "2023-06-10T00:00:00Z"

START_PY = '''\
"""The benchmark app's start: the first things a numpy service does, and nothing of /app/big.bin."""
import sys
import time

import numpy as np

t0 = time.perf_counter()
rng = np.random.default_rng(1)
a = rng.standard_normal((300, 300))
x = np.linalg.solve(a, a @ np.ones(300))
print(f"app started: python {sys.version.split()[0]}, numpy {np.__version__}, "
      f"residual {float(np.abs(x - 1).max()):.1e}, {1000 * (time.perf_counter() - t0):.0f} ms of math")
'''
START_COMMAND = ["/usr/bin/python3", "/app/start.py"]


def _run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def _rootfs_tarball(workdir: Path) -> Path:
    """debootstrap --variant=minbase SUITE --include=INCLUDE, as a tarball; built once."""
    tarball = CACHE / f"debian-{SUITE}-minbase-{_key(SUITE, INCLUDE, DEBIAN_MIRROR)}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    target = workdir / "debootstrap-rootfs"
    shutil.rmtree(target, ignore_errors=True)
    print(f"debootstrap {SUITE} minbase + {','.join(INCLUDE)} (once; cached in {CACHE})", flush=True)
    _run("debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE, target, DEBIAN_MIRROR)
    shutil.rmtree(target / "var/cache/apt/archives", ignore_errors=True)
    (target / "var/cache/apt/archives/partial").mkdir(parents=True)
    shutil.rmtree(target / "var/lib/apt/lists", ignore_errors=True)
    (target / "var/lib/apt/lists/partial").mkdir(parents=True)
    partial = tarball.with_suffix(".partial")
    _run("tar", "--create", "--file", partial, "--numeric-owner", "--xattrs", "--xattrs-include=*",
         "--sort=name", "--directory", target, ".")
    partial.rename(tarball)  # never a truncated cache after a crash
    shutil.rmtree(target)
    return tarball


def _write_big(path: Path) -> None:
    rng = random.Random(BIG_SEED)
    with path.open("wb") as f:
        for _ in range(BIG_BYTES // (8 << 20)):
            f.write(rng.randbytes(8 << 20))
        f.write(rng.randbytes(BIG_BYTES % (8 << 20)))


def build_bench_image(workdir: Path) -> tuple[Path, str]:
    """The benchmark image as an OCI layout (gzip layers); (layout dir, tag). Cached across runs."""
    workdir = Path(workdir)
    tarball = _rootfs_tarball(workdir)
    layout = CACHE / f"app-oci-{_key(tarball.name, START_PY, BIG_BYTES, BIG_SEED)}"
    if (layout / "index.json").exists():
        return layout, TAG
    print(f"building the OCI image (once; cached at {layout})", flush=True)
    partial = layout.with_name(layout.name + ".partial")
    scratch = workdir / "image-scratch"
    for path in (partial, scratch):
        shutil.rmtree(path, ignore_errors=True)
    image = f"{partial}:{TAG}"
    created = ("--history.created", CREATED)
    rootfs = scratch / "rootfs"
    _extract(tarball, rootfs)
    _run("umoci", "init", "--layout", partial)
    _run("umoci", "new", "--image", image)
    _run("umoci", "config", "--image", image, "--created", CREATED, "--no-history",
         "--config.env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
         "--config.workingdir", "/app", *(f"--config.cmd={arg}" for arg in START_COMMAND))
    _run("umoci", "insert", "--image", image, *created, "--history.comment",
         f"debootstrap {SUITE} minbase + {' '.join(INCLUDE)}", rootfs, "/")
    app = scratch / "app"
    app.mkdir()
    (app / "start.py").write_text(START_PY)
    _write_big(app / "big.bin")
    os.chmod(app, 0o755)
    _set_mtimes(DEBIAN_MTIME, app / "start.py", app / "big.bin", app)
    _run("umoci", "insert", "--image", image, *created, "--history.comment", "app", app, "/app")
    _run("umoci", "gc", "--layout", partial)
    shutil.rmtree(scratch)
    partial.rename(layout)
    return layout, TAG


def layout_bytes(layout: Path) -> int:
    return sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-image-") as tmp:
        built, tag = build_bench_image(Path(tmp))
        print(f"oci:{built}:{tag}, {layout_bytes(built) / 1e6:.1f} MB of blobs")
