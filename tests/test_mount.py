"""dadi mount end to end: the real daemon, real FUSE, real loop devices and ext4, compared with umoci unpack."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from conftest import dadi_cli
from mounthelpers import mount, stats

from dadi.node.view import FAIL_FAST_SECONDS

pytestmark = pytest.mark.needs_root


@pytest.fixture(scope="module")
def dadi_busybox(busybox_image, tmp_path_factory):
    """The busybox test image converted into an OCI layout: (dadi ref, source layout, source tag)."""
    layout, tag = busybox_image
    out = tmp_path_factory.mktemp("dadi-busybox")
    dadi_cli("convert", f"oci:{layout}:{tag}", f"oci:{out}:dadi", "--cache-dir", str(out / "cache"), "-q")
    return f"oci:{out}:dadi", layout, tag


def test_lazy_mount_shows_the_same_tree_as_umoci_unpack(dadi_busybox, node, tmp_path):
    from images import umoci_unpack
    from treecompare import compare_trees

    ref, layout, tag = dadi_busybox
    mnt = tmp_path / "mnt"
    mount(ref, mnt, node, "--no-prefetch")
    expected = umoci_unpack(layout, tag, tmp_path / "bundle")
    differences = compare_trees(expected, mnt)
    assert differences == [], "lazy mount differs from umoci unpack:\n" + "\n".join(differences[:50])
    after = stats(mnt, node)
    assert after["prefetch_state"] == "disabled"
    assert after["reads"] > 0 and after["read_errors"] == 0
    assert 0 < after["bytes_on_demand"] <= after["bytes_total"]
    dadi_cli("umount", str(mnt), "--root", str(node))
    assert not os.path.ismount(mnt)


def test_prefetch_makes_every_chunk_local(dadi_busybox, node, tmp_path):
    ref, _, _ = dadi_busybox
    mnt = tmp_path / "mnt"
    mount(ref, mnt, node)
    assert subprocess.run([str(mnt / "bin" / "busybox"), "true"]).returncode == 0
    done = stats(mnt, node, "--wait-prefetch", "120")
    assert done["prefetch_state"] == "done"
    assert done["chunks_local"] == done["chunks_total"]
    assert done["bytes_prefetched"] > 0


def test_writable_views_persist_and_stay_private(dadi_busybox, node, tmp_path):
    ref, _, _ = dadi_busybox
    a, b = tmp_path / "a", tmp_path / "b"
    mount(ref, a, node, "--rw", "--name", "ctr-a", "--no-prefetch")
    mount(ref, b, node, "--rw", "--name", "ctr-b", "--no-prefetch")
    (a / "etc" / "written-by-a").write_text("hello from a\n")
    assert not (b / "etc" / "written-by-a").exists()
    dadi_cli("umount", str(a), "--root", str(node))
    mount(ref, a, node, "--rw", "--name", "ctr-a", "--no-prefetch")
    assert (a / "etc" / "written-by-a").read_text() == "hello from a\n"
    assert not (b / "etc" / "written-by-a").exists()


def test_run_returns_the_commands_exit_code(dadi_busybox, node):
    ref, _, _ = dadi_busybox
    result = dadi_cli("run", "--root", str(node), ref, "--", "/bin/busybox", "sh", "-c",
                      "cat /etc/hostname-probe 2>/dev/null; ls /proc/self >/dev/null && exit 7", check=False)
    assert result.returncode == 7, result.stderr



def test_a_registry_outage_fails_reads_with_eio_and_they_recover(busybox_image, registry, node, tmp_path):
    layout, tag = busybox_image
    ref = f"docker://{registry.host}/dadi/busybox:v1"
    dadi_cli("convert", f"oci:{layout}:{tag}", ref, "--plain-http", "--cache-dir", str(tmp_path / "c"), "-q")
    mnt = tmp_path / "mnt"
    mount(ref, mnt, node, "--plain-http", "--no-prefetch", "--io-timeout", "3")
    assert subprocess.run([str(mnt / "bin" / "busybox"), "true"]).returncode == 0
    registry.stop()
    # In a child process: if the read hung (D state), the test must fail, not hang with it.
    reader = subprocess.Popen(["python3", "-c", f"open({str(mnt / 'big' / 'holes.bin')!r}, 'rb').read()"],
                              stderr=subprocess.PIPE, text=True)
    try:
        _, err = reader.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a read of data that is not local hung while the registry was down")
    assert reader.returncode != 0 and "Input/output error" in err
    assert stats(mnt, node)["read_errors"] >= 1
    registry.start()
    time.sleep(FAIL_FAST_SECONDS)  # a read this soon after a failed one fails at once, by design
    assert len((mnt / "big" / "holes.bin").read_bytes()) == 4 * 1024 * 1024


def test_after_prefetch_the_tree_reads_without_the_registry(busybox_image, registry, node, tmp_path):
    from images import umoci_unpack
    from treecompare import compare_trees

    layout, tag = busybox_image
    ref = f"docker://{registry.host}/dadi/busybox:v1"
    dadi_cli("convert", f"oci:{layout}:{tag}", ref, "--plain-http", "--cache-dir", str(tmp_path / "c"), "-q")
    mnt = tmp_path / "mnt"
    mount(ref, mnt, node, "--plain-http", "--io-timeout", "3")
    assert stats(mnt, node, "--wait-prefetch", "120")["prefetch_state"] == "done"
    registry.stop()
    differences = compare_trees(umoci_unpack(layout, tag, tmp_path / "bundle"), mnt)
    assert differences == [], "\n".join(differences[:50])
    assert stats(mnt, node)["read_errors"] == 0
