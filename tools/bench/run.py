#!/usr/bin/env python3
"""`make bench`: every benchmark in tools/bench, each writing its section of docs/BENCHMARKS.md."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["chunk_size.py", "lookup.py", "convert.py", "mount.py", "snapshotter.py", "p2p.py"]

if __name__ == "__main__":
    failed = []
    for bench in BENCHES:
        print(f"\n### {bench}", flush=True)
        if subprocess.run([sys.executable, str(HERE / bench), "--write"]).returncode != 0:
            failed.append(bench)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    sys.exit(1 if failed else 0)
