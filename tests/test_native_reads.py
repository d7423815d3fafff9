"""The native read path (dadi.node.nativeviews, native/dadi_fastfs.c): read-only views are served from
the chunk cache by C threads, and everything else still goes through the Python read path. Real
daemon, FUSE, loop devices, ext4 and docker-registry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import dadi_cli
from mounthelpers import loop_backing_file, mount, stats
from test_mount_resilience import (
    DEADLINE,
    assert_same_tree,
    push_busybox,
    read_every_file,
    read_file_in_child,
    sha256_file,
)

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
    done = stats(mnt, node, "--wait-prefetch", str(DEADLINE))
    assert done["prefetch_state"] == "done"
    before = done["native"]

    registry.stop()  # from now on a read that left the native path would fail
    drop_page_cache()
    outcomes = read_every_file(busybox_rootfs, mnt)
    assert {o for o in outcomes.values()} == {"ok"}, {p: o for p, o in outcomes.items() if o != "ok"}
    after = stats(mnt, node)
    assert after["native"]["fallbacks"] == before["fallbacks"], "a read of local chunks left the native path"
    assert after["native"]["reads_local"] > before["reads_local"]
    assert after["reads"] >= after["native"]["reads_local"] and after["read_errors"] == 0


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
