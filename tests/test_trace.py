"""Access traces: recorded by a real mount, stored beside the image, replayed by the next mount's prefetch."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import dadi_cli
from mounthelpers import mount, stats

from dadi.errors import ImageError
from dadi.image.transports import RegistryOptions, open_source, parse_image_ref
from dadi.node.trace import Trace, TraceRecorder, find_trace, trace_tag

pytestmark = pytest.mark.needs_root

LAYER_A = "sha256:" + "a" * 64
LAYER_B = "sha256:" + "b" * 64


def test_a_recorder_keeps_first_reads_in_order_until_its_time_is_up(tmp_path):
    now = [0.0]
    recorder = TraceRecorder(tmp_path / "t.json", [LAYER_A, LAYER_B], seconds=10, clock=lambda: now[0])
    recorder.record(LAYER_B, [3, 4])
    recorder.record(LAYER_A, [0])
    recorder.record(LAYER_B, [4, 5])  # 4 again: kept where it was first read
    now[0] = 11.0
    recorder.record(LAYER_A, [9])  # too late
    assert recorder.write() == 4
    trace = Trace.parse((tmp_path / "t.json").read_bytes(), "t.json")
    assert trace.chunks == ((1, 3), (1, 4), (0, 0), (1, 5))
    assert trace.chunks_of(LAYER_B, 5) == [3, 4]  # chunk 5 is past a 5-chunk layer: dropped
    assert trace.chunks_of("sha256:" + "c" * 64, 100) == []


def test_trace_prefetch_asks_for_few_ranges_first_needed_first():
    """What a node sends the registry for a trace: one range per run, joined over small gaps, and the
    run holding the container's first read goes first (it waits for it)."""
    from types import SimpleNamespace

    from dadi.node.prefetch import trace_runs

    chunks = [SimpleNamespace(length=100) for _ in range(40)]
    order = [30, 31, 0, 2, 3, 10, 20, 21, 14]  # 1 lies in a gap of one chunk; 14 is 4 past 10
    runs = trace_runs(order, chunks, missing=set(range(40)) - {21}, max_gap=2, max_bytes=300)
    assert runs == [[30, 31], [0, 1, 2], [3], [10], [20], [14]]
    # 21 is local already, so not asked for; 3 would make [0..3] 400 bytes, over the 300-byte cap
    assert 21 not in sum(runs, [])


@pytest.mark.parametrize("raw, problem", [
    (b"[]", "JSON object"),
    (b'{"mediaType": "text/plain", "layers": [], "chunks": []}', "not a dadi trace"),
    (json.dumps({"mediaType": "application/vnd.dadi.trace.v1+json", "layers": [LAYER_A],
                 "chunks": [[1, 0]]}).encode(), r"chunks\[0\]"),
    (json.dumps({"mediaType": "application/vnd.dadi.trace.v1+json", "layers": ["sha256:xyz"],
                 "chunks": []}).encode(), r"layers\[0\]"),
])
def test_a_broken_trace_is_refused_with_what_is_wrong(raw, problem):
    with pytest.raises(ImageError, match=problem):
        Trace.parse(raw, "trace.json")


def test_a_trace_recorded_by_one_mount_is_prefetched_first_by_the_next(busybox_image, registry, node, tmp_path):
    layout, tag = busybox_image
    ref = f"docker://{registry.host}/dadi/busybox:v1"
    dadi_cli("convert", f"oci:{layout}:{tag}", ref, "--plain-http", "--cache-dir", str(tmp_path / "c"), "-q")
    trace_file = tmp_path / "start.trace"
    first = tmp_path / "first"
    mount(ref, first, node, "--plain-http", "--no-prefetch", "--record-trace", str(trace_file),
          "--name", "recorder")
    assert subprocess.run([str(first / "bin" / "busybox"), "ls", "/"], capture_output=True).returncode == 0
    start_reads = stats(first, node)
    dadi_cli("umount", str(first), "--root", str(node))  # ends the recording and writes the file
    trace = Trace.parse(trace_file.read_bytes(), str(trace_file))
    assert 0 < len(trace.chunks) <= start_reads["chunks_total"]

    # No trace stored yet: a mount finds none.
    source = open_source(parse_image_ref(ref), RegistryOptions(plain_http=True))
    manifest = source.get_manifest()
    assert find_trace(parse_image_ref(ref), manifest, RegistryOptions(plain_http=True)) is None

    pushed = json.loads(dadi_cli("trace", "push", ref, str(trace_file), "--plain-http", "--json").stdout)
    assert pushed["chunks"] == len(trace.chunks)
    assert pushed["trace"].split("@")[0].endswith(":" + trace_tag(manifest.digest))
    assert find_trace(parse_image_ref(ref), manifest, RegistryOptions(plain_http=True)) == trace

    # A fresh node (empty cache), prefetch delayed far beyond the test: only the trace is fetched early.
    other = tmp_path / "other-root"
    second = tmp_path / "second"
    try:
        mount(ref, second, other, "--plain-http", "--prefetch-delay", "3600")
        for _ in range(300):
            after = stats(second, other)
            if after["trace_chunks"] is not None:
                break
            subprocess.run(["sleep", "0.1"])
        # trace_chunks: those of the trace still missing when its prefetch looked. The mount's own first
        # reads (ext4's superblock and tables) may have fetched one or two of them just before.
        assert 0.9 * len(trace.chunks) <= after["trace_chunks"] <= len(trace.chunks)
        assert after["chunks_local"] >= len(trace.chunks)
        assert after["bytes_prefetched"] > 0
        # The start's reads now find their chunks local: no read waits on the network (the mount's own
        # first reads may have raced the trace, and read-ahead may fetch past the trace: both excluded).
        assert subprocess.run([str(second / "bin" / "busybox"), "ls", "/"], capture_output=True).returncode == 0
        final = stats(second, other)
        assert final["bytes_on_demand"] - final["bytes_read_ahead"] == \
            after["bytes_on_demand"] - after["bytes_read_ahead"]
    finally:
        dadi_cli("umount", "--force", "--root", str(other), str(second), check=False)
        _stop_daemon(other)


def test_trace_push_refuses_a_trace_of_another_image(dadi_busybox_layout, tmp_path):
    ref = dadi_busybox_layout
    bogus = Trace((LAYER_A,), ((0, 0),), 30.0)
    path = tmp_path / "bogus.trace"
    path.write_bytes(bogus.to_json())
    result = dadi_cli("trace", "push", ref, str(path), check=False)
    assert result.returncode == 1 and "names none of" in result.stderr


def test_a_trace_pushed_into_an_oci_layout_is_found_there(dadi_busybox_layout, tmp_path):
    ref = dadi_busybox_layout
    source = open_source(parse_image_ref(ref))
    manifest = source.get_manifest()
    trace = Trace((manifest.layers[0].digest,), ((0, 0), (0, 1)), 30.0)
    path = tmp_path / "t.trace"
    path.write_bytes(trace.to_json())
    dadi_cli("trace", "push", ref, str(path))
    assert find_trace(parse_image_ref(ref), manifest, RegistryOptions()) == trace
    # The image itself is untouched: still the same manifest under its tag.
    assert open_source(parse_image_ref(ref)).get_manifest().digest == manifest.digest


@pytest.fixture
def dadi_busybox_layout(busybox_image, tmp_path):
    layout, tag = busybox_image
    out = tmp_path / "dadi-layout"
    dadi_cli("convert", f"oci:{layout}:{tag}", f"oci:{out}:dadi", "--cache-dir", str(tmp_path / "cache"), "-q")
    return f"oci:{out}:dadi"


def _stop_daemon(root):
    import os
    import signal
    import time

    from dadi.errors import DadiError
    from dadi.node.control import request

    try:
        pid = request(root, {"op": "ping"})["pid"]
    except DadiError:
        return
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
    subprocess.run(["umount", "-l", str(root / "fs")], capture_output=True)
