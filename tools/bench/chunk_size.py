"""Measure what the layer blob's chunk size costs and buys, on a real ext4 image built from this machine's files.

For each chunk size it writes a real blob (dadi.format.blob.BlobWriter) from the image's used blocks and
measures: the compression ratio, lz4 decompression throughput, the read amplification of random 4 KiB reads
(bytes of chunks fetched per byte read), the read amplification of reading random whole files, and the
size of the tables. Times are medians of several runs; random samples are medians over several seeds.

    .venv/bin/python tools/bench/chunk_size.py [--source DIR ...] [--runs N] [--write]
"""

from __future__ import annotations

import argparse
import bisect
import io
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lz4.block

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import write_section  # noqa: E402

from dadi.format.blob import BlobWriter, parse_tables, read_blob_tables, tables_offset  # noqa: E402
from dadi.format.model import BLOCK_SIZE, DEFAULT_DISK_SIZE, LayerTables  # noqa: E402

KiB = 1024
CHUNK_SIZES = [16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB]
# A mix a container image holds: executables, Python's stdlib and packages, perl modules, text docs.
DEFAULT_SOURCES = ["/usr/bin", "/usr/lib/python3", "/usr/lib/python3.11", "/usr/share/perl", "/usr/share/doc"]
SECTION = "Chunk size"


@dataclass
class Image:
    path: Path
    used_runs: list[tuple[int, int]]  # (first block, count) of used, not all-zero blocks, in disk order
    files: list[tuple[str, list[int]]]  # sampled regular files: (path in the image, its data blocks)
    staged_bytes: int


def stage(sources: list[str], staging: Path) -> int:
    """Hard-link (or copy, across devices) the source trees under one directory for mke2fs -d."""
    total = 0
    for source in sources:
        target = staging / source.strip("/").replace("/", "_")
        result = subprocess.run(["cp", "-al", source, str(target)], capture_output=True)
        if result.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            subprocess.run(["cp", "-a", source, str(target)], check=True)
    for root, _dirs, names in os.walk(staging):
        for name in names:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                total += os.path.getsize(path)
    return total


def parse_free_blocks(dumpe2fs_output: str, block_count: int) -> list[tuple[int, int]]:
    """The used block runs: the complement of the per-group 'Free blocks:' lists of dumpe2fs."""
    free: list[tuple[int, int]] = []
    for line in dumpe2fs_output.splitlines():
        match = re.match(r"^\s+Free blocks: (.*)$", line)
        if not match or not match.group(1).strip():
            continue
        for item in match.group(1).split(","):
            first, _, last = item.strip().partition("-")
            free.append((int(first), int(last or first)))
    free.sort()
    used, position = [], 0
    for first, last in free:
        if first > position:
            used.append((position, first - position))
        position = max(position, last + 1)
    if position < block_count:
        used.append((position, block_count - position))
    return used


def drop_zero_blocks(image: Path, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Used blocks that are all zeros become zero extents in a blob, not data; leave them out."""
    zero_block = bytes(BLOCK_SIZE)
    data_runs: list[tuple[int, int]] = []
    with open(image, "rb") as f:
        for first, count in runs:
            f.seek(first * BLOCK_SIZE)
            data = f.read(count * BLOCK_SIZE)
            for i in range(count):
                if data[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] == zero_block:
                    continue
                block = first + i
                if data_runs and data_runs[-1][0] + data_runs[-1][1] == block:
                    data_runs[-1] = (data_runs[-1][0], data_runs[-1][1] + 1)
                else:
                    data_runs.append((block, 1))
    return data_runs


def sample_files(image: Path, staging: Path, count: int, seed: int) -> list[tuple[str, list[int]]]:
    """A random sample of regular files with their data blocks, through one debugfs batch."""
    paths = []
    for root, _dirs, names in os.walk(staging):
        for name in names:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) > 0:
                paths.append("/" + os.path.relpath(path, staging))
    paths = [p for p in paths if not any(c in p for c in ' "\n\\')]  # keep debugfs quoting out of it
    random.Random(seed).shuffle(paths)
    paths = paths[:count]
    commands = "".join(f"blocks {p}\n" for p in paths)
    with tempfile.NamedTemporaryFile("w", suffix=".cmd") as cmd:
        cmd.write(commands)
        cmd.flush()
        out = subprocess.run(["debugfs", "-f", cmd.name, str(image)], capture_output=True, text=True).stdout
    files, current = [], None
    for line in out.splitlines():
        if line.startswith("debugfs: blocks "):
            current = line[len("debugfs: blocks ") :]
        elif current is not None:
            blocks = [int(b) for b in line.split()]
            if blocks:
                files.append((current, blocks))
            current = None
    return files


def build_image(sources: list[str], workdir: Path, file_sample: int) -> Image:
    staging = workdir / "staging"
    staging.mkdir()
    staged_bytes = stage(sources, staging)
    path = workdir / "disk.img"
    size_mb = int(staged_bytes * 1.4 / 2**20) + 256
    env = dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000")
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK_SIZE), "-O", "^has_journal",
         "-U", "5d1a1f5e-0000-4000-8000-000000000001", "-E", "hash_seed=5d1a1f5e-0000-4000-8000-000000000002",
         "-d", str(staging), str(path), f"{size_mb}M"],
        check=True, env=env,
    )  # fmt: skip
    dump = subprocess.run(["dumpe2fs", str(path)], capture_output=True, text=True, check=True).stdout
    block_count = int(re.search(r"^Block count:\s+(\d+)", dump, re.M).group(1))
    used = drop_zero_blocks(path, parse_free_blocks(dump, block_count))
    files = sample_files(path, staging, file_sample, seed=1)
    shutil.rmtree(staging)
    return Image(path, used, files, staged_bytes)


class PackedMap:
    """Disk block -> packed-stream block index, for the used runs packed in disk order."""

    def __init__(self, runs: list[tuple[int, int]]):
        self.starts = [first for first, _ in runs]
        self.runs = runs
        self.base = []
        total = 0
        for _, count in runs:
            self.base.append(total)
            total += count
        self.blocks = total

    def packed_index(self, block: int) -> int | None:
        i = bisect.bisect_right(self.starts, block) - 1
        if i < 0 or block >= self.runs[i][0] + self.runs[i][1]:
            return None  # a zero block, or not used: costs no fetch
        return self.base[i] + block - self.runs[i][0]


def write_blob(image: Image, chunk_size: int) -> tuple[bytes, LayerTables, int, float]:
    out = io.BytesIO()
    start = time.perf_counter()
    writer = BlobWriter(out, disk_size=DEFAULT_DISK_SIZE, chunk_size=chunk_size)
    with open(image.path, "rb") as f:
        for first, count in image.used_runs:
            f.seek(first * BLOCK_SIZE)
            # 4 MiB at a time: the writer streams, and so does this.
            for piece in range(0, count, 1024):
                n = min(1024, count - piece)
                writer.add_data(first + piece, f.read(n * BLOCK_SIZE))
    info = writer.finish()
    seconds = time.perf_counter() - start
    blob = out.getvalue()
    assert read_blob_tables(io.BytesIO(blob)) == info.tables
    return blob, info.tables, info.tables_size, seconds


def decompress_seconds(blob: bytes, tables: LayerTables) -> float:
    view = memoryview(blob)
    start = time.perf_counter()
    for chunk in tables.chunks:
        stored = view[chunk.offset : chunk.offset + chunk.length]
        if chunk.compressed:
            lz4.block.decompress(stored, uncompressed_size=chunk.raw_length)
        else:
            bytes(stored)
    return time.perf_counter() - start


def timed(function, *args, **kwargs) -> float:
    start = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - start


def random_read_amplification(tables: LayerTables, packed_blocks: int, reads: int, seed: int) -> float:
    """Bytes of stored chunks fetched per byte read, for random 4 KiB reads of data blocks (cold cache)."""
    rng = random.Random(seed)
    fetched = 0
    for _ in range(reads):
        chunk = tables.chunks[tables.chunk_of(rng.randrange(packed_blocks) * BLOCK_SIZE)]
        fetched += chunk.length
    return fetched / (reads * BLOCK_SIZE)


# A cold-start fetch model: each range request costs a round trip, then the bytes cost bandwidth.
REQUEST_SECONDS = 0.001  # 1 ms per request: a registry or supernode in the same data centre
LINK_BYTES_PER_SECOND = 1e9 / 8  # 1 Gbit/s


def file_reads(tables: LayerTables, packed: PackedMap, files, sample: int, seed: int) -> tuple[float, float]:
    """Reading whole random files into a cold cache: (stored bytes fetched per byte read, modelled seconds).

    Files are read one after another; the chunks a file needs that are not cached yet are fetched with one
    range request per run of adjacent chunks (the read path coalesces adjacent misses).
    """
    rng = random.Random(seed)
    fetched_chunks: set[int] = set()
    read_bytes = fetched_bytes = requests = 0
    for _path, blocks in rng.sample(files, min(sample, len(files))):
        read_bytes += len(blocks) * BLOCK_SIZE
        needed = set()
        for block in blocks:
            index = packed.packed_index(block)
            if index is not None:
                needed.add(tables.chunk_of(index * BLOCK_SIZE))
        needed -= fetched_chunks
        fetched_chunks |= needed
        fetched_bytes += sum(tables.chunks[i].length for i in needed)
        requests += sum(1 for i in needed if i - 1 not in needed)
    seconds = requests * REQUEST_SECONDS + fetched_bytes / LINK_BYTES_PER_SECOND
    return fetched_bytes / max(read_bytes, 1), seconds


def measure(image: Image, runs: int) -> list[dict]:
    packed = PackedMap(image.used_runs)
    rows = []
    for chunk_size in CHUNK_SIZES:
        blob, tables, tables_size, write_seconds = write_blob(image, chunk_size)
        stored = sum(c.length for c in tables.chunks)
        start = tables_offset(len(blob), tables_size)
        encoded = blob[start : start + tables_size]
        parse = statistics.median(timed(parse_tables, encoded, blob_size=len(blob)) for _ in range(runs))
        decomp = statistics.median(decompress_seconds(blob, tables) for _ in range(runs))
        amp4k = statistics.median(
            random_read_amplification(tables, packed.blocks, 20000, seed) for seed in range(runs)
        )
        file_results = [file_reads(tables, packed, image.files, 200, seed) for seed in range(runs)]
        amp_files = statistics.median(amp for amp, _ in file_results)
        model_seconds = statistics.median(seconds for _, seconds in file_results)
        gib = tables.packed_size / 2**30
        rows.append(
            {
                "chunk": f"{chunk_size // KiB} KiB",
                "chunks": len(tables.chunks),
                "stored/raw": f"{stored / tables.packed_size:.3f}",
                "lz4 MB/s": f"{tables.packed_size / decomp / 1e6:.0f}",
                "write MB/s": f"{tables.packed_size / write_seconds / 1e6:.0f}",
                "amp 4K": f"{amp4k:.1f}",
                "amp files": f"{amp_files:.2f}",
                "files model ms": f"{model_seconds * 1000:.0f}",
                "tables KiB/GiB": f"{tables_size / KiB / gib:.0f}",
                "parse ms/GiB": f"{parse * 1000 / gib:.0f}",
            }
        )
        print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()), file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict], image: Image, command: str, runs: int) -> str:
    packed_bytes = sum(count for _, count in image.used_runs) * BLOCK_SIZE
    lines = [
        f"Command: `{command}`",
        "",
        f"ext4 image (4 KiB blocks, no journal) of {image.staged_bytes / 1e6:.0f} MB of files; packed stream "
        f"{packed_bytes / 1e6:.0f} MB of used, non-zero blocks. Machine: {os.cpu_count()} cores. "
        f"Times are medians of {runs} runs, amplifications medians over {runs} random seeds.",
        "",
        "- stored/raw: bytes in the blob's chunk data per byte of packed stream (lower is better);",
        "- lz4 MB/s: decompressing every chunk, MB of raw output per second (one core);",
        "- write MB/s: BlobWriter throughput (lz4 + xxh3 + sha256 per chunk, one core);",
        "- amp 4K: stored bytes fetched per byte read, uniform random 4 KiB reads, cold cache;",
        "- amp files: the same for reading 200 random whole files (as a starting program does); below 1",
        "  where compression saves more than the chunk's unread neighbours cost;",
        "- files model ms: fetching those 200 files cold at 1 ms per range request (adjacent chunk misses",
        "  coalesced into one request) and 1 Gbit/s;",
        "- tables KiB/GiB: msgpack tables per GiB of packed stream (fetched before a mount);",
        "- parse ms/GiB: parse_tables with all its checks, per GiB of packed stream.",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
    ]
    lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", action="append", help="directory to put into the image (repeatable)")
    parser.add_argument("--runs", type=int, default=5, help="runs per timing / seeds per sample")
    parser.add_argument("--write", action="store_true", help="replace the 'Chunk size' section of docs/BENCHMARKS.md")
    args = parser.parse_args()
    sources = args.source or DEFAULT_SOURCES
    command = "python tools/bench/chunk_size.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="dadi-bench-") as tmp:
        image = build_image(sources, Path(tmp), file_sample=2000)
        rows = measure(image, args.runs)
        table = markdown(rows, image, command.strip(), args.runs)
    print(table)
    if args.write:
        write_section(SECTION, table)


if __name__ == "__main__":
    main()
