"""The native read path (dadi.node.nativeviews, native/dadi_fastfs.c): read-only views are served from
the chunk cache by C threads, and everything else still goes through the Python read path. Real
daemon, FUSE, loop devices, ext4 and docker-registry."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import dadi_cli, poll
from mounthelpers import loop_backing_file, mount, stats
from test_mount_resilience import (
    DEADLINE,
    assert_same_tree,
    blob_dir,
    chunks_holding,
    image_layers,
    push_busybox,
    read_every_file,
    read_file_in_child,
    sha256_file,
    stop_daemon,
)

from dadi.node import loopdev
from dadi.node.nativeviews import READ_AHEAD_KB, read_ahead_path
from dadi.node.view import FAIL_FAST_SECONDS

pytestmark = pytest.mark.needs_root


def drop_page_cache() -> None:
    """So that reads reach the view instead of ext4's page cache."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def test_a_prefetched_view_is_read_natively_without_any_source(busybox_image, busybox_rootfs, registry, node,
                                                               tmp_path):
    ref = push_busybox(busybox_image, registry, tmp_path)
    mnt = tmp_path / "mnt"
    info = mount(ref, mnt, node, "--plain-http", "--prefetch-delay", "0")
    assert loop_backing_file(info["loop"]) == str(node / "native" / info["name"]), \
        "a read-only view's loop device is not attached to its file on the native file system"
    assert loopdev.direct_io(info["loop"]), "a view with chunks still to fetch must be read with direct I/O"
    done = stats(mnt, node, "--wait-prefetch", str(DEADLINE))
    assert done["prefetch_state"] == "done"
    assert done["page_cache"] and not loopdev.direct_io(info["loop"]), \
        "every chunk is local, yet the loop device still reads the view with direct I/O"
    assert read_ahead_path(node / "native").read_text().strip() == str(READ_AHEAD_KB), \
        "the native file system's read-ahead is the kernel's default, not the daemon's"
    before = done["native"]

    registry.stop()  # from now on a read that left the native path would fail
    drop_page_cache()
    outcomes = read_every_file(busybox_rootfs, mnt)
    assert {o for o in outcomes.values()} == {"ok"}, {p: o for p, o in outcomes.items() if o != "ok"}
    after = stats(mnt, node)
    assert after["native"]["fallbacks"] == before["fallbacks"], "a read of local chunks left the native path"
    assert after["native"]["reads_local"] > before["reads_local"]
    assert after["reads"] >= after["native"]["reads_local"] and after["read_errors"] == 0


def test_a_damaged_chunk_of_a_complete_view_read_through_the_page_cache_fails_with_eio_then_recovers(
        busybox_image, busybox_rootfs, registry, node, tmp_path):
    """Through the page cache the kernel reads ahead and retries a failed page by itself: a chunk that
    cannot be fetched must still end in EIO within about the io timeout, never in a reader stuck in D
    state, and be served again once a source is back."""
    ref = push_busybox(busybox_image, registry, tmp_path)
    layers = image_layers(ref, plain_http=True)
    mnt = tmp_path / "mnt"
    mount(ref, mnt, node, "--plain-http", "--prefetch-delay", "0")
    assert stats(mnt, node, "--wait-prefetch", str(DEADLINE))["page_cache"]
    holding = chunks_holding(mnt / "bin" / "busybox", layers)
    dadi_cli("umount", str(mnt), "--root", str(node))
    stop_daemon(node)  # and with it the verified chunks it keeps in memory
    layer_index, i = holding[len(holding) // 2]
    chunk = layers[layer_index].tables.chunks[i]
    with open(blob_dir(node, layers[layer_index].digest) / "data", "r+b") as f:  # damaged on disk
        f.seek(chunk.offset + chunk.length // 2)
        piece = f.read(16)
        f.seek(chunk.offset + chunk.length // 2)
        f.write(bytes(b ^ 0xFF for b in piece))

    # Mounted again on a complete cache: straight to the page cache, without waiting for a prefetch.
    info = mount(ref, mnt, node, "--plain-http", "--no-prefetch", "--io-timeout", "3")
    poll("the view to read through the page cache", lambda: stats(mnt, node)["page_cache"], DEADLINE)
    assert not loopdev.direct_io(info["loop"])
    registry.freeze()  # a registry that hangs: only the io timeout ends a fetch
    try:
        drop_page_cache()
        failed = read_file_in_child(mnt / "bin" / "busybox")  # fails the test if it takes DEADLINE
    finally:
        registry.thaw()
    assert failed.returncode != 0 and "Input/output error" in failed.stderr, failed
    after = stats(mnt, node)
    assert after["corrupt_chunks"] >= 1 and after["read_errors"] >= 1, after
    # The reader waited for the io timeout (3 s) once, not once more for each retry the kernel makes.
    assert after["io_timeouts"] == 1, after

    time.sleep(FAIL_FAST_SECONDS)  # a read this soon after the failure fails at once, by design
    drop_page_cache()
    read = read_file_in_child(mnt / "bin" / "busybox")
    assert read.returncode == 0, read.stderr
    assert read.stdout.strip() == sha256_file(busybox_rootfs / "bin" / "busybox")
    assert_same_tree(busybox_rootfs, mnt)


def test_reads_of_chunks_not_yet_local_are_fetched_through_the_python_path(busybox_image, busybox_rootfs,
                                                                         registry, node, tmp_path):
    ref = push_busybox(busybox_image, registry, tmp_path)
    mnt = tmp_path / "mnt"
    mount(ref, mnt, node, "--plain-http", "--no-prefetch")
    read = read_file_in_child(mnt / "bin" / "busybox")
    assert read.returncode == 0, read.stderr
    assert read.stdout.strip() == sha256_file(busybox_rootfs / "bin" / "busybox")
    after = stats(mnt, node)
    assert after["native"]["fallbacks"] > 0, "nothing was local, yet no read went to the Python path"
    assert after["bytes_on_demand"] > 0 and after["sources"].get("registry", 0) > 0
    # Read again from a cold page cache: now local, so answered natively.
    drop_page_cache()
    again = read_file_in_child(mnt / "bin" / "busybox")
    assert again.returncode == 0 and again.stdout == read.stdout
    final = stats(mnt, node)
    assert final["native"]["reads_local"] > after["native"]["reads_local"]
    assert final["read_errors"] == 0


def test_an_unreachable_registry_fails_native_reads_with_eio_and_they_recover(busybox_image, busybox_rootfs,
                                                                            registry, node, tmp_path):
    ref = push_busybox(busybox_image, registry, tmp_path)
    mnt = tmp_path / "mnt"
    mount(ref, mnt, node, "--plain-http", "--no-prefetch", "--io-timeout", "3")
    registry.stop()
    drop_page_cache()
    failed = read_file_in_child(mnt / "bin" / "busybox")
    assert failed.returncode != 0 and "Input/output error" in failed.stderr, failed
    assert stats(mnt, node)["read_errors"] > 0
    registry.start()
    time.sleep(FAIL_FAST_SECONDS)  # a read this soon after a failed one fails at once, by design
    drop_page_cache()
    read = read_file_in_child(mnt / "bin" / "busybox")
    assert read.returncode == 0, read.stderr
    assert read.stdout.strip() == sha256_file(busybox_rootfs / "bin" / "busybox")


def test_writable_views_views_recording_a_trace_and_a_disabled_config_use_the_python_path(
        busybox_image, busybox_rootfs, registry, node, tmp_path):
    ref = push_busybox(busybox_image, registry, tmp_path)
    rw = mount(ref, tmp_path / "rw", node, "--plain-http", "--no-prefetch", "--rw")
    tracing = mount(ref, tmp_path / "trace", node, "--plain-http", "--no-prefetch",
                    "--record-trace", str(tmp_path / "app.trace"))
    for info in (rw, tracing):
        assert loop_backing_file(info["loop"]) == str(node / "fs" / info["name"])
        assert stats(Path(info["mountpoint"]), node)["native"] is None
    assert_same_tree(busybox_rootfs, tmp_path / "trace")
    for info in (rw, tracing):
        dadi_cli("umount", info["mountpoint"], "--root", str(node))

    # native_reads = false: a daemon started on a root with that setting serves every view from Python.
    other = tmp_path / "root-python-only"
    other.mkdir()
    (other / "daemon.toml").write_text("native_reads = false\n")
    plain = mount(ref, tmp_path / "plain", other, "--plain-http", "--no-prefetch")
    assert loop_backing_file(plain["loop"]) == str(other / "fs" / plain["name"])
    assert stats(tmp_path / "plain", other)["native"] is None
    assert_same_tree(busybox_rootfs, tmp_path / "plain")
    dadi_cli("umount", str(tmp_path / "plain"), "--root", str(other))
    from mounthelpers import cleanup_node

    cleanup_node(other, tmp_path)
