"""Node daemon features beyond the read path: read-ahead, the cache quota and `dadi gc`, the config
file, the prefetch bandwidth cap and the on-demand gate. Real daemon, FUSE, loop and ext4 where a
mount is involved; trio's virtual clock for the pacing arithmetic (no wall-clock limits)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import dadi_cli
from mounthelpers import mount, stats

from dadi.errors import DadiError
from dadi.node.config import DaemonConfig, load_config
from dadi.node.prefetch import OnDemandGate, Pacer


@pytest.fixture(scope="module")
def two_images(busybox_image, tmp_path_factory):
    """The busybox image converted twice with different chunk sizes: two images sharing no blob."""
    layout, tag = busybox_image
    out = tmp_path_factory.mktemp("two-images")
    refs = []
    for chunk in ("64KiB", "16KiB"):
        dadi_cli("convert", f"oci:{layout}:{tag}", f"oci:{out}:c{chunk}", "--chunk-size", chunk,
                 "--cache-dir", str(out / f"cache-{chunk}"), "-q")
        refs.append(f"oci:{out}:c{chunk}")
    return refs


def cache_info(root) -> dict:
    from dadi.node.control import request

    return request(root, {"op": "cache"})


@pytest.mark.needs_root
def test_a_file_read_from_start_to_end_is_fetched_ahead_of_its_reads(two_images, node, tmp_path):
    mnt = tmp_path / "mnt"
    # The loop device's read-ahead at 128 KiB and reads of 64 KiB: the view sees a sequence of reads. With
    # the default 512 KiB and one read() of the whole file, the kernel may send the file in one or two
    # merged requests, and a view that saw no sequence rightly reads nothing ahead (this test flaked so).
    # busybox (~2 MiB) stands in for a big file: no file comes whole with its first miss here.
    node.mkdir(parents=True, exist_ok=True)
    (node / "daemon.toml").write_text('whole_file_max = "0"\n')
    mount(two_images[0], mnt, node, "--no-prefetch", "--read-ahead", "128KiB")
    before = stats(mnt, node)
    with open(mnt / "bin" / "busybox", "rb") as f:  # ~2 MiB of code, read from start to end
        data = b"".join(iter(lambda: f.read(64 << 10), b""))
    assert data == Path("/bin/busybox").read_bytes()
    # Read-ahead runs beside the reads and goes on after the last one: wait for it to show.
    for _ in range(300):
        after = stats(mnt, node)
        if after["bytes_read_ahead"] > before["bytes_read_ahead"]:
            break
        time.sleep(0.1)
    assert after["bytes_read_ahead"] > before["bytes_read_ahead"]
    assert after["bytes_read_ahead"] <= after["bytes_on_demand"] <= after["bytes_total"]
    assert after["read_errors"] == 0


@pytest.mark.needs_root
def test_the_cache_quota_evicts_blobs_no_view_uses(two_images, node, tmp_path):
    first, second = two_images
    a, b = tmp_path / "a", tmp_path / "b"
    mount(first, a, node)
    assert stats(a, node, "--wait-prefetch", "120")["prefetch_state"] == "done"
    first_digests = {blob["digest"] for blob in cache_info(node)["blobs"]}
    dadi_cli("umount", str(a), "--root", str(node))
    # A quota of 1 byte: the first image's blobs (no view uses them now) go when the second is mounted.
    mount(second, b, node, "--cache-quota", "1")
    assert stats(b, node, "--wait-prefetch", "120")["prefetch_state"] == "done"
    cached = {blob["digest"] for blob in cache_info(node)["blobs"]}
    assert cached and not cached & first_digests
    # Blobs in use are never evicted: the mounted view still reads everything.
    subprocess.run(["cat", str(b / "big" / "holes.bin")], check=True, capture_output=True)
    assert all(blob["in_use"] for blob in cache_info(node)["blobs"])


@pytest.mark.needs_root
def test_gc_removes_unused_blobs_and_a_later_mount_fetches_them_again(two_images, node, tmp_path):
    mnt = tmp_path / "mnt"
    mount(two_images[0], mnt, node)
    done = stats(mnt, node, "--wait-prefetch", "120")
    assert done["prefetch_state"] == "done"
    assert done["bytes_local"] == done["bytes_total"] and done["layers_verified"] == done["layers_total"]
    in_use = json.loads(dadi_cli("gc", "--root", str(node), "--json").stdout)
    assert in_use["removed"] == [] and in_use["usage"] > 0  # the mounted view's blobs stay
    dadi_cli("umount", str(mnt), "--root", str(node))
    result = json.loads(dadi_cli("gc", "--root", str(node), "--json").stdout)
    assert result["removed"] and result["freed"] > 0 and cache_info(node)["blobs"] == []
    mount(two_images[0], mnt, node)
    assert stats(mnt, node, "--wait-prefetch", "120")["prefetch_state"] == "done"
    assert cache_info(node)["blobs"] and all(blob["verified"] for blob in cache_info(node)["blobs"])


def test_gc_works_without_a_daemon(tmp_path):
    result = dadi_cli("gc", "--root", str(tmp_path / "root"), "--json")
    assert json.loads(result.stdout) == {"removed": [], "freed": 0, "usage": 0}


def test_the_config_file_sets_the_daemon_and_options_override_it(tmp_path):
    path = tmp_path / "daemon.toml"
    path.write_text('cache_quota = "2GiB"\nprefetch_bandwidth = "50MiB/s"\nprefetch_delay = 0.5\n'
                    'native_reads = false\n')
    config = load_config(path)
    assert config == DaemonConfig(cache_quota=2 << 30, prefetch_bandwidth=50 << 20, prefetch_delay=0.5,
                                  native_reads=False)
    assert config.with_overrides(cache_quota=1 << 20, prefetch_bandwidth=None).cache_quota == 1 << 20
    assert load_config(tmp_path / "absent.toml") == DaemonConfig()


@pytest.mark.parametrize("text, problem", [
    ("cache_qouta = 1\n", "unknown setting.*cache_qouta"),
    ('cache_quota = "lots"\n', "is not a size"),
    ('prefetch_delay = "soon"\n', "number of seconds"),
    ("prefetch_bandwidth = 0\n", "above 0"),
    ("cache_quota = \n", "daemon.toml"),
    ('native_reads = "yes"\n', "true or false"),
])
def test_a_bad_config_file_is_refused_with_what_is_wrong(tmp_path, text, problem):
    path = tmp_path / "daemon.toml"
    path.write_text(text)
    with pytest.raises(DadiError, match=problem):
        load_config(path)


def test_a_daemon_with_a_bad_config_file_says_so_and_does_not_start(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "daemon.toml").write_text("prefetch_bandwdith = 1\n")
    result = dadi_cli("daemon", "--root", str(root), check=False)
    assert result.returncode == 1 and "unknown setting" in result.stderr
    assert not (root / "control.sock").exists()


def test_the_pacer_holds_prefetch_to_its_rate():
    async def main():
        pacer = Pacer(rate=1 << 20)  # 1 MiB/s
        start = trio.current_time()
        for _ in range(8):
            await pacer.spend(256 << 10)  # 2 MiB in all
        # The first quarter goes at once; the other 1.75 MiB wait their turn: 1.75 s of virtual time.
        assert trio.current_time() - start == pytest.approx(1.75)
        unlimited = Pacer(None)
        before = trio.current_time()
        await unlimited.spend(1 << 30)
        assert trio.current_time() == before

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_prefetch_waits_while_reads_wait_on_the_network():
    async def main():
        gate = OnDemandGate()
        order = []

        async def read():
            with gate.busy():
                await trio.sleep(1)
                order.append("read done")

        async def prefetch():
            await trio.sleep(0.1)  # the read started first
            await gate.wait_idle()
            order.append("prefetch goes")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            nursery.start_soon(prefetch)
        assert order == ["read done", "prefetch goes"]
        await gate.wait_idle()  # idle: returns at once

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.needs_root
def test_run_rw_gives_a_writable_view_that_leaves_nothing_behind(two_images, node):
    ref = two_images[0]
    write = dadi_cli("run", "--root", str(node), "--rw", "--no-prefetch", ref, "--", "/bin/busybox", "sh", "-c",
                     "echo scratch > /etc/probe && cat /etc/probe", check=False)
    assert write.returncode == 0, write.stderr
    assert write.stdout == "scratch\n"
    assert list((node / "views").iterdir()) == []  # the writable layer went with the view
    again = dadi_cli("run", "--root", str(node), ref, "--", "/bin/busybox", "test", "-e", "/etc/probe", check=False)
    assert again.returncode == 1


@pytest.mark.needs_root
def test_the_daemon_serves_prometheus_metrics_of_what_it_fetched(two_images, node, tmp_path):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    from registry_server import free_port

    port = free_port()
    node.mkdir(parents=True, exist_ok=True)
    (node / "daemon.toml").write_text(f'metrics = "127.0.0.1:{port}"\n')
    mnt = tmp_path / "mnt"
    mount(two_images[0], mnt, node, "--no-prefetch", "--name", "m")
    (mnt / "bin" / "busybox").read_bytes()
    seen = stats(mnt, node)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("dadi_node_fetched_bytes_total", (("source", "local"),))] == seen["sources"]["local"] > 0
    assert samples[("dadi_node_chunks_local", (("view", "m"),))] == seen["chunks_local"]
    assert samples[("dadi_node_chunks_total", (("view", "m"),))] == seen["chunks_total"]
    assert samples[("dadi_node_chunk_misses_total", (("view", "m"),))] > 0
    assert samples[("dadi_node_prefetch_done", (("view", "m"),))] == 0


def test_the_read_hint_settings_come_from_the_config_file(tmp_path):
    path = tmp_path / "daemon.toml"
    path.write_text('whole_file_max = "512KiB"\nneighbour_window = "0"\nmetadata_first = false\n')
    policy = load_config(path).hint_policy()
    assert (policy.whole_file_max, policy.neighbour_window, policy.metadata_first) == (512 << 10, 0, False)
    path.write_text('metadata_first = "no"\n')
    with pytest.raises(DadiError, match="metadata_first must be true or false"):
        load_config(path)
