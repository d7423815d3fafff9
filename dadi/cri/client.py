"""CriClient: the CRI calls a kubelet makes to pull an image and run a pod, over a unix socket.

    with CriClient("/run/containerd/containerd.sock") as cri:
        image_ref = cri.pull_image("registry.local:5000/app:v1-dadi")
        pod = host_network_pod("app", uid="1")
        pod_id = cri.run_pod_sandbox(pod)
        cid = cri.create_container(pod_id, container_config("app", image_ref, ["/bin/sh", "-c", "echo hi"],
                                                            log_path="app.log"), pod)
        cri.start_container(cid)
        status = cri.wait_container_exited(cid, timeout=60)

Every failed call raises CriError naming the call and the runtime's message; nothing is retried (the
runtime's answers are final). The config helpers build what the kubelet would send for the common case
(host network, so no CNI plugin is needed), and leave the full protobuf messages to callers who need more.
"""

from __future__ import annotations

import time

import grpc

from dadi.cri.proto import api_pb2 as api
from dadi.cri.proto import api_pb2_grpc as api_grpc
from dadi.errors import DadiError

DEFAULT_TIMEOUT = 60.0  # seconds per call; PullImage gets its own (an image can take minutes)
PULL_TIMEOUT = 600.0
POLL_INTERVAL = 0.1


class CriError(DadiError):
    """A CRI call failed: the runtime said no, or could not be reached."""

    def __init__(self, call: str, code: grpc.StatusCode | None, details: str):
        self.call, self.code, self.details = call, code, details
        name = code.name if code is not None else "error"
        super().__init__(f"CRI {call} failed ({name}): {details}")


def _target(address: str) -> str:
    """A socket path or a gRPC target ("unix:///run/...", "localhost:1234") -> a gRPC target."""
    return address if ":" in address.split("/", 1)[0] else f"unix://{address}"


class CriClient:
    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT):
        self.address = address
        self.timeout = timeout
        # The runtime's answers (ListImages of a busy node) can pass gRPC's 4 MiB default.
        self._channel = grpc.insecure_channel(_target(address), options=[
            ("grpc.max_receive_message_length", 64 << 20)])
        self.runtime = api_grpc.RuntimeServiceStub(self._channel)
        self.images = api_grpc.ImageServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, stub, name: str, request, timeout: float | None = None):
        try:
            return getattr(stub, name)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise CriError(name, e.code(), e.details() or str(e)) from None

    # --- runtime ------------------------------------------------------------------------------------

    def version(self) -> api.VersionResponse:
        return self._call(self.runtime, "Version", api.VersionRequest(version="v1"))

    def conditions(self) -> dict[str, api.RuntimeCondition]:
        """The runtime's conditions by type (RuntimeReady, NetworkReady)."""
        status = self._call(self.runtime, "Status", api.StatusRequest()).status
        return {c.type: c for c in status.conditions}

    def run_pod_sandbox(self, config: api.PodSandboxConfig, runtime_handler: str = "") -> str:
        return self._call(self.runtime, "RunPodSandbox",
                          api.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)).pod_sandbox_id

    def pod_sandbox_status(self, pod_id: str) -> api.PodSandboxStatus:
        return self._call(self.runtime, "PodSandboxStatus", api.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status

    def stop_pod_sandbox(self, pod_id: str) -> None:
        self._call(self.runtime, "StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_pod_sandbox(self, pod_id: str) -> None:
        self._call(self.runtime, "RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def create_container(self, pod_id: str, config: api.ContainerConfig, sandbox_config: api.PodSandboxConfig) -> str:
        request = api.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config)
        return self._call(self.runtime, "CreateContainer", request).container_id

    def start_container(self, container_id: str) -> None:
        self._call(self.runtime, "StartContainer", api.StartContainerRequest(container_id=container_id))

    def stop_container(self, container_id: str, timeout: int = 0) -> None:
        self._call(self.runtime, "StopContainer", api.StopContainerRequest(container_id=container_id, timeout=timeout))

    def remove_container(self, container_id: str) -> None:
        self._call(self.runtime, "RemoveContainer", api.RemoveContainerRequest(container_id=container_id))

    def container_status(self, container_id: str) -> api.ContainerStatus:
        return self._call(self.runtime, "ContainerStatus",
                          api.ContainerStatusRequest(container_id=container_id)).status

    def wait_container_exited(self, container_id: str, timeout: float) -> api.ContainerStatus:
        """Poll ContainerStatus until the container exited (CRI has no wait call); its final status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.container_status(container_id)
            if status.state == api.CONTAINER_EXITED:
                return status
            if time.monotonic() > deadline:
                raise CriError("ContainerStatus", None, f"container {container_id} still "
                               f"{api.ContainerState.Name(status.state)} after {timeout:g} s")
            time.sleep(POLL_INTERVAL)

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int = 30) -> api.ExecSyncResponse:
        """cmd run in the container; its exit code, stdout and stderr (bytes)."""
        request = api.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout)
        return self._call(self.runtime, "ExecSync", request, timeout=timeout + self.timeout)

    # --- images -------------------------------------------------------------------------------------

    def pull_image(self, image: str, *, auth: api.AuthConfig | None = None,
                   sandbox_config: api.PodSandboxConfig | None = None, timeout: float = PULL_TIMEOUT) -> str:
        """Pull image (a reference, as in a pod spec); the runtime's image reference (its image id)."""
        request = api.PullImageRequest(image=api.ImageSpec(image=image), auth=auth, sandbox_config=sandbox_config)
        return self._call(self.images, "PullImage", request, timeout=timeout).image_ref

    def image_status(self, image: str) -> api.Image | None:
        """The image, or None when the runtime does not have it."""
        response = self._call(self.images, "ImageStatus", api.ImageStatusRequest(image=api.ImageSpec(image=image)))
        return response.image if response.HasField("image") else None

    def list_images(self) -> list[api.Image]:
        return list(self._call(self.images, "ListImages", api.ListImagesRequest()).images)

    def remove_image(self, image: str) -> None:
        self._call(self.images, "RemoveImage", api.RemoveImageRequest(image=api.ImageSpec(image=image)))


# --- configs as the kubelet builds them -------------------------------------------------------------


def host_network_pod(name: str, *, uid: str, namespace: str = "default", log_directory: str = "",
                     labels: dict[str, str] | None = None) -> api.PodSandboxConfig:
    """A pod in the node's network namespace (hostNetwork: true): the runtime sets up no pod network, so
    it needs no CNI plugin. PID and IPC namespaces are the pod's own."""
    namespaces = api.NamespaceOption(network=api.NODE, pid=api.POD, ipc=api.POD)
    return api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
        log_directory=log_directory,
        labels=labels or {},
        linux=api.LinuxPodSandboxConfig(security_context=api.LinuxSandboxSecurityContext(
            namespace_options=namespaces)),
    )


def container_config(name: str, image: str, command: list[str], *, args: list[str] = (),
                     env: dict[str, str] | None = None, log_path: str = "", working_dir: str = "",
                     labels: dict[str, str] | None = None) -> api.ContainerConfig:
    """A container of a host-network pod (see host_network_pod) running command + args in image.

    log_path is relative to the pod's log_directory; the runtime writes the container's stdout and stderr
    there in the CRI log format (`TIMESTAMP stdout F line`)."""
    return api.ContainerConfig(
        metadata=api.ContainerMetadata(name=name, attempt=0),
        image=api.ImageSpec(image=image),
        command=list(command),
        args=list(args),
        working_dir=working_dir,
        envs=[api.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
        labels=labels or {},
        log_path=log_path,
        linux=api.LinuxContainerConfig(security_context=api.LinuxContainerSecurityContext(
            namespace_options=api.NamespaceOption(network=api.NODE, pid=api.POD, ipc=api.POD))),
    )


def read_cri_log(text: str) -> tuple[str, str]:
    """A CRI container log (`2024-01-01T00:00:00.000000000Z stdout F line`) -> (stdout, stderr).

    F marks a full line, P a part of a longer line (no newline after it)."""
    out = {"stdout": [], "stderr": []}
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 3 or parts[1] not in out:
            raise ValueError(f"not a CRI log line: {line!r}")
        content = parts[3] if len(parts) == 4 else ""
        out[parts[1]].append(content + ("\n" if parts[2] == "F" else ""))
    return "".join(out["stdout"]), "".join(out["stderr"])
