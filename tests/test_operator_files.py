"""The files operators install: systemd units (tools/systemd), Kubernetes manifests (tools/k8s) and the
config stanzas of docs/CONTAINERD.md. Every `dadi ...` command line in them is parsed by the real click
command; paths, ports and socket addresses must agree between the units, the manifests and the doc;
`systemd-analyze verify` judges the units where it is installed."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import click
import pytest
import yaml

from dadi.cli import main as dadi_main

REPO = Path(__file__).resolve().parent.parent
UNITS = sorted((REPO / "tools" / "systemd").glob("*.service"))
MANIFESTS = sorted((REPO / "tools" / "k8s").glob("*.yaml"))
CONTAINERD_MD = REPO / "docs" / "CONTAINERD.md"
INSTALLED_DADI = "/usr/local/bin/dadi"

# kind -> apiVersion, as the Kubernetes API serves them today.
API_VERSIONS = {"Namespace": "v1", "Service": "v1", "DaemonSet": "apps/v1", "Deployment": "apps/v1", "Job": "batch/v1"}
POD_TEMPLATE_KINDS = {"DaemonSet", "Deployment", "Job"}
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # DNS-1123 label


# --- helpers ---------------------------------------------------------------------------------------


def unit_sections(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values]}} (keys may repeat; comments and blanks skipped)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif "=" in line and current is not None:
            key, value = line.split("=", 1)
            current.setdefault(key.strip(), []).append(value.strip())
        else:
            raise AssertionError(f"{path.name}:{number}: not a unit line: {line!r}")
    return sections


def parse_dadi(argv: list[str], where: str) -> click.Context:
    """argv (`dadi SUBCOMMAND ...`) parsed by the real click command, as the CLI would parse it."""
    assert argv and Path(argv[0]).name == "dadi", f"{where}: not a dadi command: {argv}"
    assert len(argv) > 1 and argv[1] in dadi_main.commands, f"{where}: no such dadi command: {argv[1:2]}"
    command = dadi_main.commands[argv[1]]
    try:
        return command.make_context(f"dadi {argv[1]}", list(argv[2:]))
    except click.ClickException as e:
        raise AssertionError(f"{where}: `{shlex.join(argv)}` does not parse: {e.format_message()}") from None


def unit_command(name: str) -> click.Context:
    path = REPO / "tools" / "systemd" / name
    (exec_start,) = unit_sections(path)["Service"]["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED_DADI, f"{name}: ExecStart runs {argv[0]}, not {INSTALLED_DADI}"
    return parse_dadi(argv, name)


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def find(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


def container_command(container: dict, where: str) -> click.Context:
    return parse_dadi([*container["command"], *container.get("args", [])], f"{where} container {container['name']}")


def toml_blocks(text: str) -> list[dict]:
    return [tomllib.loads(block) for block in re.findall(r"```toml\n(.*?)```", text, re.S)]


# --- systemd units ---------------------------------------------------------------------------------


def test_there_is_a_unit_for_each_long_running_command():
    assert [p.name for p in UNITS] == ["dadi-daemon.service", "dadi-snapshotter.service", "dadi-supernode.service"]
    assert unit_command("dadi-daemon.service").command.name == "daemon"
    assert unit_command("dadi-snapshotter.service").command.name == "snapshotter"
    assert unit_command("dadi-supernode.service").command.name == "supernode"


def test_the_snapshotter_unit_comes_up_before_containerd_and_uses_the_daemons_root():
    unit = unit_sections(REPO / "tools" / "systemd" / "dadi-snapshotter.service")
    assert "containerd.service" in unit["Unit"]["Before"][0].split()
    assert "containerd.service" in unit["Install"]["RequiredBy"][0].split()
    assert "dadi-daemon.service" in unit["Unit"]["After"][0].split()
    # A node daemon the snapshotter started must outlive a snapshotter restart.
    assert unit["Service"]["KillMode"] == ["process"]
    snapshotter = unit_command("dadi-snapshotter.service").params
    assert snapshotter["daemon_root"] == unit_command("dadi-daemon.service").params["root"]
    # The socket directory is systemd's RuntimeDirectory, kept across restarts.
    assert Path(snapshotter["address"]).parent == Path("/run") / unit["Service"]["RuntimeDirectory"][0]
    assert unit["Service"]["RuntimeDirectoryPreserve"] == ["yes"]


def test_the_supernode_unit_caches_where_systemd_gives_it_a_directory():
    unit = unit_sections(REPO / "tools" / "systemd" / "dadi-supernode.service")
    params = unit_command("dadi-supernode.service").params
    assert Path(params["cache_dir"]) == Path("/var/cache") / unit["Service"]["CacheDirectory"][0]


def test_systemd_analyze_verifies_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: systemd)")
    # verify checks that ExecStart's binary exists: point the copies at this checkout's dadi.
    dadi = shutil.which("dadi", path=str(REPO / ".venv" / "bin"))
    assert dadi, "the venv's dadi (make install)"
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED_DADI, dadi))
    result = subprocess.run([analyze, "verify", *sorted(str(p) for p in tmp_path.iterdir())],
                            capture_output=True, text=True)
    # containerd.service may not exist on this machine; anything else is a finding.
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and "containerd.service" not in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


# --- Kubernetes manifests --------------------------------------------------------------------------


def test_manifests_are_kubernetes_objects():
    docs = manifests()
    assert {d["kind"] for _, d in docs} == {"Namespace", "DaemonSet", "Deployment", "Service", "Job"}
    for where, doc in docs:
        kind = doc["kind"]
        assert doc["apiVersion"] == API_VERSIONS[kind], f"{where}: {kind} is {API_VERSIONS[kind]}"
        assert NAME.match(doc["metadata"]["name"]), f"{where}: bad name {doc['metadata']['name']!r}"
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "dadi", where
            assert isinstance(doc["spec"], dict), where
        if kind in POD_TEMPLATE_KINDS:
            template = doc["spec"]["template"]
            pod = template["spec"]
            if kind != "Job":
                selector = doc["spec"]["selector"]["matchLabels"]
                assert selector.items() <= template["metadata"]["labels"].items(), f"{where}: selector misses pod"
            else:
                assert pod["restartPolicy"] in ("OnFailure", "Never"), f"{where}: a Job's pods must end"
            volumes = {v["name"] for v in pod.get("volumes", [])}
            for container in pod["containers"]:
                assert NAME.match(container["name"]) and container["image"], where
                assert container["command"][0] == "dadi", f"{where}: {container['name']} runs {container['command']}"
                mounts = {m["name"] for m in container.get("volumeMounts", [])}
                assert mounts <= volumes, f"{where}: {container['name']} mounts undeclared volumes {mounts - volumes}"
    assert find("Namespace", "dadi")


def test_every_dadi_command_in_the_manifests_parses():
    commands = {}
    for where, doc in manifests():
        if doc["kind"] in POD_TEMPLATE_KINDS:
            for container in containers(doc):
                commands[(doc["metadata"]["name"], container["name"])] = container_command(container, where)
    assert {k: c.command.name for k, c in commands.items()} == {
        ("dadi-node", "daemon"): "daemon", ("dadi-node", "snapshotter"): "snapshotter",
        ("dadi-supernode", "supernode"): "supernode", ("dadi-prewarm", "prewarm"): "prewarm"}


def test_the_node_daemonset_shares_its_paths_with_the_host_as_the_units_do():
    node = find("DaemonSet", "dadi-node")
    pod = node["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    by_name = {c["name"]: c for c in pod["containers"]}
    daemon = container_command(by_name["daemon"], "dadi-node").params
    snapshotter = container_command(by_name["snapshotter"], "dadi-node").params
    # The same paths as the systemd units: an operator can switch between the two.
    assert daemon["root"] == unit_command("dadi-daemon.service").params["root"]
    for key in ("root", "address", "daemon_root"):
        assert snapshotter[key] == unit_command("dadi-snapshotter.service").params[key], key

    def mount_of(container: dict, path: str) -> dict:
        """The volume mount a path lives under, checked to be the same path on the host."""
        for mount in container["volumeMounts"]:
            if path == mount["mountPath"] or path.startswith(mount["mountPath"] + "/"):
                assert host_paths[mount["name"]] == mount["mountPath"], f"{path}: not the host's own path"
                return mount
        raise AssertionError(f"{container['name']}: {path} is on no host volume")

    for container, path in ((by_name["daemon"], daemon["root"]), (by_name["snapshotter"], snapshotter["root"]),
                            (by_name["snapshotter"], snapshotter["daemon_root"])):
        # Views mounted in the container (FUSE, ext4 on loop devices) must show on the host, and back.
        assert mount_of(container, path)["mountPropagation"] == "Bidirectional", (container["name"], path)
    mount_of(by_name["snapshotter"], str(Path(snapshotter["address"]).parent))  # containerd reaches the socket
    for container in by_name.values():
        assert container["securityContext"]["privileged"] is True, container["name"]
        mount_of(container, "/dev/fuse")  # and the loop devices losetup creates


def test_the_supernode_service_reaches_the_deployment_and_the_prewarm_job_reaches_the_service():
    deployment = find("Deployment", "dadi-supernode")
    service = find("Service", "dadi-supernode")
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    listen = container_command(container, "dadi-supernode").params["listen"]
    port = int(listen.rsplit(":", 1)[1])
    assert listen.startswith("0.0.0.0:"), "a supernode in a pod must listen on every address"
    assert [p["containerPort"] for p in container["ports"]] == [port]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": port}, probe
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == port
    cache_dir = container_command(container, "dadi-supernode").params["cache_dir"]
    assert cache_dir in {m["mountPath"] for m in container["volumeMounts"]}

    (prewarm,) = containers(find("Job", "dadi-prewarm"))
    url = container_command(prewarm, "dadi-prewarm").params["supernode"]
    svc = service["metadata"]
    assert url == f"http://{svc['name']}.{svc['namespace']}.svc:{service_port['port']}"


# --- docs/CONTAINERD.md ----------------------------------------------------------------------------


def test_the_documented_containerd_config_names_the_units_socket():
    blocks = toml_blocks(CONTAINERD_MD.read_text())
    config = blocks[0]
    assert config["version"] == 2
    plugin = config["proxy_plugins"]["dadi"]
    assert plugin["type"] == "snapshot"
    assert plugin["address"] == unit_command("dadi-snapshotter.service").params["address"]
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri == {"snapshotter": "dadi", "disable_snapshot_annotations": False}


def test_the_cri_test_runs_containerd_with_the_documented_stanza():
    from test_cri import CRI_CONFIG

    documented = toml_blocks(CONTAINERD_MD.read_text())[0]["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    tested = tomllib.loads(CRI_CONFIG.format(sandbox_image="x", runc_root="/r", cni_conf_dir="/c",
                                             registry_config_path="/p"))["plugins"]["io.containerd.grpc.v1.cri"]
    assert documented.items() <= tested["containerd"].items()
    assert "config_path" in tested["registry"]


def test_every_dadi_command_in_the_doc_parses():
    lines, fence = [], None
    for line in CONTAINERD_MD.read_text().splitlines():
        if line.strip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:]
        elif fence in ("sh", "") and line.strip().startswith("dadi "):
            lines.append(line.strip())
    assert lines, "CONTAINERD.md shows dadi commands"
    for line in lines:
        argv = shlex.split(line.split("#", 1)[0])
        # Usage lines write optional parts in brackets: drop those, parse the rest.
        argv = [a for a in argv if not a.startswith("[") and not a.endswith("]")]
        parse_dadi(argv, f"CONTAINERD.md: {line}")
