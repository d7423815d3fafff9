#!/usr/bin/env python3
"""containerd benchmark: cold start of the app through containerd + the dadi snapshotter, against
containerd's own overlayfs pull + run of the original image.

The registry runs in a network namespace behind a veth shaped to 1 Gbit/s with tbf (tools/bench/netns.py);
the image is tools/bench/benchimage.py's (Debian bookworm + python3 + numpy, an app layer whose start
imports numpy, and 200 MB the start never reads). Each run is a node that has never pulled anything:

- containerd: a fresh containerd (overlayfs snapshotter), `ctr images pull` + `ctr run --rm` of the OCI
  image;
- dadi: a fresh containerd with `dadi snapshotter` as a proxy plugin (tests/containerd_helpers.py, the
  documented config) and a fresh node daemon already running (as containerd is), `dadi pull` +
  `ctr run --rm --snapshotter dadi` of the dadi image, whose start trace was recorded once and pushed
  beside it (the snapshotter's views prefetch it first, as they do by default).

Alternating, page cache dropped before each, medians of --runs. Goal (issue 5): >= 5x faster.

    .venv/bin/python tools/bench/snapshotter.py [--runs 3] [--write]

Needs root, FUSE, loop devices, network namespaces; tears everything down on exit, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(HERE))

from benchimage import START_COMMAND, build_bench_image, layout_bytes  # noqa: E402
from containerd import Containerd  # noqa: E402
from containerd import version as containerd_version  # noqa: E402
from containerd_helpers import DadiContainerd  # noqa: E402
from mount import (  # noqa: E402
    CONVERT_CACHE,
    DADI,
    REPOSITORY,
    TOOLS,
    DadiDaemon,
    _terminate,
    check_app,
    fmt_runs,
    log,
    med,
    record_trace,
    release_everything_under,
    revision,
    run,
    verdict,
)
from netns import ShapedLink  # noqa: E402
from registry_server import RegistryServer  # noqa: E402
from report import drop_caches, machine, write_section  # noqa: E402

GOAL_SPEEDUP = 5.0
SECTION = "containerd: cold start through the dadi snapshotter"


def containerd_cold_start(directory: Path, ref: str, name: str) -> dict:
    with Containerd(directory) as containerd:
        drop_caches()
        t0 = time.perf_counter()
        containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
        t1 = time.perf_counter()
        out = containerd.ctr("run", "--rm", "--snapshotter", "overlayfs", ref, name, *START_COMMAND)
        t2 = time.perf_counter()
    check_app(out, "containerd")
    return {"pull": t1 - t0, "run": t2 - t1, "total": t2 - t0}


def dadi_cold_start(directory: Path, ref: str, name: str) -> dict:
    """dadi pull + ctr run --snapshotter dadi on a fresh node (containerd, snapshotter, daemon root)."""
    with DadiContainerd(directory) as node, DadiDaemon(node.daemon_root):
        drop_caches()
        t0 = time.perf_counter()
        summary = json.loads(run(DADI, "pull", "--containerd", node.socket, "--plain-http", "--json", "-q", ref))
        t1 = time.perf_counter()
        out = node.ctr("run", "--rm", "--snapshotter", "dadi", ref, name, *START_COMMAND, timeout=600).stdout
        t2 = time.perf_counter()
    check_app(out, "dadi snapshotter")
    return {"pull": t1 - t0, "run": t2 - t1, "total": t2 - t0, "pull_bytes": summary["bytes_fetched"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="write the figures into docs/BENCHMARKS.md")
    args = parser.parse_args()
    if os.geteuid() != 0:
        log("the containerd benchmark needs root (FUSE, loop devices, network namespaces, containerd)")
        return 2
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        log(f"missing {', '.join(missing)}: run `make install` first")
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="bench-snapshotter-"))
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
            stack.callback(release_everything_under, work)
            return bench(args, work, stack)
    except KeyboardInterrupt:
        log("interrupted; everything is torn down")
        return 130


def bench(args, work: Path, stack: contextlib.ExitStack) -> int:
    load_before = os.getloadavg()[0]
    layout, tag = build_bench_image(work)
    oci_bytes = layout_bytes(layout)
    link = stack.enter_context(ShapedLink())
    registry = stack.enter_context(RegistryServer(work / "registry", netns=link.netns, address=link.remote_address))
    oci_ref = f"{registry.host}/{REPOSITORY}:oci"
    dadi_ref = f"{registry.host}/{REPOSITORY}:dadi"
    run("skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{oci_ref}")
    summary = json.loads(run(DADI, "convert", f"oci:{layout}:{tag}", f"docker://{dadi_ref}", "--plain-http",
                             "--json", "-q", "--cache-dir", CONVERT_CACHE))
    trace = work / "app.trace"
    record_trace(f"docker://{dadi_ref}", work / "dadi-record", work / "mnt-record", trace)
    log(f"registry {registry.host} in netns {link.netns} ({link.describe()}); {oci_ref} "
        f"({oci_bytes / 1e6:.1f} MB gzip), {dadi_ref} ({summary['dadi_bytes'] / 1e6:.1f} MB) with its start trace")

    figures = {"containerd": collections.defaultdict(list), "dadi": collections.defaultdict(list)}
    for i in range(args.runs):
        for what, start, ref in (("containerd", containerd_cold_start, oci_ref), ("dadi", dadi_cold_start, dadi_ref)):
            result = start(work / f"{what}-{i}", ref, f"bench-{i}")
            for key, value in result.items():
                figures[what][key].append(value)
            log(f"run {i + 1}/{args.runs} {what}: pull {result['pull']:.2f} s + run {result['run']:.2f} s = "
                f"{result['total']:.2f} s")

    body = report(args, link, oci_bytes, summary["dadi_bytes"], figures, load_before)
    print()
    print(body)
    if args.write:
        write_section(SECTION, body)
    return 0


def report(args, link, oci_bytes: int, dadi_bytes: int, figures: dict, load: float) -> str:
    ctd, dadi = figures["containerd"], figures["dadi"]
    speedup = med(ctd["total"]) / med(dadi["total"])

    def row(label: str, f: dict, extra: str = "") -> str:
        return (f"| {label} | {med(f['total']):.2f} | {fmt_runs(f['total'])} | pull {med(f['pull']):.2f} s, "
                f"run {med(f['run']):.2f} s{extra} |\n")

    return (
        f"Command: `.venv/bin/python tools/bench/snapshotter.py --runs {args.runs} --write` ({machine()}; "
        f"{containerd_version()}; revision {revision()}).\n\n"
        f"The node benchmark's image (Debian bookworm + python3 + numpy + an app layer with 200 MB the start "
        f"never reads): {oci_bytes / 1e6:.1f} MB of gzip OCI blobs, {dadi_bytes / 1e6:.1f} MB as a dadi image. "
        f"The registry runs in a network namespace behind a {link.describe()}. Every run is a fresh node: "
        "containerd with an empty root; for dadi also an empty snapshotter root and an empty node daemon root "
        "(the daemon already running, as containerd is). containerd: `ctr images pull` + `ctr run --rm` "
        "(overlayfs). dadi: `dadi pull` (manifest and config into containerd, the layers recorded as remote "
        "snapshots) + `ctr run --rm --snapshotter dadi` through the proxy snapshotter; the image's start trace "
        "was recorded once and pushed beside it, so the container's view prefetches it first. Page cache "
        f"dropped before every run; the two alternate; medians of {args.runs} runs; load average {load:.2f} "
        "before the run.\n\n"
        "| | median s | runs (s) | parts (medians) |\n|---|---|---|---|\n"
        + row("containerd pull + run (overlayfs)", ctd)
        + row("dadi pull + ctr run --snapshotter dadi", dadi,
              f"; `dadi pull` fetched {med(dadi['pull_bytes']) / 1e3:.1f} kB")
        + f"\n- containerd / dadi = **{speedup:.1f}x** (goal >= {GOAL_SPEEDUP:g}x) {verdict(speedup >= GOAL_SPEEDUP)}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
