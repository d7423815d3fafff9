#!/usr/bin/env python3
"""Conversion speed: `dadi convert` of the Debian test image against `umoci unpack` of the same image.

Both run side by side in one process, alternating, page cache dropped before each run; medians of
--runs runs. The converter starts with an empty cache every time (no reuse). Goal from the issue:
conversion <= 1.5x umoci unpack's time.

    .venv/bin/python tools/bench/convert.py [--runs 3] [--write]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(HERE))

from images import build_debian_image  # noqa: E402
from report import drop_caches, machine, median_seconds, write_section  # noqa: E402

DADI = str(REPO / ".venv" / "bin" / "dadi")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="write the figures into docs/BENCHMARKS.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        cache = REPO / ".cache" / "test-images"
        cache.mkdir(parents=True, exist_ok=True)
        layout, tag = build_debian_image(work / "src", cache)
        src_bytes = sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())

        def fresh():
            for d in ("bundle", "out", "cache"):
                shutil.rmtree(work / d, ignore_errors=True)
            drop_caches()

        def umoci():
            subprocess.run(
                ["umoci", "unpack", "--image", f"{layout}:{tag}", str(work / "bundle")],
                check=True,
                capture_output=True,
            )

        summaries = []

        def dadi():
            out = subprocess.run(
                [
                    DADI,
                    "convert",
                    f"oci:{layout}:{tag}",
                    f"oci:{work / 'out'}:x",
                    "--json",
                    "-q",
                    "--cache-dir",
                    str(work / "cache"),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            summaries.append(json.loads(out.stdout))

        umoci_times, dadi_times = [], []
        for _ in range(args.runs):  # alternate so both see the same machine conditions
            umoci_times += median_seconds(umoci, 1, fresh)[1]
            dadi_times += median_seconds(dadi, 1, fresh)[1]
        umoci_s = sorted(umoci_times)[len(umoci_times) // 2]
        dadi_s = sorted(dadi_times)[len(dadi_times) // 2]
        last = summaries[-1]
        ratio = dadi_s / umoci_s
        body = (
            f"Command: `.venv/bin/python tools/bench/convert.py --runs {args.runs} --write` "
            f"({machine()}).\n\n"
            f"Debian bookworm minbase image, {len(last['layers'])} layers, {src_bytes / 1e6:.1f} MB of OCI blobs; "
            f"page cache dropped before every run, empty converter cache.\n\n"
            "| tool | median s | runs (s) | MB/s of source blobs |\n|---|---|---|---|\n"
            f"| umoci unpack | {umoci_s:.2f} | {', '.join(f'{t:.2f}' for t in umoci_times)} | "
            f"{src_bytes / 1e6 / umoci_s:.1f} |\n"
            f"| dadi convert | {dadi_s:.2f} | {', '.join(f'{t:.2f}' for t in dadi_times)} | "
            f"{src_bytes / 1e6 / dadi_s:.1f} |\n\n"
            f"dadi convert / umoci unpack = **{ratio:.2f}x** (goal <= 1.5x). "
            f"dadi image: {last['dadi_bytes'] / 1e6:.1f} MB ({last['size_ratio']} of the gzip source).\n"
        )
        print(body)
        if args.write:
            write_section("Conversion", body)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
