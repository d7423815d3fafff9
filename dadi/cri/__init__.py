"""A small client of the Kubernetes Container Runtime Interface (CRI, runtime.v1) over gRPC.

It speaks to a CRI runtime's socket (containerd's CRI plugin: /run/containerd/containerd.sock) the way
the kubelet does, so that tests and tools can pull images and run pods through the same calls a
Kubernetes node makes. The protocol definitions are our own subset of k8s.io/cri-api's api.proto
(dadi/cri/proto/api.proto, wire-compatible).
"""

from dadi.cri.client import CriClient, CriError, container_config, host_network_pod, read_cri_log

__all__ = ["CriClient", "CriError", "container_config", "host_network_pod", "read_cri_log"]
