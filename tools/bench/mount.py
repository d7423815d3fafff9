#!/usr/bin/env python3
"""Node benchmark: cold start of a dadi image against containerd, warm reads, random 4 KiB reads.

The registry runs in a network namespace behind a veth shaped to 1 Gbit/s with tbf (tools/bench/netns.py);
the image is Debian bookworm with python3 and numpy plus an app layer whose start imports numpy and which
carries 200 MB it never reads (tools/bench/benchimage.py). Measured side by side, page cache dropped
before every measured run, medians of --runs:

1. cold start: `dadi mount` + the app chrooted into the view, on a daemon with an empty root, against
   containerd's `ctr images pull` + `ctr run --rm` (Debian's containerd and runc, overlayfs snapshotter, a
   containerd with an empty root) of the original OCI image; alternating. dadi runs three ways: with
   --no-prefetch (every chunk on demand), as a default mount that prefetches the image's trace first
   (recorded once with --record-trace, stored with `dadi trace push`), and with --no-prefetch from a local
   OCI layout (the registry's share). Goals: >= 8x faster than containerd, <= 1.5x the physical limit (the
   app's cold run on a local loop ext4 of the same disk + the bytes that run reads from its block device /
   link bandwidth), on-demand bytes <= 15% of the image.
2. warm read: every regular file of the tree read once, on a view whose chunks are all local (prefetched),
   against the same disk (`dadi export`) on a plain loop device. Goal: plain s / dadi s >= 0.9.
3. random 4 KiB reads per second inside /app/big.bin on the same local view and on the plain loop mount.

The daemons of 2 and 3 are started afresh on the prefetched root for every run, so nothing is warm but
the chunk cache on disk. Every loop device (the views' and the plain one) reads ahead what `dadi mount`
sets (READ_AHEAD_KB), so that both file systems issue the same reads to their block devices.

    .venv/bin/python tools/bench/mount.py [--runs 3] [--rtt-ms 20] [--write]

--rtt-ms N puts tools/bench/delayproxy.py in front of the registry, inside its namespace (tc has no netem
here), and sends every client through it (pushes, containerd's pull, the dadi daemon, the probe): each
request and its answer wait N ms more, and so does each new connection. Its report is a section of its own.
The registry's access log counts the requests that each cold start (mount to app exit) sent it.

Needs root, FUSE, loop devices, network namespaces; tears everything down on exit, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import re
import select
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(HERE))

from benchimage import START_COMMAND, build_bench_image, layout_bytes  # noqa: E402
from containerd import Containerd, mounts_under  # noqa: E402
from containerd import version as containerd_version  # noqa: E402
from netns import ShapedLink  # noqa: E402
from registry_server import RegistryServer  # noqa: E402
from report import drop_caches, machine, write_section  # noqa: E402

from dadi.node.control import DaemonNotRunning, request  # noqa: E402
from dadi.node.mounting import DEFAULT_READ_AHEAD  # noqa: E402

DADI = str(REPO / ".venv" / "bin" / "dadi")
PYTHON = str(REPO / ".venv" / "bin" / "python")
DELAYPROXY = HERE / "delayproxy.py"
SECTION = "Node: cold start, warm and random reads"
CONVERT_CACHE = REPO / ".cache" / "bench-images" / "dadi-convert"
REPOSITORY = "bench/app"
DAEMON_START_DEADLINE = 20.0
DAEMON_STOP_DEADLINE = 30.0
PROXY_START_DEADLINE = 20.0
PROXY_STOP_DEADLINE = 10.0
PREFETCH_DEADLINE = 600.0
RANDOM_READS = 2000
RANDOM_SEED = 4096
READ_BLOCK = 1 << 20
# `dadi mount` sets its loop device's read-ahead (DEFAULT_READ_AHEAD); the plain loop device gets the same,
# so that both read the disk alike (loop devices keep the read_ahead_kb their last user set).
READ_AHEAD_KB = DEFAULT_READ_AHEAD >> 10

# Cold start variants of dadi: label, prefetch (a default mount: the image's trace first).
COLD_VARIANTS = {
    "registry": ("dadi mount --no-prefetch + run", False),
    "trace": ("dadi mount + run, with the pushed trace", True),
    "layout": ("dadi, chunks from a local layout", False),
}
TOOLS = ("containerd", "ctr", "runc", "skopeo", "umoci", "docker-registry", "debootstrap", "ip", "tc", "losetup")

# Goals from the issue.
GOAL_SPEEDUP = 8.0
GOAL_LIMIT_RATIO = 1.5
GOAL_ON_DEMAND = 0.15
GOAL_WARM = 0.9  # issue 15


def log(message: str) -> None:
    print(message, flush=True)


def run(*argv: str | Path, capture: bool = True) -> str:
    result = subprocess.run([str(a) for a in argv], capture_output=capture, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout if capture else ""


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def med(values: list[float]) -> float:
    return statistics.median(values)


def fmt_runs(values: list[float], spec: str = ".2f") -> str:
    return ", ".join(format(v, spec) for v in values)


# --- a dadi daemon of our own ---------------------------------------------------------------------


class DadiDaemon:
    """`dadi daemon --root ROOT` started by us, stopped by its pid (SIGTERM: it unmounts ROOT/fs)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> DadiDaemon:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "bench-daemon.log").open("ab") as out:
            self._process = subprocess.Popen([DADI, "daemon", "--root", str(self.root)], stdin=subprocess.DEVNULL,
                                             stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + DAEMON_START_DEADLINE
        try:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(f"dadi daemon exited at start: {self.log()}")
                try:
                    if request(self.root, {"op": "ping"}, timeout=5)["pid"] == self._process.pid:
                        return self
                except DaemonNotRunning:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dadi daemon did not answer in {DAEMON_START_DEADLINE}s: {self.log()}")
                time.sleep(0.05)  # a poll interval
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self._process.pid

    def log(self) -> str:
        path = self.root / "bench-daemon.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=DAEMON_STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if os.path.ismount(self.root / "fs"):
            subprocess.run(["umount", "-l", str(self.root / "fs")], capture_output=True)


@contextlib.contextmanager
def dadi_view(root: Path, image: str, directory: Path, *, prefetch: bool, options: tuple[str, ...] = ()):
    """`dadi mount` (the CLI, as a user would run it) ... `dadi umount --force`; yields its JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    info = json.loads(run(DADI, "mount", image, directory, "--root", root, "--plain-http", "--json",
                          *([] if prefetch else ["--no-prefetch"]), *options))
    try:
        yield info
    finally:
        subprocess.run([DADI, "umount", str(directory), "--root", str(root), "--force"], capture_output=True)


def dadi_stats(root: Path, directory: Path, wait_prefetch: float | None = None) -> dict:
    extra = [] if wait_prefetch is None else ["--wait-prefetch", str(wait_prefetch)]
    return json.loads(run(DADI, "stats", directory, "--root", root, "--json", *extra))


# --- the registry's access log, and a delay proxy in front of the registry -------------------------


# One access log line (gorilla's combined format): ... "GET /v2/bench/app/blobs/sha256:... HTTP/1.1" 206 ...
ACCESS_LINE = re.compile(r'"([A-Z]+) (/v2/\S*) HTTP/[0-9.]+" ([0-9]{3}) ')


class CountingRegistry(RegistryServer):
    """RegistryServer with docker-registry's access log on (one line per request, after its answer, into
    the server's log file), so that a run can count what the registry was asked between two marks."""

    def _write_config(self) -> None:
        super()._write_config()
        config = json.loads(self.config_path.read_text())  # JSON, as RegistryServer writes it
        config.setdefault("log", {})["accesslog"] = {"disabled": False}
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")

    def mark(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def requests_since(self, mark: int) -> dict:
        """{"blob_gets": GETs of blobs (not uploads), "requests": every request} logged after mark."""
        with self.log_path.open("rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        blob_gets = requests = 0
        for method, path, _status in ACCESS_LINE.findall(text):
            requests += 1
            blob_gets += method == "GET" and "/blobs/" in path and "/blobs/uploads/" not in path
        return {"blob_gets": blob_gets, "requests": requests}

    @property
    def counting(self) -> bool:
        """Whether the access log works: the readiness probe's GET /v2/ is in it."""
        return self.requests_since(0)["requests"] > 0


class DelayProxyProcess:
    """tools/bench/delayproxy.py in the registry's namespace, on an ephemeral port of `address`, adding
    rtt_ms to every round trip to `upstream`; `host` is what clients use instead of the registry's.
    Stopped by its pid (`ip netns exec` execs python: the pid is the proxy's)."""

    def __init__(self, netns: str, address: str, upstream: str, rtt_ms: float, log_path: Path):
        self.argv = ["ip", "netns", "exec", netns, PYTHON, str(DELAYPROXY), "--listen", f"{address}:0",
                     "--upstream", upstream, "--rtt-ms", format(rtt_ms, "g")]
        self.log_path = log_path
        self.host = ""
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self._process.pid

    def __enter__(self) -> DelayProxyProcess:
        with self.log_path.open("ab") as err:
            self._process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                             stderr=err, start_new_session=True)
        try:
            line = self._first_line()
            found = re.match(r"delaying \S+ ms: (\S+):([0-9]+) -> ", line)
            if not found:
                raise RuntimeError(f"the delay proxy said {line!r}, not its address: {self.log()}")
            self.host = f"{found[1]}:{found[2]}"
        except BaseException:
            self.stop()
            raise
        return self

    def _first_line(self) -> str:
        stdout = self._process.stdout
        deadline = time.monotonic() + PROXY_START_DEADLINE
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the delay proxy printed no address in {PROXY_START_DEADLINE} s: {self.log()}")
            if select.select([stdout], [], [], left)[0]:
                byte = os.read(stdout.fileno(), 1)
                if not byte:
                    raise RuntimeError(f"the delay proxy exited at start ({self._process.wait()}): {self.log()}")
                line += byte
        return line.decode(errors="replace").strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=PROXY_STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()


# --- plain loop devices and chroots ---------------------------------------------------------------


@contextlib.contextmanager
def loop_mount(disk: Path, directory: Path):
    """The raw ext4 disk on a plain read-only loop device at directory (as `dadi mount` mounts views)."""
    directory.mkdir(parents=True, exist_ok=True)
    loop = run("losetup", "--find", "--show", "--read-only", disk).strip()
    try:
        run("mount", "-t", "ext4", "-o", "ro,noload", loop, directory)
        try:
            yield loop
        finally:
            subprocess.run(["umount", str(directory)], capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def block_name(device: str) -> str:
    return Path(device).name


def read_ahead_kb(device: str) -> int:
    return int(Path(f"/sys/block/{block_name(device)}/queue/read_ahead_kb").read_text())


def set_read_ahead_kb(device: str, kb: int) -> None:
    Path(f"/sys/block/{block_name(device)}/queue/read_ahead_kb").write_text(f"{kb}\n")


def device_read_bytes(device: str) -> int:
    """Bytes read from the block device since it appeared (sectors read are in 512-byte units)."""
    return int(Path(f"/sys/block/{block_name(device)}/stat").read_text().split()[2]) * 512


def chroot_run(root: Path, argv: list[str]) -> str:
    """argv chrooted into root with /proc, /sys and /dev, as `dadi run` does; its stdout."""
    binds = []
    try:
        for fs_type, source, target in (("proc", "proc", "proc"), ("sysfs", "sys", "sys"), (None, "/dev", "dev")):
            where = root / target
            run("mount", "--bind", source, where) if fs_type is None else run("mount", "-t", fs_type, source, where)
            binds.append(where)
        return run("chroot", root, *argv)
    finally:
        for where in reversed(binds):
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


# --- the read workloads ---------------------------------------------------------------------------


def read_tree(top: Path) -> tuple[int, int]:
    """Read every regular file under top once, in 1 MiB reads; (files, bytes)."""
    files = total = 0
    buffer = bytearray(READ_BLOCK)
    for dirpath, _dirnames, filenames in os.walk(top):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                while n := os.readv(fd, [buffer]):
                    total += n
            finally:
                os.close(fd)
            files += 1
    return files, total


def random_reads(path: Path, count: int, seed: int) -> float:
    """count preads of 4 KiB at random 4 KiB-aligned offsets of path (fixed seed); reads per second.

    POSIX_FADV_RANDOM switches the kernel's read-ahead off for the file, so that each read asks the
    block device for its own 4 KiB, as a database would."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDONLY)
    try:
        blocks = os.fstat(fd).st_size // 4096
        offsets = [rng.randrange(blocks) * 4096 for _ in range(count)]
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        start = time.perf_counter()
        for offset in offsets:
            if len(os.pread(fd, 4096, offset)) != 4096:
                raise RuntimeError(f"short read at {offset} of {path}")
        return count / (time.perf_counter() - start)
    finally:
        os.close(fd)


# --- safety net -----------------------------------------------------------------------------------


def release_everything_under(work: Path) -> None:
    """Whatever an interrupted run left under work: mounts, loop devices backed by files there."""
    fuse_roots = {p for p in mounts_under(work) if p.endswith("/fs")}
    for point in mounts_under(work):
        if point not in fuse_roots:
            subprocess.run(["umount", "-l", point], capture_output=True)
    listing = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
                             capture_output=True, text=True).stdout
    for device in json.loads(listing or '{"loopdevices": []}').get("loopdevices", []):
        if (device.get("back-file") or "").startswith(str(work) + "/"):
            subprocess.run(["losetup", "-d", device["name"]], capture_output=True)
    for point in mounts_under(work):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# --- the benchmark --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="write the figures into docs/BENCHMARKS.md")
    parser.add_argument("--rtt-ms", type=float, default=0.0,
                        help="round trip added to every exchange with the registry, by tools/bench/delayproxy.py "
                             "in the registry's namespace (default 0: no proxy); reported in a section of its own")
    args = parser.parse_args()
    if args.rtt_ms < 0:
        parser.error("--rtt-ms must not be negative")
    if os.geteuid() != 0:
        log("the node benchmark needs root (FUSE, loop devices, network namespaces, containerd)")
        return 2
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        log(f"missing {', '.join(missing)}: run `make install` first")
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`cmd &`)
    work = Path(tempfile.mkdtemp(prefix="bench-mount-"))
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
            stack.callback(release_everything_under, work)
            return bench(args, work, stack)
    except KeyboardInterrupt:
        log("interrupted; everything is torn down")
        return 130


def bench(args, work: Path, stack: contextlib.ExitStack) -> int:
    runs = args.runs
    load_before = os.getloadavg()[0]  # other work on the machine skews every figure: say how busy it was
    layout, tag = build_bench_image(work)
    oci_bytes = layout_bytes(layout)
    log(f"image: oci:{layout}:{tag}, {oci_bytes / 1e6:.1f} MB of gzip blobs")

    link = stack.enter_context(ShapedLink())
    registry = stack.enter_context(CountingRegistry(work / "registry", netns=link.netns, address=link.remote_address))
    log(f"registry {registry.host} (pid {registry.pid}) in netns {link.netns}, {link.describe()}")
    if not registry.counting:
        log("the registry's access log has no requests: the report leaves out the requests per start")
    host = registry.host  # what every client of the registry uses
    if args.rtt_ms > 0:
        proxy = stack.enter_context(DelayProxyProcess(link.netns, link.remote_address, registry.host, args.rtt_ms,
                                                      work / "delayproxy.log"))
        host = proxy.host
        log(f"delay proxy {host} (pid {proxy.pid}) in netns {link.netns}: +{args.rtt_ms:g} ms per round trip "
            f"to {registry.host}; every client goes through it")
    oci_ref = f"{host}/{REPOSITORY}:oci"
    dadi_ref = f"docker://{host}/{REPOSITORY}:dadi"
    dadi_layout = f"oci:{work / 'dadi-layout'}:{tag}"
    run("skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{oci_ref}")
    summary = json.loads(run(DADI, "convert", f"oci:{layout}:{tag}", dadi_ref, "--plain-http", "--json", "-q",
                             "--cache-dir", CONVERT_CACHE))
    run(DADI, "convert", f"oci:{layout}:{tag}", dadi_layout, "-q", "--cache-dir", CONVERT_CACHE)
    log(f"pushed {oci_ref} and {dadi_ref} ({summary['dadi_bytes'] / 1e6:.1f} MB); the dadi image also as {dadi_layout}")
    disk = work / "disk.img"
    run(DADI, "export", dadi_ref, disk, "--plain-http", "-q")
    plain_dir = work / "plain"
    plain_loop = stack.enter_context(loop_mount(disk, plain_dir))
    set_read_ahead_kb(plain_loop, READ_AHEAD_KB)

    # 1. cold start: containerd, dadi from the registry, dadi from a local layout, alternating --------
    trace = work / "app.trace"
    record_trace(dadi_ref, work / "dadi-record", work / "mnt-record", trace)
    log(f"recorded the start's trace ({trace.stat().st_size} bytes) and pushed it beside {dadi_ref}")
    ctd = collections.defaultdict(list)
    cold = {source: collections.defaultdict(list) for source in COLD_VARIANTS}
    for i in range(runs):
        with Containerd(work / f"containerd-{i}") as containerd:
            drop_caches()
            mark = registry.mark()
            t0 = time.perf_counter()
            containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", oci_ref)
            t1 = time.perf_counter()
            out = containerd.ctr("run", "--rm", "--snapshotter", "overlayfs", oci_ref, f"bench-{i}", *START_COMMAND)
            t2 = time.perf_counter()
            asked = registry.requests_since(mark)
        check_app(out, "containerd")
        ctd["pull"].append(t1 - t0)
        ctd["run"].append(t2 - t1)
        ctd["total"].append(t2 - t0)
        for key, value in asked.items():
            ctd[key].append(value)
        log(f"cold {i + 1}/{runs} containerd: pull {t1 - t0:.2f} s + run {t2 - t1:.2f} s = {t2 - t0:.2f} s; "
            f"registry: {asked['blob_gets']} blob GETs, {asked['requests']} requests")
        for source, (label, prefetch) in COLD_VARIANTS.items():
            image = dadi_layout if source == "layout" else dadi_ref
            figures = dadi_cold_start(image, work / f"dadi-cold-{source}-{i}", work / f"mnt-cold-{source}-{i}",
                                      registry, prefetch=prefetch)
            for key, value in figures.items():
                cold[source][key].append(value)
            log(f"cold {i + 1}/{runs} {label}: mount {figures['mount']:.2f} s + run {figures['run']:.2f} s = "
                f"{figures['total']:.2f} s, {figures['on_demand'] / 1e6:.1f} MB on demand in {figures['reads']} reads"
                f", {figures['prefetched'] / 1e6:.1f} MB prefetched ({figures['trace_chunks']} trace chunks), "
                f"daemon CPU {figures['cpu']:.2f} s; registry: {figures['blob_gets']} blob GETs, "
                f"{figures['requests']} requests")

    # the physical limit: the same run on a local loop device, and what it reads from it
    local = {"run": [], "bytes": []}
    for i in range(runs):
        drop_caches()
        before = device_read_bytes(plain_loop)
        t0 = time.perf_counter()
        out = chroot_run(plain_dir, START_COMMAND)
        t1 = time.perf_counter()
        check_app(out, "local loop")
        local["run"].append(t1 - t0)
        local["bytes"].append(device_read_bytes(plain_loop) - before)
        log(f"local {i + 1}/{runs}: run {t1 - t0:.2f} s, {local['bytes'][-1] / 1e6:.1f} MB read from the device")

    # 2 and 3. a root whose chunk cache holds the whole image --------------------------------------
    local_root, mnt = work / "dadi-local", work / "mnt-local"
    with DadiDaemon(local_root):
        t0 = time.perf_counter()
        with dadi_view(local_root, dadi_ref, mnt, prefetch=True):
            stats = dadi_stats(local_root, mnt, wait_prefetch=PREFETCH_DEADLINE)
            prefetch_s = time.perf_counter() - t0
    if stats["prefetch_state"] != "done" or stats["chunks_local"] != stats["chunks_total"]:
        raise RuntimeError(f"prefetch did not finish in {PREFETCH_DEADLINE} s: {stats}")
    log(f"prefetch: {stats['chunks_local']} chunks, {stats['bytes_local'] / 1e6:.1f} MB local "
        f"{prefetch_s:.1f} s after the mount")

    warm = collections.defaultdict(list)
    rand = collections.defaultdict(list)
    tree = None
    big = Path("app/big.bin")
    for i in range(runs):
        with DadiDaemon(local_root) as daemon, dadi_view(local_root, dadi_ref, mnt, prefetch=False) as info:
            set_read_ahead_kb(info["loop"], READ_AHEAD_KB)
            drop_caches()
            cpu0, t0 = cpu_seconds(daemon.pid), time.perf_counter()
            tree = read_tree(mnt)
            warm["dadi"].append(time.perf_counter() - t0)
            warm["cpu"].append(cpu_seconds(daemon.pid) - cpu0)
            figures = dadi_stats(local_root, mnt)
            warm["reads"].append(figures["reads"])
            warm["native"].append((figures["native"] or {}).get("reads_local", 0))
            warm["page_cache"].append(bool(figures.get("page_cache")))
        with DadiDaemon(local_root), dadi_view(local_root, dadi_ref, mnt, prefetch=False) as info:
            set_read_ahead_kb(info["loop"], READ_AHEAD_KB)
            drop_caches()
            rand["dadi"].append(random_reads(mnt / big, RANDOM_READS, RANDOM_SEED))
        drop_caches()
        t0 = time.perf_counter()
        plain_tree = read_tree(plain_dir)
        warm["plain"].append(time.perf_counter() - t0)
        if plain_tree != tree:
            raise RuntimeError(f"the view and the exported disk differ: {tree} vs {plain_tree}")
        drop_caches()
        rand["plain"].append(random_reads(plain_dir / big, RANDOM_READS, RANDOM_SEED))
        log(f"warm {i + 1}/{runs}: {tree[1] / 1e6:.0f} MB in {tree[0]} files: dadi {warm['dadi'][-1]:.2f} s "
            f"(daemon CPU {warm['cpu'][-1]:.2f} s, {warm['reads'][-1]} reads), plain loop {warm['plain'][-1]:.2f} s; "
            f"random 4 KiB: dadi {rand['dadi'][-1]:.0f}/s, plain {rand['plain'][-1]:.0f}/s")

    probe = probe_registry(host, summary)
    log(f"registry probe: 64 KiB range GET {probe['small_ms']:.2f} ms, 4 MiB {probe['large_ms']:.1f} ms (medians)")

    body = report(args, link, oci_bytes, ctd, cold, local, prefetch_s, tree, warm, rand, probe, load_before,
                  counted=registry.counting)
    print()
    print(f"## {section_title(args.rtt_ms)}\n")
    print(body)
    if args.write:
        write_section(section_title(args.rtt_ms), body)
    return 0


def dadi_cold_start(image: str, root: Path, mnt: Path, registry: CountingRegistry, *, prefetch: bool = False) -> dict:
    """One cold start on a fresh daemon root: `dadi mount [--no-prefetch]` + the app; timings, stats and
    the requests the registry logged from the mount to the app's exit.

    With prefetch (the default mount), the daemon fetches the image's trace first, at once."""
    with DadiDaemon(root) as daemon:
        drop_caches()
        mark = registry.mark()
        cpu0, t0 = cpu_seconds(daemon.pid), time.perf_counter()
        with dadi_view(root, image, mnt, prefetch=prefetch) as info:
            # What `dadi mount` set; checked, so that the figures never depend on the device's history.
            set_read_ahead_kb(info["loop"], READ_AHEAD_KB)
            t1 = time.perf_counter()
            out = chroot_run(mnt, START_COMMAND)
            t2 = time.perf_counter()
            asked = registry.requests_since(mark)
            cpu = cpu_seconds(daemon.pid) - cpu0
            stats = dadi_stats(root, mnt)
    shutil.rmtree(root, ignore_errors=True)
    check_app(out, image)
    return {"mount": t1 - t0, "run": t2 - t1, "total": t2 - t0, "cpu": cpu, "on_demand": stats["bytes_on_demand"],
            "prefetched": stats["bytes_prefetched"], "trace_chunks": stats.get("trace_chunks") or 0,
            "reads": stats["reads"], "bytes_total": stats["bytes_total"], **asked}


def record_trace(image: str, root: Path, mnt: Path, trace: Path) -> None:
    """What the app's start reads, recorded on a node of its own and pushed beside the image."""
    with DadiDaemon(root), dadi_view(root, image, mnt, prefetch=False,
                                     options=("--record-trace", str(trace), "--trace-seconds", "60")):
        check_app(chroot_run(mnt, START_COMMAND), "the recording mount")
    shutil.rmtree(root, ignore_errors=True)
    if not trace.exists():
        raise RuntimeError(f"the recording mount wrote no trace to {trace}")
    run(DADI, "trace", "push", image, trace, "--plain-http")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def probe_registry(host: str, summary: dict) -> dict:
    """Median wall time of range GETs of the largest dadi layer, page cache warm: the registry's latency."""
    from dadi.node.fetch import RegistryChunkSource

    layer = max(summary["layers"], key=lambda layer: layer["size"])
    source = RegistryChunkSource.connect(host, REPOSITORY, plain_http=True)
    rng = random.Random(1)
    try:
        def median_ms(length: int, count: int) -> float:
            times = []
            for _ in range(count):
                offset = rng.randrange(layer["size"] - length)
                t0 = time.perf_counter()
                source.fetch_range(layer["digest"], offset, length, 10.0)
                times.append(time.perf_counter() - t0)
            return 1000 * med(times)

        median_ms(64 << 10, 5)  # the connection, and the blob's first pages
        return {"small_ms": median_ms(64 << 10, 50), "large_ms": median_ms(4 << 20, 10)}
    finally:
        source.close()


def section_title(rtt_ms: float) -> str:
    """The report's section in docs/BENCHMARKS.md: one per added round trip (none: the plain title)."""
    return SECTION if rtt_ms <= 0 else f"{SECTION}, registry {rtt_ms:g} ms away (delay proxy)"


def cold_note(reg: dict, lay: dict, probe: dict) -> str:
    """Where the cold start's time goes, from the figures (so that it stays true when they change)."""
    waiting = med(reg["run"]) - med(lay["run"])
    text = (f"Where the --no-prefetch start's time goes: a 64 KiB range GET from this registry takes {probe['small_ms']:.1f} ms (median "
            f"of 50, page cache warm; 4 MiB take {probe['large_ms']:.0f} ms). From a local layout the same start "
            f"runs {med(lay['run']):.2f} s instead of {med(reg['run']):.2f} s, and the daemon's CPU is "
            f"{med(reg['cpu']):.2f} s of the {med(reg['total']):.2f} s")
    if waiting > 0.5 * med(reg["run"]):
        text += (f": most of the start ({waiting:.2f} s) waits for the registry, one request at a time, "
                 f"as the app's reads reach the view one after the other ({med(reg['reads']):.0f} reads, about "
                 f"{1000 * waiting / med(reg['reads']):.1f} ms of waiting each), not for the link's bandwidth")
    return text + ".\n\n"


def check_app(out: str, where: str) -> None:
    if not out.startswith("app started:"):
        raise RuntimeError(f"the app did not start on {where}: {out!r}")


def revision() -> str:
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def report(args, link, oci_bytes, ctd, cold, local, prefetch_s, tree, warm, rand, probe, load, *,
           counted: bool = True) -> str:
    mb = 1e6
    rtt = args.rtt_ms
    rtt_option = f" --rtt-ms {rtt:g}" if rtt > 0 else ""
    away = (f", {rtt:g} ms away: every client (pushes, containerd's pull, the dadi daemon, the probe) reaches it "
            f"through tools/bench/delayproxy.py in its namespace, which adds {rtt:g} ms to each round trip and "
            "one to each new connection (tc has no netem here)" if rtt > 0 else "")

    def asked(figures: dict) -> str:
        """The requests the registry logged during a start (mount, or pull, to the app's exit)."""
        if not counted:
            return ""
        text = (f"; registry: {med(figures['blob_gets']):.0f} blob GETs, {med(figures['requests']):.0f} "
                "requests in all")
        if rtt > 0:
            text += f" (x {rtt:g} ms = {med(figures['blob_gets']) * rtt / 1000:.2f} s if the start waited for each)"
        return text

    reg, lay = cold["registry"], cold["layout"]
    bytes_total = reg["bytes_total"][-1]
    ctd_s = med(ctd["total"])
    local_s, local_bytes = med(local["run"]), med(local["bytes"])
    limit_s = local_s + local_bytes / link.rate_bytes_per_s
    warm_ratio = med(warm["plain"]) / med(warm["dadi"])
    warm_reads = med(warm["reads"])

    def cold_row(source: str) -> str:
        figures = cold[source]
        fetched = f"{med(figures['on_demand']) / mb:.1f} MB on demand"
        if any(figures["prefetched"]):
            fetched += (f" + {med(figures['prefetched']) / mb:.1f} MB prefetched "
                        f"({med(figures['trace_chunks']):.0f} chunks of the trace)")
        return (f"| {COLD_VARIANTS[source][0]} | {med(figures['total']):.2f} | {fmt_runs(figures['total'])} | mount "
                f"{med(figures['mount']):.2f} s, run {med(figures['run']):.2f} s; {fetched}; "
                f"{med(figures['reads']):.0f} reads; daemon CPU {med(figures['cpu']):.2f} s"
                f"{'' if source == 'layout' else asked(figures)} |\n")

    def goals(source: str) -> str:
        figures = cold[source]
        dadi_s = med(figures["total"])
        fetched = med([a + b for a, b in zip(figures["on_demand"], figures["prefetched"], strict=True)])
        speedup, ratio, share = ctd_s / dadi_s, dadi_s / limit_s, fetched / bytes_total
        return (
            f"- {COLD_VARIANTS[source][0]}: containerd / dadi = **{speedup:.1f}x** (goal >= {GOAL_SPEEDUP:g}x) "
            f"{verdict(speedup >= GOAL_SPEEDUP)}; dadi / physical limit = **{ratio:.2f}x** (goal <= "
            f"{GOAL_LIMIT_RATIO:g}x) {verdict(ratio <= GOAL_LIMIT_RATIO)}; fetched for the start "
            f"{fetched / mb:.1f} MB of {bytes_total / mb:.1f} MB = **{100 * share:.1f}%** (goal <= "
            f"{100 * GOAL_ON_DEMAND:g}%) {verdict(share <= GOAL_ON_DEMAND)}\n"
        )

    return (
        f"Command: `.venv/bin/python tools/bench/mount.py --runs {args.runs}{rtt_option} --write` ({machine()}; "
        f"{containerd_version()}; revision {revision()}).\n\n"
        f"Image: Debian bookworm minbase + python3 + python3-numpy, and an app layer with /app/start.py "
        f"(imports numpy, solves a 300x300 system, prints a line) and /app/big.bin (200 MB of random bytes "
        f"the start never reads): {oci_bytes / mb:.1f} MB of gzip OCI blobs, {bytes_total / mb:.1f} MB as a "
        f"dadi image, {tree[1] / mb:.0f} MB in {tree[0]} files. The registry (docker-registry) runs in a network "
        f"namespace behind a {link.describe()}{away}. Page cache dropped before every measured run; medians of "
        f"{args.runs} runs; dadi and containerd alternate; load average {load:.2f} before the run. Every loop "
        f"device (the views' and the plain one) reads ahead {READ_AHEAD_KB} KiB, what `dadi mount` sets.\n\n"
        + ("### Cold start\n\n" if rtt <= 0 else f"### Cold start, {rtt:g} ms round trip to the registry\n\n")
        + "containerd: a fresh containerd root, `ctr images pull` + `ctr run --rm` (overlayfs). dadi: a fresh "
        "daemon root (empty chunk cache; the daemon already running, as containerd is), `dadi mount` + the app "
        "chrooted into the view (with /proc, /sys, /dev, as `dadi run` does): with `--no-prefetch` (every chunk "
        "on demand); as a default mount, which prefetches the image's trace first (recorded once by "
        "`dadi mount --record-trace` on another root, stored with `dadi trace push`); and with `--no-prefetch` "
        "from a local OCI layout of the dadi image, to see the registry's share. Physical limit: the app's "
        "cold run on the exported disk on a plain loop device + the bytes it read from the device at "
        f"{link.rate_bytes_per_s * 8 / 1e9:g} Gbit/s"
        + (" (no round trip in it)" if rtt > 0 else "")
        + (". Registry requests: the lines docker-registry's access log gained from the mount (the pull) to the "
           "app's exit; each blob GET is a round trip the start may have waited for" if counted else "")
        + ".\n\n"
        "| | median s | runs (s) | parts (medians) |\n|---|---|---|---|\n"
        f"| containerd pull + run | {ctd_s:.2f} | {fmt_runs(ctd['total'])} | pull {med(ctd['pull']):.2f} s, "
        f"run {med(ctd['run']):.2f} s{asked(ctd)} |\n"
        + cold_row("registry") + cold_row("trace") + cold_row("layout")
        + f"| local loop run | {local_s:.2f} | {fmt_runs(local['run'])} | {local_bytes / mb:.1f} MB read from "
        f"the device |\n"
        f"| physical limit | {limit_s:.2f} | | {local_s:.2f} s + {local_bytes / mb:.1f} MB at "
        f"{link.rate_bytes_per_s / mb:.0f} MB/s |\n\n"
        + goals("registry") + goals("trace") + "\n"
        + (f"The pushed trace was not used in {cold['trace']['trace_chunks'].count(0)} of {args.runs} runs "
           "(the daemon could not read it): that row mixes runs with and without it.\n\n"
           if 0 in cold["trace"]["trace_chunks"] else "")
        + cold_note(reg, lay, probe) +
        "### Warm and random reads\n\n"
        f"After a prefetch of the whole image ({prefetch_s:.1f} s from the mount until every chunk was local), "
        "each run starts a fresh daemon on that root and mounts the view: only the on-disk chunk cache is warm. "
        "Warm read: every regular file read once (1 MiB reads, one thread). Random: "
        f"{RANDOM_READS} preads of 4 KiB at random aligned offsets of /app/big.bin (POSIX_FADV_RANDOM, "
        "fixed seed), page cache dropped.\n\n"
        "| whole tree | median s | runs (s) | MB/s |\n|---|---|---|---|\n"
        f"| dadi view | {med(warm['dadi']):.2f} | {fmt_runs(warm['dadi'])} | "
        f"{tree[1] / mb / med(warm['dadi']):.0f} |\n"
        f"| plain loop | {med(warm['plain']):.2f} | {fmt_runs(warm['plain'])} | "
        f"{tree[1] / mb / med(warm['plain']):.0f} |\n\n"
        f"- warm read, plain / dadi = **{warm_ratio:.2f}x** (goal >= {GOAL_WARM:g}x): "
        f"{verdict(warm_ratio >= GOAL_WARM)}\n\n"
        f"During the dadi walk the daemon served {warm_reads:.0f} reads ({tree[1] / warm_reads / 1024:.0f} KiB each "
        f"on average), {med(warm['native']):.0f} of them answered by the native read path (C threads reading "
        f"the chunk cache, dadi.node.nativeviews) without a round trip to Python, and used "
        f"{med(warm['cpu']):.2f} s of CPU in {med(warm['dadi']):.2f} s"
        + (": the walk waits for the daemon's CPU (each read is a FUSE request, a lookup, a chunk cache "
           "pread, an xxh3 check and an lz4 decode; in Python for the reads the native path passed on). "
           if med(warm["cpu"]) > 0.7 * med(warm["dadi"]) else ". ")
        + (f"In {sum(warm['page_cache'])} of {len(warm['page_cache'])} runs the view's loop device read it "
           "through the page cache, as the daemon sets it once every chunk of a view is local "
           "(dadi/node/loopdev.py; the plain loop device reads its file the same way).\n\n"
           if any(warm["page_cache"]) else "The view's loop device read it with direct I/O.\n\n") +
        "| random 4 KiB reads | median reads/s | runs |\n|---|---|---|\n"
        f"| dadi view (local chunks) | {med(rand['dadi']):.0f} | {fmt_runs(rand['dadi'], '.0f')} |\n"
        f"| plain loop | {med(rand['plain']):.0f} | {fmt_runs(rand['plain'], '.0f')} |\n"
    )


if __name__ == "__main__":
    sys.exit(main())
