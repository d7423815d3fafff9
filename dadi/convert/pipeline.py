"""dadi convert: an OCI image in, a dadi image out.

For each layer, in order: apply its tar to a working ext4 disk in user space, find the blocks that
changed, and pack exactly those into a dadi layer blob. Layer chains converted before are taken from
the local cache (no download, no work); blobs the target has already are not uploaded; the manifest is
written last, so a failed conversion leaves no image behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dadi.convert.apply import LayerContents, apply_contents, read_layer
from dadi.convert.blockdiff import BlockHashes, changed_extents, hash_disk
from dadi.convert.cache import ChainEntry, ConvertCache
from dadi.convert.ext4map import HINTS_VERSION, layer_hints
from dadi.convert.spool import Spool, memory_budget
from dadi.convert.tree import TreeModel
from dadi.convert.workdisk import create_disk
from dadi.digests import VerifyingReader, chain_ids, sha256_digest
from dadi.errors import ImageError
from dadi.format.blob import DEFAULT_CHUNK_SIZE, FORMAT_VERSION, BlobWriter, read_blob_tables
from dadi.format.flatten import flatten
from dadi.format.model import BLOCK_SIZE, DEFAULT_DISK_SIZE
from dadi.image import mediatypes as mt
from dadi.image.base import ImageSource, ImageTarget
from dadi.image.compression import open_decompressed
from dadi.image.manifest import Descriptor, dump_json
from dadi.progress import ByteCounter, CountingReader, Progress, human_bytes
from dadi.readahead import read_ahead

# Bump when the applier's output for the same input changes: it invalidates cached chains.
APPLIER_VERSION = 1
_READ_SLICE = 4 << 20


@dataclass(frozen=True)
class ConvertOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    disk_size: int = DEFAULT_DISK_SIZE
    cache_dir: Path | None = None

    def cache_params(self) -> str:
        return (
            f"dadi-convert format={FORMAT_VERSION} applier={APPLIER_VERSION} hints={HINTS_VERSION} "
            f"chunk={self.chunk_size} disk={self.disk_size} block={BLOCK_SIZE}"
        )


@dataclass
class LayerReport:
    index: int
    source_digest: str
    source_size: int
    diff_id: str
    chain_id: str
    digest: str
    size: int
    tables_digest: str
    tables_size: int
    reused: bool
    upload: str = ""
    seconds: float = 0.0


@dataclass
class ConvertReport:
    source: str
    target: str
    manifest_digest: str = ""
    config_digest: str = ""
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        src = sum(layer.source_size for layer in self.layers)
        out = sum(layer.size for layer in self.layers)
        return {
            "source": self.source,
            "target": self.target,
            "manifest_digest": self.manifest_digest,
            "config_digest": self.config_digest,
            "layers": [asdict(layer) for layer in self.layers],
            "source_bytes": src,
            "dadi_bytes": out,
            "size_ratio": round(out / src, 4) if src else None,
            "layers_reused": sum(layer.reused for layer in self.layers),
            "seconds": round(self.seconds, 3),
        }


class _WorkingDisk:
    """The ext4 disk at some layer of the chain, its namespace model and its block hashes."""

    def __init__(self, path: Path, level: int, tree: TreeModel, hashes: BlockHashes):
        self.path = path
        self.level = level  # how many layers have been applied
        self.tree = tree
        self.hashes = hashes


def convert_image(
    source: ImageSource,
    target: ImageTarget,
    options: ConvertOptions,
    cache: ConvertCache,
    progress: Progress,
) -> ConvertReport:
    started = time.monotonic()
    report = ConvertReport(source.description, target.description)
    manifest = source.get_manifest()
    config = source.get_config(manifest)
    diff_ids = config.diff_ids
    where = source.description
    if len(diff_ids) != len(manifest.layers):
        raise ImageError(f"{where}: {len(manifest.layers)} layers but {len(diff_ids)} diff_ids in the config")
    for i, desc in enumerate(manifest.layers):
        if desc.media_type == mt.DADI_LAYER:
            raise ImageError(f"{where}: layer {i} is a dadi layer already: the image is converted")
        if desc.media_type not in mt.LAYER_COMPRESSION:
            raise ImageError(f"{where}: layer {i} ({desc.digest}) has unknown media type {desc.media_type!r}")
    chains = chain_ids(diff_ids)
    params = options.cache_params()
    keys = [cache.key(chain, params) for chain in chains]

    work_root = Path(tempfile.mkdtemp(prefix="convert-", dir=cache.work_dir))
    to_convert = [i for i in range(len(manifest.layers)) if cache.lookup(keys[i]) is None]
    reader = _LayerPrefetcher(source, manifest.layers, diff_ids, to_convert, work_root)
    # Compresses and hashes blob chunks (lz4 and hashlib release the GIL).
    packer = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="chunk-packer")
    try:
        disk: _WorkingDisk | None = None
        for i, desc in enumerate(manifest.layers):
            label = f"layer {i + 1}/{len(manifest.layers)} {desc.digest[7:19]}"
            layer_started = time.monotonic()
            entry = cache.lookup(keys[i])
            reused = entry is not None
            if entry is None:
                if disk is None or disk.level != i:
                    disk = _prepare_disk(work_root, i, keys, chains, cache, options, progress)
                entry = _convert_layer(reader, packer, i, diff_ids[i], chains[i], keys[i], disk, cache, options,
                                       progress, label)
            else:
                progress.note(f"{label}: converted before (chain {chains[i][7:19]}), reusing {entry.blob_digest[7:19]}")
            report.layers.append(
                LayerReport(
                    index=i,
                    source_digest=desc.digest,
                    source_size=desc.size,
                    diff_id=diff_ids[i],
                    chain_id=chains[i],
                    digest=entry.blob_digest,
                    size=entry.blob_size,
                    tables_digest=entry.tables_digest,
                    tables_size=entry.tables_size,
                    reused=reused,
                    seconds=round(time.monotonic() - layer_started, 3),
                )
            )
    finally:
        reader.close()
        packer.shutdown(wait=True)
        shutil.rmtree(work_root, ignore_errors=True)

    _push(report, config.obj, options, cache, target, progress)
    report.seconds = time.monotonic() - started
    return report


def _prepare_disk(work_root, level, keys, chains, cache, options, progress) -> _WorkingDisk:
    """A working disk holding layers [0, level): fresh for level 0, else rebuilt from cached blobs."""
    path = work_root / "disk.img"
    if path.exists():
        path.unlink()
    if level == 0:
        # Layer 0's blob holds everything mke2fs wrote: the diff is taken against an all-zero disk.
        return _WorkingDisk(path, 0, TreeModel.empty(), BlockHashes.empty())
    progress.start(f"rebuilding the working disk from {level} cached layers")
    files = []
    try:
        layers = []
        for key in keys[:level]:
            entry = cache.lookup(key)
            if entry is None:
                raise ImageError(f"cache entry for chain {key} vanished during conversion")
            f = open(cache.blob_path(entry.blob_digest), "rb")
            files.append(f)
            layers.append((read_blob_tables(f), f))
        flatten(path, layers, progress=progress)
    finally:
        for f in files:
            f.close()
    progress.done("done")
    tree = TreeModel.from_bytes(cache.load_tree(keys[level - 1]))
    return _WorkingDisk(path, level, tree, hash_disk(path))


# Layers read ahead of the one being applied: each holds its spooled files until it is applied.
_READ_AHEAD_LAYERS = 2


class _LayerPrefetcher:
    """Reads (downloads, decompresses, verifies, spools) the layers to convert, one ahead of the applier.

    Reading a layer needs no disk state, so the next layer's tar is read in a worker thread while
    debugfs applies the current one and its blocks are diffed and packed: two cores, two stages.
    """

    def __init__(self, source: ImageSource, layers, diff_ids, to_convert: list[int], work_root: Path):
        self._source = source
        self._layers = layers
        self._diff_ids = diff_ids
        self._order = to_convert
        self._work_root = work_root
        self._budget = memory_budget() // (1 + _READ_AHEAD_LAYERS)  # spools that exist at once
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-reader")
        self._pending: dict[int, tuple[Future, ByteCounter]] = {}

    def _submit(self, i: int) -> None:
        if i not in self._pending:
            counter = ByteCounter()
            self._pending[i] = (self._pool.submit(self._read, i, counter), counter)

    def _read(self, i: int, counter: ByteCounter) -> LayerContents:
        desc = self._layers[i]
        what = f"{self._source.description}: layer {desc.digest}"
        spool = Spool(self._work_root / f"spool-{i}", self._budget)
        try:
            with self._source.open_blob(desc, what) as compressed:
                counted = CountingReader(compressed, counter)
                tar = open_decompressed(counted, mt.LAYER_COMPRESSION[desc.media_type], f"layer {desc.digest}")
                verified = VerifyingReader(tar, self._diff_ids[i], None, f"layer {desc.digest} (uncompressed, diff_id)")
                # Inflating and hashing in one thread, parsing the tar and spooling in this one.
                with read_ahead(verified, f"inflate-layer-{i}") as tar:
                    contents = read_layer(tar, layer=f"{i} ({desc.digest})", spool=spool)
                    # A tar reader stops at the end-of-archive marker; reading on checks both digests.
                    while tar.read(1 << 20):
                        pass
            contents.stats.source_bytes = counter.count
            return contents
        except BaseException:
            spool.close()
            raise

    def take(self, i: int, progress: Progress) -> LayerContents:
        """Layer i's contents (the caller closes its spool); starts reading the layers after it."""
        self._submit(i)
        for j in [j for j in self._order if j > i][:_READ_AHEAD_LAYERS]:
            self._submit(j)
        future, counter = self._pending[i]
        while True:
            try:
                contents = future.result(timeout=0.2)
                break
            except FutureTimeout:
                progress.advance_to(counter.count)
        del self._pending[i]
        progress.advance_to(counter.count)
        return contents

    def close(self) -> None:
        """Stop reading ahead and remove whatever was spooled and not taken."""
        for future, _ in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        for future, _ in self._pending.values():
            if not future.cancelled() and future.exception() is None:
                future.result().spool.close()
        self._pending.clear()


def _convert_layer(reader: _LayerPrefetcher, packer: Executor, i, diff_id, chain_id, key, disk: _WorkingDisk,
                   cache, options, progress, label) -> ChainEntry:
    if i == 0:
        seed = f"{options.cache_params()}\n{chain_id}".encode()
        create_disk(disk.path, disk_size=options.disk_size, seed=seed)
    progress.start(f"{label}")
    contents = reader.take(i, progress)
    read = f"{human_bytes(contents.stats.source_bytes)} in {contents.stats.read_seconds:.2f} s"
    try:
        stats = apply_contents(disk.path, disk.tree, contents, cmdfile=disk.path.with_name("debugfs.cmds"))
    finally:
        contents.spool.close()

    runs, new_hashes = changed_extents(disk.path, disk.hashes)
    metadata, files = layer_hints(disk.path, runs)
    blob_tmp = cache.new_blob_file()
    try:
        info = _write_blob(disk.path, runs, blob_tmp, options, packer, (metadata, files))
        entry = ChainEntry(chain_id, diff_id, info.digest, info.size, info.tables_digest, info.tables_size)
        cache.store(key, entry, blob_tmp, disk.tree.to_bytes())
    finally:
        if blob_tmp.exists():
            blob_tmp.unlink()
    disk.level = i + 1
    disk.hashes = new_hashes
    changed = sum(count for _, count, zero in runs if not zero) * BLOCK_SIZE
    progress.done(
        f"read {read}, {stats.entries} entries, {human_bytes(changed)} of changed blocks "
        f"-> {human_bytes(info.size)} blob {info.digest[7:19]}"
    )
    return entry


def _write_blob(disk_path: Path, runs, out_path: Path, options: ConvertOptions, executor: Executor, hints):
    with open(out_path, "wb") as out, open(disk_path, "rb") as disk:
        writer = BlobWriter(out, disk_size=options.disk_size, chunk_size=options.chunk_size, executor=executor,
                            hints=True)
        for block, count, zero in runs:
            if zero:
                writer.add_zero(block, count)
                continue
            done = 0
            while done < count:
                n = min(count - done, _READ_SLICE // BLOCK_SIZE)
                data = os.pread(disk.fileno(), n * BLOCK_SIZE, (block + done) * BLOCK_SIZE)
                if len(data) != n * BLOCK_SIZE:
                    raise ImageError(f"working disk {disk_path} is shorter than its file system")
                writer.add_data(block + done, data)
                done += n
        info = writer.finish(*hints)
        out.flush()
        os.fsync(out.fileno())
    return info


def dadi_config(source_config: dict, layers: list[LayerReport]) -> bytes:
    config = json.loads(json.dumps(source_config))
    config["rootfs"] = {"type": "layers", "diff_ids": [layer.digest for layer in layers]}
    return dump_json(config)


def dadi_manifest(config_raw: bytes, layers: list[LayerReport], options: ConvertOptions) -> bytes:
    layer_descs = [
        Descriptor(
            mt.DADI_LAYER,
            layer.digest,
            layer.size,
            {
                mt.ANN_TABLES_DIGEST: layer.tables_digest,
                mt.ANN_TABLES_SIZE: str(layer.tables_size),
                mt.ANN_SOURCE_DIFF_ID: layer.diff_id,
                mt.ANN_CHAIN_ID: layer.chain_id,
                mt.ANN_DISK_SIZE: str(options.disk_size),
                mt.ANN_FORMAT_VERSION: str(FORMAT_VERSION),
            },
        ).to_json()
        for layer in layers
    ]
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": Descriptor(mt.OCI_CONFIG, sha256_digest(config_raw), len(config_raw)).to_json(),
        "layers": layer_descs,
        "annotations": {mt.ANN_IMAGE: str(FORMAT_VERSION)},
    }
    return dump_json(manifest)


def _push(report: ConvertReport, source_config: dict, options, cache: ConvertCache, target: ImageTarget,
          progress: Progress) -> None:
    for layer in report.layers:
        progress.start(f"push layer {layer.index + 1}/{len(report.layers)} {layer.digest[7:19]}")
        if target.has_blob(layer.digest):
            layer.upload = "exists"
        else:
            layer.upload = target.put_blob(layer.digest, layer.size, path=cache.blob_path(layer.digest))
        progress.done(f"{layer.upload} ({human_bytes(layer.size)})")
    config_raw = dadi_config(source_config, report.layers)
    report.config_digest = sha256_digest(config_raw)
    target.put_blob(report.config_digest, len(config_raw), data=config_raw)
    manifest_raw = dadi_manifest(config_raw, report.layers, options)
    report.manifest_digest = sha256_digest(manifest_raw)
    where = target.put_manifest(manifest_raw, mt.OCI_MANIFEST)
    progress.note(f"image written: {where}")

