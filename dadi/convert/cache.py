"""The converter's local cache: dadi blobs and namespace state keyed by layer chain.

Layout under the cache dir:
    blobs/sha256/<hex>     converted layer blobs
    chains/<key>.json      what converting that chain produced (blob digest, sizes, tables digest)
    chains/<key>.tree      the TreeModel after that chain, so a longer chain can continue from it
The key hashes the chain id together with every parameter that changes the output (format version,
chunk size, disk size, applier version), so a cached entry is only reused for identical output.
Writes are atomic (temp file + rename); a crash leaves at most stray temp files, never a torn entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from dadi.digests import digest_hex


@dataclass(frozen=True)
class ChainEntry:
    chain_id: str
    diff_id: str
    blob_digest: str
    blob_size: int
    tables_digest: str
    tables_size: int


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dadi" / "convert"


class ConvertCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.blob_dir = self.root / "blobs" / "sha256"
        self.chain_dir = self.root / "chains"
        self.work_dir = self.root / "work"
        for d in (self.blob_dir, self.chain_dir, self.work_dir):
            d.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(chain_id: str, params: str) -> str:
        return hashlib.sha256(f"{params}\n{chain_id}".encode()).hexdigest()

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / digest_hex(digest)

    def lookup(self, key: str) -> ChainEntry | None:
        meta = self.chain_dir / f"{key}.json"
        try:
            entry = ChainEntry(**json.loads(meta.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None
        blob = self.blob_path(entry.blob_digest)
        if not blob.is_file() or blob.stat().st_size != entry.blob_size:
            return None  # blob pruned or damaged: convert again
        if not (self.chain_dir / f"{key}.tree").is_file():
            return None
        return entry

    def load_tree(self, key: str) -> bytes:
        return (self.chain_dir / f"{key}.tree").read_bytes()

    def new_blob_file(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self.blob_dir, prefix=".tmp-")
        os.close(fd)
        return Path(name)

    def store(self, key: str, entry: ChainEntry, blob_tmp: Path, tree: bytes) -> None:
        os.replace(blob_tmp, self.blob_path(entry.blob_digest))
        _atomic_write(self.chain_dir / f"{key}.tree", tree)
        # The .json goes last: its presence is what makes the entry visible.
        _atomic_write(self.chain_dir / f"{key}.json", json.dumps(asdict(entry), sort_keys=True).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
