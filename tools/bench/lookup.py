"""Benchmark of the merged index: batched block lookups per second, native and pure-Python twins.

Builds a realistic stack (by default 5 layers x 20,000 extents on a 64 GiB disk of 4 KiB blocks), then
times `MergedIndex.lookup_blocks` on batches of block numbers in two patterns (random blocks, mostly
mapped ones; and runs of 16 consecutive blocks as 64 KiB reads make) and `MergedIndex.lookup` on 128 KiB
byte ranges. Reports medians of several runs. `--write` replaces the "## Merged index lookups" section
of docs/BENCHMARKS.md (and only that section).

    .venv/bin/python tools/bench/lookup.py [--layers 5] [--extents 20000] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import random
import statistics
import sys
import time
from array import array
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import BENCHMARKS, machine, write_section  # noqa: E402

from dadi.format.model import BLOCK_SIZE, DEFAULT_DISK_SIZE, Extent  # noqa: E402

INDEX_PATH = REPO / "dadi" / "format" / "index.py"
SECTION = "Merged index lookups"


def load_twin(choice: str) -> ModuleType:
    """An instance of dadi/format/index.py imported with DADI_NATIVE=choice."""
    saved = os.environ.get("DADI_NATIVE")
    os.environ["DADI_NATIVE"] = choice
    try:
        name = f"dadi_bench_index_{choice}"
        spec = importlib.util.spec_from_file_location(name, INDEX_PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        if saved is None:
            os.environ.pop("DADI_NATIVE", None)
        else:
            os.environ["DADI_NATIVE"] = saved


def make_stack(rng: random.Random, layers: int, extents: int, disk_blocks: int) -> list[list[Extent]]:
    """Layers of scattered extents, sizes skewed small as file writes make them, ~5% zero extents."""
    stack = []
    mean_gap = disk_blocks // extents
    for _ in range(layers):
        table: list[Extent] = []
        block = rng.randrange(mean_gap)
        packed = 0
        for _ in range(extents):
            count = min(int(rng.expovariate(1 / 24)) + 1, 1024)
            if block + count > disk_blocks:
                break
            if rng.random() < 0.05:
                table.append(Extent(block, count, 0, zero=True))
            else:
                table.append(Extent(block, count, packed))
                packed += count * BLOCK_SIZE
            block += count + rng.randrange(2 * mean_gap - 2 * 24)
        stack.append(table)
    return stack


def make_queries(rng: random.Random, stack: list[list[Extent]], disk_blocks: int, n: int) -> dict[str, array]:
    """Block batches: 'random' (90% inside some extent, 10% anywhere) and 'runs' (16 consecutive blocks
    from a random mapped start, the blocks of one 64 KiB read)."""
    flat = [extent for table in stack for extent in table]
    random_blocks = array("Q")
    for _ in range(n):
        if rng.random() < 0.9:
            extent = flat[rng.randrange(len(flat))]
            random_blocks.append(extent.block + rng.randrange(extent.count))
        else:
            random_blocks.append(rng.randrange(disk_blocks))
    runs = array("Q")
    while len(runs) < n:
        start = min(flat[rng.randrange(len(flat))].block, disk_blocks - 16)
        runs.extend(range(start, start + 16))
    return {"random": random_blocks, "runs": runs[:n]}


def median_rate(function, items: int, repeats: int) -> float:
    """Median of `repeats` timings of function(), as items per second."""
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return items / statistics.median(timings)


def run(layers: int, extents: int, batch: int, python_batch: int, repeats: int) -> tuple[list[str], dict]:
    rng = random.Random(20240601)
    disk_blocks = DEFAULT_DISK_SIZE // BLOCK_SIZE
    stack = make_stack(rng, layers, extents, disk_blocks)
    queries = make_queries(rng, stack, disk_blocks, batch)
    twins = {"python": load_twin("0")}
    try:
        twins["native"] = load_twin("1")
    except ImportError as error:
        print(f"native twin unavailable: {error}", file=sys.stderr)

    rows: list[str] = []
    figures: dict = {}
    ranges = [
        (rng.randrange(disk_blocks - 32) * BLOCK_SIZE + rng.randrange(BLOCK_SIZE), 128 << 10)
        for _ in range(2000)
    ]
    for name, twin in twins.items():
        started = time.perf_counter()
        index = twin.MergedIndex(stack, disk_size=DEFAULT_DISK_SIZE)
        build = time.perf_counter() - started
        figures[(name, "build")] = build
        n = batch if name == "native" else python_batch
        for pattern, blocks in queries.items():
            blocks = blocks[:n]
            out = twin.BlockLocations(array("q", bytes(8 * n)), array("q", bytes(8 * n)))
            rate = median_rate(
                lambda index=index, blocks=blocks, out=out: index.lookup_blocks(blocks, out), n, repeats
            )
            figures[(name, pattern)] = rate
            rows.append(f"| {name} | lookup_blocks, {pattern} | {n:,} | {rate / 1e6:.2f} M/s |")
        rate = median_rate(
            lambda index=index: [index.lookup(o, length) for o, length in ranges], len(ranges), repeats
        )
        figures[(name, "ranges")] = rate
        rows.append(f"| {name} | lookup, 128 KiB byte ranges | {len(ranges):,} | {rate / 1e3:.1f} k/s |")
        segments = index.segments
    check_twins_agree(twins, stack, queries, python_batch)
    header = [
        f"Stack: {layers} layers x {extents:,} extents on a {DEFAULT_DISK_SIZE >> 30} GiB disk of "
        f"{BLOCK_SIZE} B blocks -> {segments:,} merged segments; build took "
        + ", ".join(f"{figures[(name, 'build')]:.2f} s ({name})" for name in twins)
        + f". Medians of {repeats} runs, one thread.",
        "",
        "| backend | operation | batch | rate |",
        "|---|---|---|---|",
    ]
    return header + rows, figures


def check_twins_agree(twins: dict[str, ModuleType], stack, queries: dict[str, array], n: int) -> None:
    """A benchmark of wrong answers is worthless: both twins must map the benchmarked blocks alike."""
    answers = []
    for twin in twins.values():
        index = twin.MergedIndex(stack, disk_size=DEFAULT_DISK_SIZE)
        answers.append([tuple(map(list, index.lookup_blocks(blocks[:n]))) for blocks in queries.values()])
    if any(answer != answers[0] for answer in answers):
        raise SystemExit("the native and python twins disagree on the benchmark stack")


def write_lookup_section(lines: list[str]) -> None:
    today = datetime.date.today().isoformat()
    body = f"Measured {today} by `tools/bench/lookup.py` on {machine()}.\n\n" + "\n".join(lines)
    write_section(SECTION, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--extents", type=int, default=20_000, help="extents per layer")
    parser.add_argument("--batch", type=int, default=1_000_000, help="blocks per batch (native)")
    parser.add_argument("--python-batch", type=int, default=100_000, help="blocks per batch (python)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--write", action="store_true", help=f"update {BENCHMARKS.relative_to(REPO)}")
    args = parser.parse_args()
    lines, _ = run(args.layers, args.extents, args.batch, args.python_batch, args.repeats)
    print("\n".join(lines))
    if args.write:
        write_lookup_section(lines)
        print(f"wrote section {SECTION!r} of {BENCHMARKS}")


if __name__ == "__main__":
    main()
