"""The working disk: a sparse file holding a fresh ext4 file system that is identical for the same seed.

Reproducibility is the point: a layer chain converted on any machine, any day, must give the same bytes,
so that a converted layer can be reused by every image sharing its chain. Everything mke2fs would pick
at random or from the clock is pinned:
- the file system UUID and the directory hash seed are derived from `seed`;
- the clock is E2FSPROGS_FAKE_TIME (mkfs/write times, the root and lost+found inodes);
- the feature set and geometry come from our own mke2fs profile (MKE2FS_CONFIG), not /etc/mke2fs.conf,
  so that a distribution's defaults (orphan_file, metadata_csum_seed, inode size...) cannot leak in.

Features: Debian 12's ext4 defaults minus the journal (nothing replays a journal on a read-mostly
image; `has_journal` would add 64+ MiB of blocks to layer 0). metadata_csum stays: its checksums are a
pure function of the UUID and the bytes, so they are reproducible, and e2fsck/the kernel verify them.
orphan_file is left out (kernels before 5.15 refuse it, and it is not needed without a journal).
lazy_itable_init keeps the inode tables unwritten, so a 64 GiB disk starts at ~4.7 MB of data; a
writable mount should use `-o noinit_itable` or the kernel will zero those tables in the background.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import uuid
from pathlib import Path

from dadi.errors import DadiError

# 2020-01-01T00:00:00Z: stamped wherever mke2fs or debugfs would write "now".
FIXED_TIME = 1577836800
BLOCK_SIZE = 4096

FEATURES = (
    "sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr,"
    "extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize"
)

_PROFILE = f"""[defaults]
	base_features = {FEATURES}
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = {BLOCK_SIZE}
	inode_size = 256
	inode_ratio = 16384
	reserved_ratio = 0
	lazy_itable_init = 1
	hash_alg = half_md4

[fs_types]
	ext4 = {{
		features = {FEATURES}
	}}
"""


def e2fs_env(time: int = FIXED_TIME) -> dict[str, str]:
    """Environment for e2fsprogs tools that pins the time they stamp."""
    return {"E2FSPROGS_FAKE_TIME": str(time), "TZ": "UTC", "LC_ALL": "C"}


def derived_uuid(seed: bytes, purpose: str) -> uuid.UUID:
    """A version-4-shaped UUID that is a pure function of the seed (different per purpose)."""
    digest = hashlib.sha256(purpose.encode() + b"\0" + seed).digest()[:16]
    return uuid.UUID(bytes=digest, version=4)


def create_disk(path: Path, *, disk_size: int, seed: bytes) -> None:
    """Create (or replace) a sparse file of `disk_size` bytes holding an empty, reproducible ext4."""
    if disk_size % BLOCK_SIZE or disk_size < 16 * 1024 * 1024:
        raise DadiError(f"disk size {disk_size} must be a multiple of {BLOCK_SIZE} and at least 16 MiB")
    path = Path(path)
    if path.exists():
        path.unlink()
    with open(path, "wb") as f:
        f.truncate(disk_size)
    fs_uuid = derived_uuid(seed, "fs-uuid")
    hash_seed = derived_uuid(seed, "dir-hash-seed")
    with tempfile.TemporaryDirectory(prefix="dadi-mke2fs-") as tmp:
        profile = Path(tmp) / "mke2fs.conf"
        profile.write_text(_PROFILE)
        env = {**os.environ, **e2fs_env(), "MKE2FS_CONFIG": str(profile)}
        argv = [
            "mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK_SIZE), "-m", "0",
            "-U", str(fs_uuid),
            "-E", f"hash_seed={hash_seed},root_owner=0:0,lazy_itable_init=1,nodiscard",
            str(path), str(disk_size // BLOCK_SIZE),
        ]
        result = subprocess.run(argv, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        path.unlink(missing_ok=True)
        raise DadiError(f"mke2fs {path} failed ({result.returncode}): {result.stderr.strip()}")
