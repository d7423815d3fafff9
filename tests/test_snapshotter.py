"""dadi snapshotter and dadi pull: unit tests of the store, labels, filters and config, then the real thing:
Debian's containerd + runc with the documented proxy_plugins config, a real docker-registry, the node
daemon on real FUSE and loop devices (tests/containerd_helpers.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import dadi_cli, poll

from dadi.errors import DadiError
from dadi.image import mediatypes as mt
from dadi.snapshotter import filters
from dadi.snapshotter.config import SnapshotterConfig, load_config
from dadi.snapshotter.labels import LabelError, image_reference, remote_layer
from dadi.snapshotter.pull import image_name
from dadi.snapshotter.snapshots import DadiSnapshotter
from dadi.snapshotter.store import KIND_ACTIVE, KIND_COMMITTED, SnapshotError, Store

CHAIN0, CHAIN1 = "sha256:" + "a" * 64, "sha256:" + "b" * 64
LAYER0, LAYER1 = "sha256:" + "c" * 64, "sha256:" + "d" * 64
MANIFEST = "sha256:" + "e" * 64
REMOTE_LOOKUP = 'labels."containerd.io/snapshot.ref"=={target},parent=="{parent}"'


def dadi_labels(target: str, layer: str) -> dict[str, str]:
    """What `dadi pull` passes for a layer (a subset of the annotations is enough here)."""
    return {"containerd.io/snapshot.ref": target, mt.ANN_TABLES_DIGEST: "sha256:" + "f" * 64,
            "containerd.io/snapshot/dadi/image-ref": f"docker://reg.local/app@{MANIFEST}",
            "containerd.io/snapshot/dadi/layer.digest": layer}


# --- unit: labels, filters, config, store ------------------------------------------------------------


def test_dadi_pull_labels_make_a_remote_layer_pinned_to_the_manifest():
    layer = remote_layer(dadi_labels(CHAIN1, LAYER1))
    assert (layer.target, layer.layer, layer.image) == (CHAIN1, LAYER1, f"docker://reg.local/app@{MANIFEST}")


def test_cri_labels_are_pinned_to_the_manifest_the_layer_came_from():
    labels = {"containerd.io/snapshot.ref": CHAIN0, mt.ANN_TABLES_DIGEST: "sha256:" + "f" * 64,
              "containerd.io/snapshot/cri.image-ref": "reg.local:5000/app:v1",
              "containerd.io/snapshot/cri.manifest-digest": MANIFEST,
              "containerd.io/snapshot/cri.layer-digest": LAYER0}
    layer = remote_layer(labels)
    assert layer.image == f"docker://reg.local:5000/app:v1@{MANIFEST}" and layer.layer == LAYER0


def test_ordinary_layers_and_containers_are_not_remote():
    assert remote_layer({"containerd.io/snapshot.ref": CHAIN0}) is None  # an OCI layer containerd unpacks
    assert remote_layer({}) is None  # a container's snapshot
    assert image_reference({}) is None


def test_a_dadi_layer_without_its_image_is_refused_with_what_is_missing():
    labels = dadi_labels(CHAIN0, LAYER0)
    del labels["containerd.io/snapshot/dadi/image-ref"]
    with pytest.raises(LabelError, match="image reference") as info:
        remote_layer(labels)
    assert "dadi pull" in str(info.value) and CHAIN0 in str(info.value)


def test_the_filter_containerd_sends_for_remote_snapshots_selects_exactly_one():
    items = [{"name": "n1", "parent": "", "kind": "committed", "labels": {"containerd.io/snapshot.ref": CHAIN0}},
             {"name": "n2", "parent": "n1", "kind": "committed", "labels": {"containerd.io/snapshot.ref": CHAIN1}},
             {"name": "n3", "parent": "", "kind": "committed", "labels": {"containerd.io/snapshot.ref": CHAIN1}}]
    holds = filters.matcher([REMOTE_LOOKUP.format(target=CHAIN1, parent="n1")], lambda item: item)
    assert [i["name"] for i in items if holds(i)] == ["n2"]
    assert [i["name"] for i in items if filters.matcher(["kind==committed,name~=^n[12]$"], lambda x: x)(i)] == \
        ["n1", "n2"]
    assert all(filters.matcher(['labels."unterminated==x'], lambda x: x)(i) for i in items)  # beyond us: all


def test_config_file_settings_and_errors(tmp_path):
    path = tmp_path / "snapshotter.toml"
    path.write_text('rw_mode = "overlayfs"\ndaemon_root = "/srv/dadi"\nplain_http = true\nio_timeout = 5\n')
    config = load_config(path)
    assert (config.rw_mode, config.node_root, config.plain_http, config.io_timeout) == \
        ("overlayfs", Path("/srv/dadi"), True, 5.0)
    assert config.with_overrides(rw_mode="dev", plain_http=None).rw_mode == "dev"
    for text, message in (('rw_mode = "zfs"', "rw_mode = 'zfs'"), ("rw_mdoe = 'dev'", "unknown setting(s) rw_mdoe"),
                          ("plain_http = 'yes'", "not a boolean"), ("io_timeout = [", "")):
        path.write_text(text + "\n")
        with pytest.raises(DadiError, match=".*".join(map(_escape, (str(path), message)))):
            load_config(path)


def _escape(text: str) -> str:
    return re.escape(text)


def test_store_keeps_snapshots_across_a_restart(tmp_path):
    store = Store(tmp_path / "metadata.db")
    store.create("ns", CHAIN0, "", KIND_COMMITTED, {"a": "1"}, remote={"layer": LAYER0, "image": "docker://x"})
    active = store.create("ns", "ctr-1", CHAIN0, KIND_ACTIVE, {}, state={"mode": "dev"})
    store.set_state(active, {"mode": "dev", "loop": "/dev/loop7", "view": "v"})
    store.create("other", "ctr-1", "", KIND_ACTIVE, {})  # keys are per namespace
    with pytest.raises(SnapshotError, match="already exists"):
        store.create("ns", "ctr-1", "", KIND_ACTIVE, {})
    with pytest.raises(SnapshotError, match="does not exist"):
        store.create("ns", "ctr-2", "missing-parent", KIND_ACTIVE, {})
    with pytest.raises(SnapshotError, match="is not a committed"):
        store.create("ns", "ctr-3", "ctr-1", KIND_ACTIVE, {})
    store.close()

    store = Store(tmp_path / "metadata.db")
    snap = store.get("ns", "ctr-1")
    assert snap.state == {"mode": "dev", "loop": "/dev/loop7", "view": "v"}
    assert [p.key for p in store.parents(snap)] == [CHAIN0]
    assert store.get("ns", CHAIN0).remote == {"layer": LAYER0, "image": "docker://x"}
    with pytest.raises(SnapshotError, match="has children") as info:
        store.remove("ns", CHAIN0)
    assert info.value.code == "precondition"
    store.remove("ns", "ctr-1")
    store.remove("ns", CHAIN0)
    assert [s.key for s in store.list()] == ["ctr-1"] and store.list()[0].namespace == "other"


def test_ordinary_layers_mount_as_overlays_the_kernel_accepts(tmp_path):
    """The overlayfs-snapshotter path without containerd: bind for a base layer, overlay above it."""
    sn = DadiSnapshotter(tmp_path / "root", SnapshotterConfig(daemon_root=tmp_path / "node"))
    [base] = sn.prepare("", "extract-1", "", {"containerd.io/snapshot.ref": CHAIN0})
    assert base.type == "bind" and "rw" in base.options
    (Path(base.source) / "hello").write_text("from the base layer\n")
    sn.commit("", CHAIN0, "extract-1", {"containerd.io/snapshot.ref": CHAIN0})
    [top] = sn.prepare("", "container", CHAIN0, {})
    assert top.type == "overlay"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join(top.options), str(mnt)], check=True)
    try:
        assert (mnt / "hello").read_text() == "from the base layer\n"
        (mnt / "written").write_text("by the container\n")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert not (Path(base.source) / "written").exists(), "a container's write reached the committed layer"
    assert sn.usage("", "container")[0] > 0
    with pytest.raises(SnapshotError, match="has children"):
        sn.remove("", CHAIN0)
    sn.remove("", "container")
    sn.remove("", CHAIN0)
    assert list((tmp_path / "root" / "snapshots").iterdir()) == []


def test_remote_layers_answer_already_exists_and_survive_a_restart(tmp_path):
    sn = DadiSnapshotter(tmp_path / "root", SnapshotterConfig(daemon_root=tmp_path / "node"))
    for target, parent, layer in ((CHAIN0, "", LAYER0), (CHAIN1, CHAIN0, LAYER1)):
        with pytest.raises(SnapshotError, match="already exists") as info:
            sn.prepare("", f"extract-x {target}", parent, dadi_labels(target, layer))
        assert info.value.code == "exists"
    with pytest.raises(SnapshotError, match="already exists"):  # a second pull of the same image
        sn.prepare("", f"extract-y {CHAIN1}", CHAIN0, dadi_labels(CHAIN1, LAYER1))
    sn.close()

    sn = DadiSnapshotter(tmp_path / "root", SnapshotterConfig(daemon_root=tmp_path / "node"))
    found = sn.list("", [REMOTE_LOOKUP.format(target=CHAIN1, parent=CHAIN0)])
    assert [(s.key, s.kind, s.remote["layer"]) for s in found] == [(CHAIN1, KIND_COMMITTED, LAYER1)]
    assert sn.usage("", CHAIN1) == (0, 0), "a remote layer has nothing on local disk"
    assert sn.update("", CHAIN1, {"containerd.io/gc.root": "x"}, ["labels.containerd.io/gc.root"]).labels[
        "containerd.io/gc.root"] == "x"
    with pytest.raises(SnapshotError, match="only labels"):
        sn.update("", CHAIN1, {}, ["parent"])
    with pytest.raises(SnapshotError, match="does not exist"):
        sn.mounts("", "nope")


def test_generated_protocol_code_is_up_to_date():
    result = subprocess.run([sys.executable, "-m", "dadi.snapshotter.proto.generate", "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_image_names_are_what_ctr_run_takes():
    assert image_name("docker://reg.local:5000/app:v1") == "reg.local:5000/app:v1"
    assert image_name("reg.local:5000/app") == "reg.local:5000/app:latest"


# --- with containerd -----------------------------------------------------------------------------------

BUSYBOX_HOSTNAME = "dadi-test\n"  # /etc/hostname of the busybox test image


@pytest.fixture(scope="module")
def module_registry(tmp_path_factory):
    from registry_server import RegistryServer

    with RegistryServer(tmp_path_factory.mktemp("snapshotter-registry")) as server:
        yield server


@pytest.fixture(scope="module")
def busybox_ref(busybox_image, module_registry, tmp_path_factory):
    """The busybox test image converted into the registry: HOST:PORT/dadi/busybox:v1 (no docker://)."""
    layout, tag = busybox_image
    ref = f"{module_registry.host}/dadi/busybox:v1"
    cache = tmp_path_factory.mktemp("convert-cache")
    dadi_cli("convert", f"oci:{layout}:{tag}", f"docker://{ref}", "--plain-http", "--cache-dir", str(cache), "-q")
    return ref


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """containerd + dadi snapshotter (rw_mode dev) + node daemon root, shared by this module's tests
    (in this module it stands for mounthelpers' `node`, a bare daemon root: here a node is all three)."""
    from containerd_helpers import DadiContainerd

    with DadiContainerd(tmp_path_factory.mktemp("ctd")) as ctd:
        yield ctd


def pull(ctd, ref: str, *extra: str) -> dict:
    return json.loads(dadi_cli("pull", "--containerd", str(ctd.socket), "--plain-http", "--json", "-q",
                               *extra, ref).stdout)


def content_digests(ctd, *ns: str) -> set[str]:
    out = ctd.ctr(*ns, "content", "ls", "-q").stdout
    return set(out.split())


def daemon_views(ctd) -> list[dict]:
    if not (ctd.daemon_root / "control.sock").exists():
        return []
    return json.loads(dadi_cli("ls", "--root", str(ctd.daemon_root), "--json").stdout)


@pytest.mark.needs_root
def test_pull_then_run_reads_the_image_and_downloads_no_layer(node, busybox_ref):
    summary = pull(node, busybox_ref)
    assert summary["image"] == busybox_ref and len(summary["layers"]) == 5
    assert all(layer["snapshot"] == "prepared" for layer in summary["layers"])
    run = node.ctr("run", "--rm", "--snapshotter", "dadi", busybox_ref, "pull-run", "/bin/busybox", "cat",
                   "/etc/hostname")
    assert run.stdout == BUSYBOX_HOSTNAME
    # containerd holds the manifest and the config, and no layer blob: the node daemon read the data.
    assert content_digests(node) == {summary["manifest"], summary["config"]}
    assert pull(node, busybox_ref)["layers"][0]["snapshot"] == "existed"  # a second pull changes nothing


@pytest.mark.needs_root
def test_a_containers_writes_are_its_own(node, busybox_ref):
    pull(node, busybox_ref)
    first = node.ctr("run", "--snapshotter", "dadi", busybox_ref, "writer", "/bin/busybox", "sh", "-c",
                     "echo written > /etc/new-file && cat /etc/new-file")
    assert first.stdout == "written\n"
    second = node.ctr("run", "--rm", "--snapshotter", "dadi", busybox_ref, "reader", "/bin/busybox", "sh", "-c",
                      "cat /etc/new-file || echo absent", check=False)
    assert second.stdout.strip().endswith("absent"), second.stdout
    names = {v["name"] for v in daemon_views(node)}
    assert any(n.startswith("ctd-") for n in names), "the writer's container has a view in the daemon"
    node.ctr("containers", "delete", "writer")


@pytest.mark.needs_root
def test_the_snapshotter_restarts_under_a_running_container(node, busybox_ref):
    pull(node, busybox_ref)
    node.ctr("run", "-d", "--snapshotter", "dadi", busybox_ref, "looper", "/bin/busybox", "sh", "-c",
             "i=0; while true; do i=$((i+1)); echo $i >> /count; sleep 0.1; done")

    def lines() -> int:
        out = node.ctr("task", "exec", "--exec-id", f"e{time.monotonic_ns()}", "looper",
                       "/bin/busybox", "wc", "-l", "/count", check=False).stdout.split()
        return int(out[0]) if out else 0

    def mounts() -> str:
        return node.ctr("snapshots", "--snapshotter", "dadi", "mounts", "/target", "looper", check=False).stdout

    before = poll("the container writes", lines)
    mounted = mounts()
    assert mounted.startswith("mount -t ext4 /dev/loop") and "/target" in mounted, mounted
    node.snapshotter.kill()
    node.snapshotter.start()
    poll("the container goes on writing after the restart", lambda: lines() > before)
    # containerd's connection to the proxy comes back after gRPC's reconnect backoff (about a second).
    assert poll("containerd reaches the restarted snapshotter", mounts) == mounted
    info = node.ctr("snapshots", "--snapshotter", "dadi", "info", "looper").stdout
    assert json.loads(info)["Kind"] == "Active"
    node.ctr("task", "kill", "-s", "SIGKILL", "looper")
    node.wait_task_stopped("looper")
    node.ctr("task", "delete", "looper")
    node.ctr("containers", "delete", "looper")


@pytest.mark.needs_root
def test_removing_the_image_removes_its_snapshots_and_views(node, busybox_ref):
    ns = ("-n", "gc-test")
    pull(node, busybox_ref, "--namespace", "gc-test")
    node.ctr(*ns, "run", "--snapshotter", "dadi", busybox_ref, "gc-ctr", "/bin/busybox", "true")
    views_before = {v["name"] for v in daemon_views(node)}
    assert node.ctr(*ns, "snapshots", "--snapshotter", "dadi", "ls").stdout.count("\n") == 1 + 5 + 1
    node.ctr(*ns, "containers", "delete", "gc-ctr")
    node.ctr(*ns, "images", "rm", "--sync", busybox_ref)
    poll("containerd forgets the namespace's snapshots",
         lambda: node.ctr(*ns, "snapshots", "--snapshotter", "dadi", "ls").stdout.count("\n") <= 1)
    assert content_digests(node, *ns) == set()
    gone = poll("the container's view leaves the daemon",
                lambda: views_before - {v["name"] for v in daemon_views(node)})
    assert len(gone) == 1


@pytest.mark.needs_root
def test_an_ordinary_oci_image_runs_through_the_dadi_snapshotter(node, busybox_image, module_registry, tmp_path):
    # The busybox base layer and a layer of changes above it (the full busybox test image has a hardlink
    # to a file of a lower layer, which containerd's own overlayfs unpacking refuses as well).
    from imagebuilder import OCILayoutBuilder, TarBuilder, read_layout_image

    layout, tag = busybox_image
    base = read_layout_image(layout, tag).layer_tars()[0]
    plain = tmp_path / "plain"
    builder = OCILayoutBuilder(plain, "v1")
    builder.add_layer(base, compression="gzip")
    builder.add_layer(TarBuilder().file("etc/hostname", b"plain-image\n").whiteout("etc/group").build())
    builder.write()
    ref = f"{module_registry.host}/plain/busybox:v1"
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{plain}:v1", f"docker://{ref}"],
                   check=True, capture_output=True)
    node.ctr("images", "pull", "--plain-http", "--snapshotter", "dadi", ref)
    run = node.ctr("run", "--rm", "--snapshotter", "dadi", ref, "plain", "/bin/busybox", "sh", "-c",
                   "cat /etc/hostname; test -e /etc/group || echo no-group; echo x > /tmp/w && cat /tmp/w")
    assert run.stdout == "plain-image\nno-group\nx\n"
    snapshots = node.ctr("snapshots", "--snapshotter", "dadi", "ls").stdout
    committed = [line.split()[0] for line in snapshots.splitlines() if line.endswith("Committed ")
                 or line.split()[-1] == "Committed"]
    layer_dirs = [p for p in (node.snapshotter.root / "snapshots").iterdir() if (p / "fs" / "bin").exists()]
    assert len(layer_dirs) == 1 and len(committed) >= 2, "the base layer was unpacked into the snapshotter's root"


@pytest.mark.needs_root
def test_overlayfs_mode_from_the_config_file(busybox_ref, tmp_path):
    from containerd_helpers import DadiContainerd

    config = tmp_path / "snapshotter.toml"
    config.write_text('rw_mode = "overlayfs"\n')
    with DadiContainerd(tmp_path / "ctd", snapshotter_args=("--config", str(config))) as ctd:
        pull(ctd, busybox_ref)
        run = ctd.ctr("run", "--snapshotter", "dadi", busybox_ref, "ov1", "/bin/busybox", "sh", "-c",
                      "cat /etc/hostname; echo mine > /etc/new-file; cat /etc/new-file")
        assert run.stdout == BUSYBOX_HOSTNAME + "mine\n"
        other = ctd.ctr("run", "--rm", "--snapshotter", "dadi", busybox_ref, "ov2", "/bin/busybox", "sh", "-c",
                        "cat /etc/new-file || echo absent", check=False)
        assert other.stdout.strip().endswith("absent")
        upper = [p for p in (ctd.snapshotter.root / "snapshots").glob("*/fs/etc/new-file")]
        assert [p.read_text() for p in upper] == ["mine\n"], "the write lives in an overlay upper dir"
        lowers = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if str(ctd.snapshotter.root) in line.split()[4]]
        assert lowers and all(p.endswith("/lower") for p in lowers)
        ctd.ctr("containers", "delete", "ov1")


# --- Debian ---------------------------------------------------------------------------------------------

DEBIAN_COMMANDS = "cat /etc/hostname /etc/debian_version; /usr/local/bin/app; bash -c 'echo $((6 * 7))'"


@pytest.mark.slow
@pytest.mark.needs_root
def test_debian_through_dadi_pull_and_ctr_run(debian_image, module_registry, node, tmp_path):
    layout, tag = debian_image
    ref = f"{module_registry.host}/dadi/debian:v1"
    dadi_cli("convert", f"oci:{layout}:{tag}", f"docker://{ref}", "--plain-http",
             "--cache-dir", str(tmp_path / "cache"), "-q")
    summary = pull(node, ref)
    run = node.ctr("run", "--rm", "--snapshotter", "dadi", ref, "debian", "/bin/sh", "-c", DEBIAN_COMMANDS)
    lines = run.stdout.splitlines()
    assert lines[0] == "dadi-debian" and re.fullmatch(r"1\d(\.\d+)*", lines[1]), run.stdout  # bookworm: 12.x
    assert lines[2:] == ["app", "42"], run.stdout
    held = content_digests(node)
    assert {summary["manifest"], summary["config"]} <= held
    assert not {layer["digest"] for layer in summary["layers"]} & held, "containerd downloaded a layer"


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.needs_root
def test_pulling_an_ordinary_image_with_dadi_pull_is_refused_and_writes_nothing(node, busybox_image,
                                                                              module_registry):
    layout, tag = busybox_image
    ref = f"{module_registry.host}/not-dadi/busybox:v1"
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{ref}"],
                   check=True, capture_output=True)
    result = dadi_cli("pull", "--containerd", str(node.socket), "--plain-http", "-n", "refused", ref, check=False)
    assert result.returncode == 1
    assert "not a dadi image" in result.stderr and ref in result.stderr, result.stderr
    assert node.ctr("-n", "refused", "images", "ls", "-q").stdout == ""


@pytest.mark.needs_root
def test_dadi_pull_names_an_unreachable_containerd(tmp_path, busybox_ref):
    result = dadi_cli("pull", "--containerd", str(tmp_path / "no.sock"), "--plain-http", busybox_ref, check=False)
    assert result.returncode == 1
    assert f"containerd at {tmp_path / 'no.sock'}" in result.stderr, result.stderr


def test_the_snapshotter_refuses_a_bad_config_file(tmp_path):
    config = tmp_path / "snapshotter.toml"
    config.write_text('rw_mode = "devmapper"\n')
    result = dadi_cli("snapshotter", "--root", str(tmp_path / "root"), "--address", str(tmp_path / "s.sock"),
                      "--config", str(config), check=False)
    assert result.returncode == 1
    assert str(config) in result.stderr and "rw_mode" in result.stderr, result.stderr
    assert not (tmp_path / "s.sock").exists()



@pytest.mark.needs_root
def test_a_view_snapshot_is_a_read_only_dadi_view(node, busybox_ref, tmp_path):
    """Snapshots.View through containerd (what tools that inspect an image use): a read-only ext4 mount."""
    from dadi.snapshotter.containerd import ContainerdClient
    from dadi.snapshotter.proto import snapshots_pb2

    top = pull(node, busybox_ref)["layers"][-1]["chain_id"]
    client = ContainerdClient(node.socket)
    # In a lease, as ctr's snapshots are: containerd's garbage collector removes a snapshot nothing
    # references, and a collection set off by an earlier test's removals may come at any moment.
    try:
        with client.lease():
            reply = client.call(client.snapshots.View, snapshots_pb2.ViewSnapshotRequest(
                snapshotter="dadi", key="inspect-view", parent=top), "view")
            [mount] = reply.mounts
            assert mount.type == "ext4" and "ro" in mount.options
            target = tmp_path / "mnt"
            target.mkdir()
            subprocess.run(["mount", "-t", "ext4", "-o", ",".join(mount.options), mount.source, str(target)],
                           check=True)
            try:
                assert (target / "etc" / "hostname").read_text() == BUSYBOX_HOSTNAME
                assert any(not v["rw"] for v in daemon_views(node) if v["name"].startswith("ctd-"))
            finally:
                subprocess.run(["umount", str(target)], check=True)
            client.call(client.snapshots.Remove, snapshots_pb2.RemoveSnapshotRequest(
                snapshotter="dadi", key="inspect-view"), "remove")
    finally:
        client.close()
