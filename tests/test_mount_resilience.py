"""dadi mount when things go wrong: a daemon killed with SIGKILL, a cache damaged on disk, a source that
sends wrong bytes, many views reading at once, and real Debian commands in a lazily mounted image.

Real daemon, FUSE, loop devices, ext4 and docker-registry throughout; every tree is compared with what
`umoci unpack` made of the same image. The chunk cache is inspected on disk, read-only, the way the next
daemon would find it (ROOT/cache/blobs/<hex>/{present,data}). Reads of mounted trees run in child
processes with generous time limits: a read that hangs fails the test instead of hanging it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import dadi_cli, poll
from corrupting_proxy import CorruptingProxy
from mounthelpers import loop_backing_file, mount, record_mount, stats, wait_gone

from dadi.format.blob import HEADER_SIZE
from dadi.format.index import ZERO, MergedIndex
from dadi.format.model import LayerTables
from dadi.node.control import request

pytestmark = pytest.mark.needs_root

TESTS = Path(__file__).resolve().parent
READ_TIMEOUT = 300.0  # seconds a child process gets to read a tree: generous, it is only a hang guard
DEADLINE = 120.0  # seconds for the daemon to reach a state the test waits for


# --- images --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    tables: LayerTables

    @property
    def data_end(self) -> int:
        last = self.tables.chunks[-1]
        return last.offset + last.length


def image_layers(ref: str, *, plain_http: bool = False) -> list[Layer]:
    """The layers of a dadi image with their verified chunk tables, read as the daemon reads them."""
    from dadi.image.dadi_layers import load_layer_tables
    from dadi.image.transports import RegistryOptions, open_source, parse_image_ref

    source = open_source(parse_image_ref(ref), RegistryOptions(plain_http=plain_http))
    try:
        manifest = source.get_manifest()
        return [Layer(d.digest, d.size, load_layer_tables(source, d)) for d in manifest.layers]
    finally:
        source.close()


def push_busybox(busybox_image, registry, tmp_path, *extra: str) -> str:
    """Convert the busybox image into the registry; its docker:// reference."""
    layout, tag = busybox_image
    ref = f"docker://{registry.host}/dadi/busybox:v1"
    dadi_cli("convert", f"oci:{layout}:{tag}", ref, "--plain-http", "--cache-dir", str(tmp_path / "convert-cache"),
             "-q", *extra)
    return ref


# --- the chunk cache on disk ---------------------------------------------------------------------------


def blob_dir(root: Path, digest: str) -> Path:
    return root / "cache" / "blobs" / digest.removeprefix("sha256:")


def cached_chunks(root: Path, layer: Layer) -> tuple[list[int], list[int]]:
    """(chunks the cache marks present, those of them whose bytes fail the table's sha256), read from the
    files the next daemon would trust, without changing them."""
    from dadi.node.chunkcache import _load_bitmap

    count = len(layer.tables.chunks)
    bits = _load_bitmap(blob_dir(root, layer.digest) / "present", count)
    present = [i for i in range(count) if bits[i >> 3] & (1 << (i & 7))]
    bad = []
    if present:
        with open(blob_dir(root, layer.digest) / "data", "rb") as f:
            for i in present:
                chunk = layer.tables.chunks[i]
                f.seek(chunk.offset)
                if hashlib.sha256(f.read(chunk.length)).digest() != chunk.sha256:
                    bad.append(i)
    return present, bad


def cache_census(root: Path, layers: list[Layer]) -> tuple[int, dict[str, list[int]]]:
    """(chunks marked present over all layers, {digest: present chunks with wrong bytes})."""
    present_total, bad = 0, {}
    for layer in layers:
        present, wrong = cached_chunks(root, layer)
        present_total += len(present)
        if wrong:
            bad[layer.digest] = wrong
    return present_total, bad


# --- where a file's bytes live -------------------------------------------------------------------------

def chunks_holding(path: Path, layers: list[Layer]) -> list[tuple[int, int]]:
    """(layer index, chunk index) of every stored chunk that holds bytes of the file at `path` (FIEMAP,
    asked in a child process: see tests/fiemap.py)."""
    result = run_child(_FIEMAP, str(TESTS), str(path), timeout=DEADLINE)
    assert result.returncode == 0, f"FIEMAP of {path} failed:\n{result.stderr}"
    tables = [layer.tables for layer in layers]
    index = MergedIndex([t.extents for t in tables], block_size=tables[0].block_size,
                        disk_size=tables[0].disk_size)
    found = set()
    for offset, length in json.loads(result.stdout):
        for piece in index.lookup(offset, length):
            if piece.layer != ZERO:
                t = tables[piece.layer]
                first, last = t.chunk_of(piece.packed_offset), t.chunk_of(piece.packed_offset + piece.length - 1)
                found.update((piece.layer, i) for i in range(first, last + 1))
    return sorted(found)


# --- reading mounted trees in child processes ----------------------------------------------------------

_FIEMAP = """
import json, sys
sys.path.insert(0, sys.argv[1])
from fiemap import disk_extents
print(json.dumps(disk_extents(sys.argv[2])))
"""

_COMPARE = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from treecompare import compare_trees
print(json.dumps(compare_trees(Path(sys.argv[2]), Path(sys.argv[3]))))
"""

_READ_ALL = """
import errno, hashlib, json, sys
results = {}
for path, want in json.load(sys.stdin).items():
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        results[path] = "EIO" if e.errno == errno.EIO else "error " + errno.errorcode.get(e.errno, str(e.errno))
        continue
    results[path] = "ok" if hashlib.sha256(data).hexdigest() == want else "WRONG BYTES"
print(json.dumps(results))
"""


def run_child(code: str, *args: str, stdin: str | None = None, timeout: float = READ_TIMEOUT) -> subprocess.CompletedProcess:
    """Run `code` in a child Python; fails the test if it does not end within `timeout` seconds."""
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE if stdin else None,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        pytest.fail(f"a reader of the mounted tree did not finish within {timeout:.0f}s (hung read?)")
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def tree_differences(expected: Path, actual: Path) -> list[str]:
    """compare_trees(expected, actual), run in a child process."""
    result = run_child(_COMPARE, str(TESTS), str(expected), str(actual))
    assert result.returncode == 0, f"comparing {actual} with {expected} failed:\n{result.stderr}"
    return json.loads(result.stdout)


def assert_same_tree(expected: Path, actual: Path) -> None:
    differences = tree_differences(expected, actual)
    assert differences == [], f"{actual} differs from umoci unpack:\n" + "\n".join(differences[:50])


def read_every_file(expected: Path, actual: Path) -> dict[str, str]:
    """Read every regular file of `expected` under `actual` in a child process: {relative path: "ok",
    "EIO", "WRONG BYTES" or "error ERRNO"}."""
    wanted = {}
    for dirpath, _, filenames in os.walk(expected):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                rel = path.relative_to(expected)
                wanted[str(actual / rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    result = run_child(_READ_ALL, stdin=json.dumps(wanted))
    assert result.returncode == 0, result.stderr
    return {str(Path(path).relative_to(actual)): outcome for path, outcome in json.loads(result.stdout).items()}


def read_file_in_child(path: Path) -> subprocess.CompletedProcess:
    """cat-like read of one file in a child; stdout holds its sha256 (hex), stderr the error if any."""
    code = "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"
    return run_child(code, str(path), timeout=DEADLINE)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the daemon ----------------------------------------------------------------------------------------


def sigkill_daemon(root: Path) -> int:
    pid = request(root, {"op": "ping"})["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid, DEADLINE), f"daemon {pid} still alive after SIGKILL"
    return pid


def stop_daemon(root: Path) -> None:
    """A clean stop (SIGTERM), once every view is unmounted."""
    pid = request(root, {"op": "ping"})["pid"]
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, DEADLINE), f"daemon {pid} did not exit on SIGTERM"


def wait_until_fuse_is_dead(root: Path) -> None:
    """Wait until ROOT/fs answers as the FUSE mount of a dead daemon does (ENOTCONN): what anyone who
    comes to repair the node finds. For about a second after the kill the kernel still answers stat()
    of it from its attribute cache; a restart within that second would not meet the dead mount."""
    def dead() -> bool:
        try:
            os.stat(root / "fs")
        except OSError as e:
            return e.errno == errno.ENOTCONN
        return False
    poll("ROOT/fs answering ENOTCONN after the daemon was killed", dead, timeout=DEADLINE)


def restart_daemon(root: Path) -> int:
    """Start the daemon again the way `dadi mount` does (from a short-lived process); its pid. Says what
    the daemon's log says when it does not start."""
    code = "import sys; from pathlib import Path; from dadi.node.control import ensure_daemon; " \
           "print(ensure_daemon(Path(sys.argv[1])))"
    started = run_child(code, str(root), timeout=DEADLINE)
    if started.returncode != 0:
        log = (root / "daemon.log").read_text(errors="replace") if (root / "daemon.log").exists() else ""
        pytest.fail(f"the daemon does not start again after a SIGKILL: {started.stderr.strip().splitlines()[-1]}"
                    f"\n--- daemon.log (end) ---\n{log[-3000:]}")
    return int(started.stdout)


def views(root: Path) -> list[dict]:
    return json.loads(dadi_cli("ls", "--root", str(root), "--json").stdout)


def attached_to_view(loop: str, name: str) -> bool:
    """Whether loop device `loop` still holds view `name` and will go on holding it. `losetup -d` of a
    device still in use (by a lazily unmounted file system) marks it to be freed once unused: fine."""
    backing = loop_backing_file(loop)
    if backing is None or not backing.endswith("/" + name):
        return False
    return Path(f"/sys/block/{Path(loop).name}/loop/autoclear").read_text().strip() != "1"


def mount_count(directory: Path) -> int:
    """How many mounts are stacked at `directory` (a dead one below a live one counts)."""
    target = str(directory.resolve())
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == target)


# --- 1. SIGKILL ----------------------------------------------------------------------------------------


def test_a_daemon_killed_mid_prefetch_leaves_a_consistent_cache_and_mounts_again(
        busybox_image, busybox_rootfs, registry, node, tmp_path):
    # 4 KiB chunks: the cache records a blob's chunks on disk every 256 puts, so that with ~1700 chunks
    # in layer 0 a kill finds a blob partly recorded; the bandwidth cap keeps prefetch slow enough to
    # be caught in the middle of it.
    ref = push_busybox(busybox_image, registry, tmp_path, "--chunk-size", "4KiB")
    layers = image_layers(ref, plain_http=True)
    total = sum(len(layer.tables.chunks) for layer in layers)
    mnt = tmp_path / "mnt"
    first = mount(ref, mnt, node, "--plain-http", "--prefetch-delay", "0", "--prefetch-bandwidth", "256KiB")

    def partly_recorded(present_by_layer: list[int]) -> bool:
        return any(0 < n < len(layer.tables.chunks) for n, layer in zip(present_by_layer, layers, strict=True))
    poll("prefetch recording part of a layer on disk",
         lambda: partly_recorded([len(cached_chunks(node, layer)[0]) for layer in layers]), timeout=DEADLINE)
    sigkill_daemon(node)

    # What the user sees first: the mount is dead, and reads of it fail rather than hang.
    dead = read_file_in_child(mnt / "big" / "holes.bin")
    assert dead.returncode != 0, "a read through the killed daemon's mount returned data"
    assert "Input/output error" in dead.stderr or "not connected" in dead.stderr, dead.stderr

    # (a) Whatever the cache marks present holds the bytes of the chunk table; a layer is only partly there.
    present, bad = cache_census(node, layers)
    assert bad == {}, f"chunks marked present after the SIGKILL fail their sha256: {bad}"
    assert partly_recorded([len(cached_chunks(node, layer)[0]) for layer in layers]) and present < total, \
        f"{present} of {total} chunks present: prefetch was not caught in the middle of a layer"

    # The daemon starts again (as `dadi mount` starts it) and knows the view it had, with its dead mount.
    wait_until_fuse_is_dead(node)
    restart_daemon(node)
    restored = poll("the restarted daemon listing the view it had before the SIGKILL",
                    lambda: [v for v in views(node) if v["name"] == first["name"]], timeout=DEADLINE)
    assert restored[0]["mountpoint"] == str(mnt.resolve())
    dadi_cli("umount", "--force", str(mnt), "--root", str(node))
    assert not os.path.ismount(mnt), "dadi umount --force left the dead mount in place"
    assert not attached_to_view(first["loop"], first["name"]), \
        f"dadi umount --force left {first['loop']} attached to the dead view"

    # (b) Mounted again: the same tree as umoci unpack. (c) Prefetch completes and verifies every layer.
    mount(ref, mnt, node, "--plain-http", "--prefetch-delay", "0")
    assert_same_tree(busybox_rootfs, mnt)
    done = stats(mnt, node, "--wait-prefetch", str(DEADLINE))
    assert done["prefetch_state"] == "done"
    assert done["chunks_local"] == done["chunks_total"] == total
    assert done["layers_verified"] == done["layers_total"] == len(layers)
    assert done["read_errors"] == 0 and done["corrupt_chunks"] == 0
    present, bad = cache_census(node, layers)
    assert bad == {} and present == total


def test_mounting_again_straight_after_a_sigkill_leaves_no_dead_mount_behind(
        busybox_image, busybox_rootfs, registry, node, tmp_path):
    """What a user is most likely to do after the daemon died: run the same `dadi mount` again. It may
    refuse (and say to unmount first) or mount; either way `dadi umount` must then leave nothing."""
    ref = push_busybox(busybox_image, registry, tmp_path)
    mnt = tmp_path / "mnt"
    first = mount(ref, mnt, node, "--plain-http", "--no-prefetch")
    sigkill_daemon(node)
    wait_until_fuse_is_dead(node)

    again = dadi_cli("mount", ref, str(mnt), "--root", str(node), "--plain-http", "--no-prefetch", "--json",
                     check=False)
    if again.returncode != 0:
        log = (node / "daemon.log").read_text(errors="replace")[-3000:] if (node / "daemon.log").exists() else ""
        assert "umount" in again.stderr, f"dadi mount after a SIGKILL failed without saying what to do:\n" \
                                         f"{again.stderr}\n--- daemon.log (end) ---\n{log}"
        dadi_cli("umount", "--force", str(mnt), "--root", str(node))
        mount(ref, mnt, node, "--plain-http", "--no-prefetch")
    else:
        record_mount(node, json.loads(again.stdout))  # for the teardown, as mount() would
    assert_same_tree(busybox_rootfs, mnt)
    assert [v["name"] for v in views(node)] == [first["name"]]
    in_use = {b["digest"]: b["in_use"] for b in request(node, {"op": "cache"})["blobs"]}
    assert set(in_use.values()) == {1}, f"one view is mounted, but the cache counts more users: {in_use}"

    dadi_cli("umount", str(mnt), "--root", str(node))
    assert mount_count(mnt) == 0, f"{mnt} is still a mount point after dadi umount (a dead mount below?)"
    assert not attached_to_view(first["loop"], first["name"]), \
        f"{first['loop']} is still attached to the killed daemon's view after dadi umount"


def test_a_chunk_damaged_on_disk_between_runs_is_fetched_again_not_served(
        busybox_image, busybox_rootfs, registry, node, tmp_path):
    ref = push_busybox(busybox_image, registry, tmp_path)
    layers = image_layers(ref, plain_http=True)
    mnt = tmp_path / "mnt"
    mount(ref, mnt, node, "--plain-http", "--prefetch-delay", "0")
    assert stats(mnt, node, "--wait-prefetch", str(DEADLINE))["prefetch_state"] == "done"
    holding = chunks_holding(mnt / "bin" / "busybox", layers)
    damaged = sorted({holding[0], holding[-1]})  # the first and the last chunk of /bin/busybox's bytes
    dadi_cli("umount", str(mnt), "--root", str(node))
    stop_daemon(node)

    for layer_index, i in damaged:
        chunk = layers[layer_index].tables.chunks[i]
        with open(blob_dir(node, layers[layer_index].digest) / "data", "r+b") as f:
            f.seek(chunk.offset + chunk.length // 2)
            piece = f.read(16)
            f.seek(chunk.offset + chunk.length // 2)
            f.write(bytes(b ^ 0xFF for b in piece))
    for layer_index, i in damaged:  # the damage is real: still marked present, wrong bytes
        present, bad = cached_chunks(node, layers[layer_index])
        assert i in present and i in bad

    mount(ref, mnt, node, "--plain-http", "--no-prefetch")
    read = read_file_in_child(mnt / "bin" / "busybox")
    assert read.returncode == 0, read.stderr
    assert read.stdout.strip() == sha256_file(busybox_rootfs / "bin" / "busybox")
    after = stats(mnt, node)
    assert after["corrupt_chunks"] >= len(damaged), after
    damaged_bytes = sum(layers[li].tables.chunks[i].length for li, i in damaged)
    assert after["sources"].get("registry", 0) >= damaged_bytes, "the damaged chunks were not fetched again"
    assert after["read_errors"] == 0
    assert_same_tree(busybox_rootfs, mnt)
    dadi_cli("umount", str(mnt), "--root", str(node))  # flushes the cache's bitmaps
    for layer_index, i in damaged:
        present, bad = cached_chunks(node, layers[layer_index])
        assert i in present and i not in bad, f"layer {layer_index} chunk {i} was not cached again intact"


# --- 2. A source that lies -----------------------------------------------------------------------------


def chunk_data_regions(layers: list[Layer]) -> dict[str, tuple[int, int]]:
    """Per blob the bytes that are chunk data: header, tables and footer stay untouched, so that the
    mount itself (which checks the tables against the manifest) works and only chunks are at stake."""
    return {layer.digest: (HEADER_SIZE, layer.data_end) for layer in layers}


def test_a_source_that_corrupts_first_answers_is_caught_counted_and_the_tree_is_right(
        busybox_image, busybox_rootfs, registry, node, tmp_path):
    ref = push_busybox(busybox_image, registry, tmp_path)
    layers = image_layers(ref, plain_http=True)
    regions = chunk_data_regions(layers)

    def first_answer_per_range(digest, start, end, seen):
        low, high = regions.get(digest, (0, 0))
        # One byte in the middle of the answer: exactly one chunk of it goes bad.
        return [(start + end) // 2] if seen == 0 and low <= start and end <= high else []

    with CorruptingProxy(registry.host, first_answer_per_range) as proxy:
        mnt = tmp_path / "mnt"
        mount(f"docker://{proxy.host}/dadi/busybox:v1", mnt, node, "--plain-http", "--no-prefetch")
        assert_same_tree(busybox_rootfs, mnt)
        after = stats(mnt, node)
        assert proxy.flips, "the proxy corrupted nothing: the test proves nothing"
        assert after["read_errors"] == 0
        # The user can see what the source did: every corrupted answer cost exactly one chunk.
        assert after["corrupt_chunks"] == len(proxy.flips), (after["corrupt_chunks"], len(proxy.flips))
        present, bad = cache_census(node, layers)
        assert present > 0 and bad == {}, f"corrupt chunks reached the cache: {bad}"


def test_a_source_that_always_corrupts_some_chunks_gives_eio_never_wrong_bytes(
        busybox_image, busybox_rootfs, registry, node, tmp_path):
    ref = push_busybox(busybox_image, registry, tmp_path)
    layers = image_layers(ref, plain_http=True)
    with CorruptingProxy(registry.host) as proxy:
        mnt = tmp_path / "mnt"
        mount(f"docker://{proxy.host}/dadi/busybox:v1", mnt, node, "--plain-http", "--no-prefetch",
              "--io-timeout", "30")
        # Every answer holding a chunk of big/holes.bin now has a byte of each such chunk flipped.
        targets = {(layers[li].digest, i) for li, i in chunks_holding(mnt / "big" / "holes.bin", layers)}
        by_digest = {layer.digest: layer for layer in layers}

        def corrupt_targets(digest, start, end, seen):
            layer = by_digest.get(digest)
            if layer is None:
                return []
            return [c.offset + c.length // 2 for i, c in enumerate(layer.tables.chunks)
                    if (digest, i) in targets and start <= c.offset and c.offset + c.length <= end]
        proxy.policy = corrupt_targets

        outcomes = read_every_file(busybox_rootfs, mnt)
        wrong = {path: o for path, o in outcomes.items() if o not in ("ok", "EIO")}
        assert wrong == {}, f"reads that neither returned the right bytes nor failed with EIO: {wrong}"
        assert outcomes["big/holes.bin"] == "EIO"
        assert list(outcomes.values()).count("ok") > 0
        during = stats(mnt, node)
        assert during["corrupt_chunks"] == len(proxy.flips) > 0, (during["corrupt_chunks"], len(proxy.flips))
        assert during["read_errors"] > 0
        present, bad = cache_census(node, layers)
        assert bad == {}, f"corrupt chunks reached the cache: {bad}"

        # The source behaves again: the same reads now succeed, and the whole tree is right.
        proxy.policy = lambda digest, start, end, seen: []
        assert_same_tree(busybox_rootfs, mnt)


# --- 3. Many views -------------------------------------------------------------------------------------

VIEWS = 8


def test_eight_views_of_one_image_read_at_once_share_one_copy(
        busybox_image, busybox_rootfs, registry, node, tmp_path):
    ref = push_busybox(busybox_image, registry, tmp_path)
    layers = image_layers(ref, plain_http=True)
    dirs = [tmp_path / f"view-{n}" for n in range(VIEWS)]
    for n, directory in enumerate(dirs):
        mount(ref, directory, node, "--plain-http", "--no-prefetch", "--name", f"reader-{n}")
    readers = [subprocess.Popen([sys.executable, "-c", _COMPARE, str(TESTS), str(busybox_rootfs), str(d)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in dirs]
    results = []
    try:
        deadline = time.monotonic() + READ_TIMEOUT
        for reader in readers:
            out, err = reader.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert reader.returncode == 0, err
            results.append(json.loads(out))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{VIEWS} readers did not finish within {READ_TIMEOUT:.0f}s (hung read?)")
    finally:
        for reader in readers:
            if reader.poll() is None:
                reader.kill()
    for directory, differences in zip(dirs, results, strict=True):
        assert differences == [], f"{directory} differs from umoci unpack:\n" + "\n".join(differences[:50])

    per_view = [stats(d, node) for d in dirs]
    assert all(s["read_errors"] == 0 for s in per_view)
    chunk_bytes = sum(c.length for layer in layers for c in layer.tables.chunks)
    fetched = sum(per_view[0]["sources"].values())  # counted once for every view of this image source
    # About one image's worth crossed the network, not eight. (Not exactly one: a chunk another view
    # is fetching is shared, but one fetched and not yet stored in the cache is fetched again.)
    assert 0 < fetched < 2 * chunk_bytes, f"{fetched} bytes fetched for {VIEWS} views of {chunk_bytes} bytes of chunks"
    assert sum(s["bytes_on_demand"] for s in per_view) <= chunk_bytes
    cache = request(node, {"op": "cache"})
    assert sorted(b["digest"] for b in cache["blobs"]) == sorted(layer.digest for layer in layers)
    assert all(b["in_use"] == VIEWS for b in cache["blobs"])


# --- 4. Debian -----------------------------------------------------------------------------------------

DEBIAN_COMMANDS = (
    "dpkg -l | grep -c '^ii'; ls /usr/bin | wc -l; sha256sum /bin/bash /opt/app/bin/bash /usr/bin/dpkg; "
    "cat /etc/hostname /etc/debian_version; /usr/local/bin/app; bash -c 'echo $((6 * 7))'; "
    "test ! -e /etc/motd && echo no-motd; dpkg -L coreutils | wc -l"
)


@pytest.fixture(scope="module")
def debian_dadi(debian_image, tmp_path_factory):
    """The Debian test image as a dadi OCI layout, and its `umoci unpack`: (dadi ref, rootfs)."""
    from images import umoci_unpack

    layout, tag = debian_image
    out = tmp_path_factory.mktemp("debian-dadi")
    dadi_cli("convert", f"oci:{layout}:{tag}", f"oci:{out}/layout:dadi", "--cache-dir", str(out / "cache"), "-q")
    return f"oci:{out}/layout:dadi", umoci_unpack(layout, tag, out / "bundle")


@pytest.mark.slow
def test_debian_commands_run_in_a_lazy_chroot_as_in_the_unpacked_image(debian_dadi, node):
    ref, rootfs = debian_dadi
    run = dadi_cli("run", "--root", str(node), ref, "--", "/bin/sh", "-c", DEBIAN_COMMANDS, check=False)
    assert run.returncode == 0, run.stderr
    reference = subprocess.run(["chroot", str(rootfs), "/bin/sh", "-c", DEBIAN_COMMANDS],
                               capture_output=True, text=True, timeout=READ_TIMEOUT)
    assert reference.returncode == 0, reference.stderr
    assert run.stdout == reference.stdout
    lines = run.stdout.splitlines()
    assert int(lines[0]) > 0 and int(lines[1]) > 0, "dpkg or ls found nothing: the commands prove nothing"
    assert views(node) == [], "dadi run left its view behind"


@pytest.mark.slow
def test_a_lazy_mount_of_debian_is_the_same_tree_as_umoci_unpack(debian_dadi, node, tmp_path):
    ref, rootfs = debian_dadi
    mnt = tmp_path / "mnt"
    mount(ref, mnt, node, "--no-prefetch")
    assert_same_tree(rootfs, mnt)
    after = stats(mnt, node)
    assert after["read_errors"] == 0 and after["corrupt_chunks"] == 0
    assert 0 < after["bytes_on_demand"] <= after["bytes_total"]
