#!/usr/bin/env python3
"""Replays a recorded start against read-hint policies: how many reads would wait, how many bytes come.

A trace (`dadi mount --record-trace`) lists the chunks a container read, in the order it first read
them. This walks that list against the image's own read hints (dadi.node.hints.LayerHints, the code
the daemon runs) for a grid of `whole_file_max` x `neighbour_window`: the metadata chunks are local
first (as a mount fetches them), and each listed chunk that is not local yet is one wait, after which
it and its companions are local. It models no time and no concurrency (a companion landing after the
next read asked for it counts as local), so it gives the lower bound on waits of each policy and the
bytes it costs; tools/bench/mount.py then measures the chosen one on the machine.

    .venv/bin/python tools/bench/hints_replay.py LAYOUT_DIR TRACE [--write]

LAYOUT_DIR is an OCI layout holding the dadi image's blobs, TRACE the JSON `--record-trace` wrote:
`dadi convert` the bench image (tools/bench/benchimage.py) to oci:LAYOUT_DIR:app, then `dadi mount
oci:LAYOUT_DIR:app MNT --no-prefetch --record-trace TRACE`, run the app chrooted in MNT, `dadi umount MNT`.
`--write` replaces the "## Read hints: a start replayed" section of docs/BENCHMARKS.md. Not part of
`make bench`, which has no trace to give it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, write_section  # noqa: E402

from dadi.format.blob import read_blob_tables  # noqa: E402
from dadi.node.hints import HintPolicy, LayerHints  # noqa: E402

SECTION = "Read hints: a start replayed"
MiB = 1 << 20
WHOLE_FILE_MAX = (0, 2 * MiB)
NEIGHBOUR_WINDOWS = (0, MiB // 4, MiB, 2 * MiB, 4 * MiB)


def replay(tables_by_layer: list, order: list[tuple[int, int]], policy: HintPolicy) -> tuple[int, int]:
    """(waits, stored bytes fetched) of the start `order` under `policy`."""
    waits = fetched = 0
    for position, tables in enumerate(tables_by_layer):
        hints = LayerHints(tables, policy)
        local = set(hints.metadata_chunks)
        fetched += sum(tables.chunks[i].length for i in local)
        for layer, chunk in order:
            if layer != position or chunk in local:
                continue
            waits += 1
            came = {chunk, *hints.companions([chunk])} - local
            fetched += sum(tables.chunks[i].length for i in came)
            local |= came
    return waits, fetched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("layout", type=Path, help="OCI layout directory with the dadi image's blobs")
    parser.add_argument("trace", type=Path, help="the trace `dadi mount --record-trace` wrote")
    parser.add_argument("--write", action="store_true", help=f"write the '{SECTION}' section of docs/BENCHMARKS.md")
    args = parser.parse_args()
    trace = json.loads(args.trace.read_bytes())
    tables_by_layer = []
    for digest in trace["layers"]:
        blob = args.layout / "blobs" / "sha256" / digest.split(":", 1)[1]
        with blob.open("rb") as f:
            tables_by_layer.append(read_blob_tables(f, blob.stat().st_size))
    order = [(layer, chunk) for layer, chunk in trace["chunks"]]
    total = sum(c.length for t in tables_by_layer for c in t.chunks)
    rows = []
    for whole in WHOLE_FILE_MAX:
        for window in NEIGHBOUR_WINDOWS:
            if whole == 0 and window:
                continue  # neighbours come with a small file's miss: none without small files
            waits, fetched = replay(tables_by_layer, order, HintPolicy(whole_file_max=whole, neighbour_window=window))
            rows.append(f"| {whole // MiB} MiB | {window // 1024} KiB | {waits} | {fetched / 1e6:.1f} MB "
                        f"({100 * fetched / total:.1f}%) |")
            print(rows[-1], flush=True)
    body = (f"Command: `.venv/bin/python tools/bench/hints_replay.py LAYOUT TRACE --write` ({machine()}). The trace "
            f"of tools/bench/mount.py's app start ({len(order)} chunks of {len(trace['layers'])} layers read, "
            f"{total / 1e6:.1f} MB of layers in all) replayed against the image's read hints: metadata local "
            "first, each listed chunk not yet local one wait, after which it and its companions are local. No "
            "time, no concurrency: the fewest waits a policy allows, and what it fetches (metadata included). "
            "Not part of `make bench` (it needs a recorded trace: see the script's docstring). On the machine "
            "(tools/bench/mount.py) the default pair, 2 MiB and 1 MiB, fetched 14.6% of the image for the start "
            "(read-ahead adds to what is replayed here): a bigger window would pass the 15% goal.\n\n"
            "| whole_file_max | neighbour_window | waits | fetched |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    if args.write:
        write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
