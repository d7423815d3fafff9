"""Writes one benchmark's section of docs/BENCHMARKS.md, leaving the other sections as they are."""

from __future__ import annotations

import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every figure here is written by a script in tools/bench (the command is under each heading);\n"
    "`make bench` runs them all. Medians of several runs, measured side by side in one run.\n"
)


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {len(__import__('os').sched_getaffinity(0))} cores, Python {platform.python_version()}"


def write_section(title: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the '## title' section."""
    text = path.read_text() if path.exists() else HEADER
    section = f"## {title}\n\n{body.rstrip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: section, text, count=1)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")


def median_seconds(fn, runs: int, setup=None) -> tuple[float, list[float]]:
    """Median wall time of fn() over runs; setup() (untimed) runs before each."""
    times = []
    for _ in range(runs):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass
