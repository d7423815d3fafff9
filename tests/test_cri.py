"""The Kubernetes path: containerd's CRI plugin with `snapshotter = "dadi"` pulls dadi images lazily.

Real parts throughout: Debian's containerd 1.6 + runc with the CRI plugin configured as docs/CONTAINERD.md
says (CRI_CONFIG below), `dadi snapshotter` as its proxy plugin (tests/containerd_helpers.py), the node
daemon on FUSE and loop devices, a docker-registry, and our own CRI client (dadi/cri) making the calls a
kubelet makes. Pods use the node's network (hostNetwork), so no CNI plugin is involved. The sandbox
("pause") image is a busybox-static image built here with umoci: nothing comes from registry.k8s.io.

Every registry request goes through a recording proxy (tests/corrupting_proxy.py, changing nothing), so
the tests can tell which blobs containerd and the node daemon asked for, and how much of each.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conftest import dadi_cli, poll
from imagebuilder import OCILayoutBuilder, TarBuilder

from dadi.cri import CriClient, CriError, container_config, host_network_pod, read_cri_log
from dadi.cri.proto import api_pb2 as api
from dadi.image import mediatypes as mt

BUSYBOX = Path("/bin/busybox")
PAUSE_REPO = "k8s/pause:busybox"
BUSYBOX_MOTD = "built by tests/images.py\n"  # /etc/motd of the busybox test image
POLL_TIMEOUT = 60.0

# The CRI part of containerd's config.toml, as docs/CONTAINERD.md gives it; {placeholders} are per test.
CRI_CONFIG = """\
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "dadi"
    disable_snapshot_annotations = false
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc_root}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "{cni_conf_dir}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{registry_config_path}"
"""


# --- units ------------------------------------------------------------------------------------------


def test_generated_cri_code_is_up_to_date():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates dadi/cri/proto")
    result = subprocess.run([sys.executable, "-m", "dadi.cri.proto.generate", "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def test_the_protocol_keeps_cri_api_names_and_field_numbers():
    # What makes it wire-compatible with k8s.io/cri-api runtime.v1: spot checks of the calls used here.
    services = api.DESCRIPTOR.services_by_name
    assert services["ImageService"].full_name == "runtime.v1.ImageService"
    assert services["RuntimeService"].methods_by_name["RunPodSandbox"].input_type.name == "RunPodSandboxRequest"
    fields = {(m, f.name): f.number for m in ("PullImageRequest", "ContainerConfig", "ContainerStatus",
                                              "NamespaceOption", "LinuxPodSandboxConfig")
              for f in api.DESCRIPTOR.message_types_by_name[m].fields}
    assert fields[("PullImageRequest", "sandbox_config")] == 3
    assert fields[("ContainerConfig", "log_path")] == 11 and fields[("ContainerConfig", "linux")] == 15
    assert fields[("ContainerStatus", "exit_code")] == 7 and fields[("ContainerStatus", "log_path")] == 15
    assert fields[("NamespaceOption", "network")] == 1 and api.NODE == 2
    assert fields[("LinuxPodSandboxConfig", "security_context")] == 2


def test_cri_logs_are_split_into_stdout_and_stderr():
    text = ("2024-01-01T00:00:00.000000001Z stdout F hello world\n"
            "2024-01-01T00:00:00.000000002Z stderr F oops\n"
            "2024-01-01T00:00:00.000000003Z stdout P part \n"
            "2024-01-01T00:00:00.000000004Z stdout F two\n"
            "2024-01-01T00:00:00.000000005Z stdout F\n")
    assert read_cri_log(text) == ("hello world\npart two\n\n", "oops\n")
    with pytest.raises(ValueError, match="not a CRI log line: 'garbage'"):
        read_cri_log("garbage\n")


def test_an_unreachable_runtime_is_named(tmp_path):
    with CriClient(str(tmp_path / "no-such.sock"), timeout=5) as cri, pytest.raises(CriError) as caught:
        cri.version()
    assert caught.value.call == "Version" and caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "CRI Version failed (UNAVAILABLE)" in str(caught.value)


# --- with containerd's CRI plugin ----------------------------------------------------------------------


def build_pause_image(workdir: Path) -> tuple[Path, str]:
    """The pod sandbox image: busybox-static running `sleep` forever, built with umoci. (containerd's
    StopPodSandbox kills the sandbox with SIGKILL, so a pid 1 that ignores SIGTERM is fine.)"""
    layout, rootfs = workdir / "pause-oci", workdir / "pause-rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copyfile(BUSYBOX, rootfs / "bin" / "busybox")
    (rootfs / "bin" / "busybox").chmod(0o755)
    image = f"{layout}:pause"
    for argv in (["init", "--layout", layout], ["new", "--image", image],
                 ["config", "--image", image, "--config.entrypoint", "/bin/busybox",
                  "--config.entrypoint", "sleep", "--config.cmd", "2147483647"],
                 ["insert", "--image", image, rootfs, "/"]):
        subprocess.run(["umoci", *map(str, argv)], check=True, capture_output=True)
    return layout, "pause"


class CriNode:
    """containerd (CRI on, CRI_CONFIG) + dadi snapshotter + node daemon, reaching the registry through the
    recording proxy at `registry_host` (plain HTTP, from a hosts.toml under config_path)."""

    def __init__(self, directory: Path, registry_host: str):
        from containerd_helpers import DadiContainerd

        self.dir = directory
        self.registry_host = registry_host
        hosts = directory / "certs.d" / registry_host
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(f'server = "http://{registry_host}"\n\n[host."http://{registry_host}"]\n'
                                          '  capabilities = ["pull", "resolve"]\n')
        (directory / "cni").mkdir()  # empty: host-network pods need no CNI configuration
        config = CRI_CONFIG.format(sandbox_image=f"{registry_host}/{PAUSE_REPO}", runc_root=directory / "runc",
                                   cni_conf_dir=directory / "cni", registry_config_path=directory / "certs.d")
        self.ctd = DadiContainerd(directory / "ctd", cri=True, extra_config=config)
        self.cri: CriClient | None = None
        self.pods: list[str] = []

    def __enter__(self) -> CriNode:
        self.ctd.__enter__()
        try:
            self.cri = CriClient(str(self.ctd.socket))
            poll("the CRI plugin answers", lambda: _answers(self.cri))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            if self.cri is not None:
                for pod in self.pods:  # CRI's pods live in containerd namespace k8s.io: ours to remove
                    for call in (self.cri.stop_pod_sandbox, self.cri.remove_pod_sandbox):
                        try:
                            call(pod)
                        except CriError:
                            pass
                self.cri.close()
        finally:
            self.ctd.__exit__(*exc_info)

    def run_pod(self, name: str) -> tuple[str, api.PodSandboxConfig]:
        pod = host_network_pod(name, uid=f"uid-{name}", log_directory=str(self.dir / "pods" / name))
        pod_id = self.cri.run_pod_sandbox(pod)
        self.pods.append(pod_id)
        return pod_id, pod

    def remove_pod(self, pod_id: str) -> None:
        self.cri.stop_pod_sandbox(pod_id)
        self.cri.remove_pod_sandbox(pod_id)
        self.pods.remove(pod_id)

    def ctr(self, *args: str) -> str:
        return self.ctd.ctr("-n", "k8s.io", *args).stdout

    def views(self) -> list[dict]:
        if not (self.ctd.daemon_root / "control.sock").exists():
            return []
        return json.loads(dadi_cli("ls", "--root", str(self.ctd.daemon_root), "--json").stdout)


def _answers(cri: CriClient) -> bool:
    try:
        return cri.version().runtime_api_version == "v1"
    except CriError:
        return False


@pytest.fixture(scope="module")
def proxied_registry(tmp_path_factory):
    """A docker-registry and the recording proxy in front of it; images are pushed to the registry and
    pulled by the proxy's host name, so every pull shows in proxy.requests."""
    from corrupting_proxy import CorruptingProxy
    from registry_server import RegistryServer

    with RegistryServer(tmp_path_factory.mktemp("cri-registry")) as registry, CorruptingProxy(registry.host) as proxy:
        yield registry, proxy


@pytest.fixture(scope="module")
def cri_node(proxied_registry, tmp_path_factory):
    registry, proxy = proxied_registry
    work = tmp_path_factory.mktemp("cri")
    layout, tag = build_pause_image(work)
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
                    f"docker://{registry.host}/{PAUSE_REPO}"], check=True, capture_output=True)
    with CriNode(work / "node", proxy.host) as node:
        yield node


def push_dadi(image: tuple[Path, str], registry, repo: str, cache: Path) -> list[dict]:
    """Convert an OCI layout into the registry as a dadi image; its layers (digest, size)."""
    layout, tag = image
    summary = json.loads(dadi_cli("convert", f"oci:{layout}:{tag}", f"docker://{registry.host}/{repo}",
                                  "--plain-http", "--json", "-q", "--cache-dir", str(cache)).stdout)
    return [{"digest": layer["digest"], "size": layer["size"]} for layer in summary["layers"]]


def pull_lazily(node: CriNode, proxy, ref: str, layers: list[dict]) -> str:
    """CRI PullImage of a dadi image, checking that the registry sent no layer blob whole; the image id."""
    since = len(proxy.requests)
    image_id = node.cri.pull_image(ref)
    served = {layer["digest"]: 0 for layer in layers}  # body bytes sent per layer blob during the pull
    for method, path, _range, _status, size in proxy.requests[since:]:
        digest = path.rsplit("/blobs/", 1)[-1] if "/blobs/" in path else None
        if method == "GET" and digest in served:
            served[digest] += size
    assert all(served[layer["digest"]] < layer["size"] for layer in layers), \
        f"the registry sent a whole dadi layer during PullImage: {served}"
    return image_id


def run_to_exit(node: CriNode, pod_id: str, pod: api.PodSandboxConfig, name: str, image: str,
                command: list[str]) -> tuple[api.ContainerStatus, str, str]:
    """A container of the pod running command to its end; (status, stdout, stderr) from its CRI log."""
    config = container_config(name, image, command, log_path=f"{name}.log")
    container_id = node.cri.create_container(pod_id, config, pod)
    node.cri.start_container(container_id)
    status = node.cri.wait_container_exited(container_id, timeout=POLL_TIMEOUT)
    out, err = read_cri_log(Path(status.log_path).read_text())
    node.cri.remove_container(container_id)
    return status, out, err


@pytest.mark.needs_root
def test_cri_pulls_a_dadi_image_lazily_and_runs_pods_from_it(cri_node, proxied_registry, busybox_image, tmp_path):
    registry, proxy = proxied_registry
    layers = push_dadi(busybox_image, registry, "dadi/busybox:cri", tmp_path / "cache")
    ref = f"{proxy.host}/dadi/busybox:cri"

    image_id = pull_lazily(cri_node, proxy, ref, layers)
    held = set(cri_node.ctr("content", "ls", "-q").split())
    assert not held & {layer["digest"] for layer in layers}, "containerd stored a dadi layer blob"
    listed = {tag for image in cri_node.cri.list_images() for tag in image.repo_tags}
    image = cri_node.cri.image_status(ref)
    assert ref in listed and image.id == image_id

    pod_id, pod = cri_node.run_pod("lazy")
    assert cri_node.cri.pod_sandbox_status(pod_id).state == api.SANDBOX_READY  # the pause image: ordinary layers
    status, out, err = run_to_exit(cri_node, pod_id, pod, "app", ref, [
        "/bin/sh", "-c", "cat /etc/motd; echo written > /tmp/new; cat /tmp/new; echo to-stderr >&2; exit 3"])
    assert (status.exit_code, out, err) == (3, BUSYBOX_MOTD + "written\n", "to-stderr\n")
    assert status.reason == "Error" and status.image_ref in image.repo_digests  # pinned to the pulled manifest

    # A long-running container: its root is a view of the image in the node daemon, and ExecSync sees it.
    config = container_config("server", ref, ["/bin/sh", "-c", "echo up > /tmp/state; exec sleep 600"])
    server = cri_node.cri.create_container(pod_id, config, pod)
    cri_node.cri.start_container(server)
    poll("the server container runs", lambda: cri_node.cri.container_status(server).state == api.CONTAINER_RUNNING)
    result = poll("the server wrote its state",
                  lambda: (r := cri_node.cri.exec_sync(server, ["/bin/cat", "/tmp/state", "/etc/motd"])).exit_code
                  == 0 and r)
    assert result.stdout == b"up\n" + BUSYBOX_MOTD.encode()
    views = [v for v in cri_node.views() if v["image"].startswith(f"docker://{ref}")]
    assert views, f"no daemon view of {ref}: {cri_node.views()}"
    assert cri_node.cri.exec_sync(server, ["/bin/sh", "-c", "exit 7"]).exit_code == 7

    cri_node.remove_pod(pod_id)
    cri_node.cri.remove_image(ref)
    assert ref not in {tag for image in cri_node.cri.list_images() for tag in image.repo_tags}
    assert cri_node.cri.image_status(ref) is None


@pytest.mark.needs_root
def test_removing_the_pod_and_the_image_through_cri_removes_the_views(cri_node, proxied_registry, busybox_image,
                                                                     tmp_path):
    registry, proxy = proxied_registry
    push_dadi(busybox_image, registry, "dadi/busybox:gc", tmp_path / "cache")
    ref = f"{proxy.host}/dadi/busybox:gc"
    cri_node.cri.pull_image(ref)
    before = {v["name"] for v in cri_node.views()}
    pod_id, pod = cri_node.run_pod("gc")
    container_id = cri_node.cri.create_container(pod_id, container_config("gc", ref, ["/bin/true"]), pod)
    ours = {v["name"] for v in cri_node.views()} - before
    assert len(ours) == 1, f"the container's view: {cri_node.views()}"
    cri_node.cri.start_container(container_id)
    assert cri_node.cri.wait_container_exited(container_id, timeout=POLL_TIMEOUT).exit_code == 0
    cri_node.remove_pod(pod_id)  # removes the container too
    cri_node.cri.remove_image(ref)  # CRI deletes the last reference synchronously: containerd collects at once
    poll("the container's view leaves the daemon", lambda: not ours & {v["name"] for v in cri_node.views()},
         timeout=30)


@pytest.mark.needs_root
def test_a_dadi_layer_without_its_tables_fails_the_pull_with_the_reason(cri_node, proxied_registry, tmp_path):
    # A dadi media type without the tables annotation is no remote layer to the snapshotter: containerd
    # downloads it and cannot unpack it. CRI says why, and keeps no image record.
    registry, proxy = proxied_registry
    layout = tmp_path / "half-dadi"
    builder = OCILayoutBuilder(layout, "v1")
    builder.add_layer(TarBuilder().file("etc/motd", b"x\n").build(), compression="none")
    builder.write()
    index = json.loads((layout / "index.json").read_text())
    manifest_path = layout / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(manifest_path.read_text())
    manifest["layers"][0]["mediaType"] = mt.DADI_LAYER
    manifest["layers"][0]["annotations"] = {mt.ANN_TABLES_SIZE: "10"}  # no tables digest: not a dadi layer
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    index["manifests"][0].update(digest=f"sha256:{digest}", size=len(data))
    (layout / "index.json").write_text(json.dumps(index))
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:v1",
                    f"docker://{registry.host}/broken/layer:v1"], check=True, capture_output=True)
    ref = f"{proxy.host}/broken/layer:v1"
    with pytest.raises(CriError) as caught:
        cri_node.cri.pull_image(ref)
    assert caught.value.call == "PullImage" and "no processor for media-type" in caught.value.details, caught.value.details
    assert cri_node.cri.image_status(ref) is None


@pytest.mark.slow
@pytest.mark.needs_root
def test_debian_through_cri(cri_node, proxied_registry, debian_image, tmp_path):
    registry, proxy = proxied_registry
    layers = push_dadi(debian_image, registry, "dadi/debian:cri", tmp_path / "cache")
    ref = f"{proxy.host}/dadi/debian:cri"
    pull_lazily(cri_node, proxy, ref, layers)
    pod_id, pod = cri_node.run_pod("debian")
    status, out, _err = run_to_exit(cri_node, pod_id, pod, "debian", ref, [
        "/bin/sh", "-c", ". /etc/os-release && echo $VERSION_CODENAME && dpkg-query -W -f '${Package}\\n' dpkg"])
    assert (status.exit_code, out) == (0, "bookworm\ndpkg\n")
    cri_node.remove_pod(pod_id)
    cri_node.cri.remove_image(ref)
