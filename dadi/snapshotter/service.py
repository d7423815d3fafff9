"""containerd's Snapshots gRPC service (containerd.services.snapshots.v1) over DadiSnapshotter.

Only translation lives here: requests -> calls, Snapshot -> Info, our errors -> gRPC status codes
(containerd maps those back onto its errdefs: NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION ...).
Every call is in namespace "" (see namespace_of).
"""

from __future__ import annotations

import functools
import logging

import grpc
from google.protobuf import empty_pb2

from dadi.errors import DadiError
from dadi.snapshotter.proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from dadi.snapshotter.snapshots import DadiSnapshotter, Mount
from dadi.snapshotter.store import Snapshot, SnapshotError

log = logging.getLogger(__name__)

NAMESPACE_HEADER = "containerd-namespace"

_CODES = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "exists": grpc.StatusCode.ALREADY_EXISTS,
    "precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
}


def namespace_of(context: grpc.ServicerContext) -> str:
    # One key space, whatever the header says: containerd's metadata layer already puts the namespace
    # into every key ("k8s.io/9/ID"), CRI's calls carry a NAMESPACE_HEADER but its garbage collector's
    # List and Remove carry none, so keying by the header hid CRI's snapshots from the collector.
    del context
    return ""


def _rpc(method):
    """Run one call; our errors become the status codes containerd understands, with their message."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        ns = namespace_of(context)
        if log.isEnabledFor(logging.DEBUG):  # `dadi snapshotter -v`: every call, on one line
            log.debug("%s ns=%r %s", method.__name__, ns, " ".join(str(request).split())[:600])
        try:
            return method(self, request, context, ns)
        except SnapshotError as e:
            if e.code != "exists":  # ALREADY_EXISTS is how remote layers answer: no news
                log.info("%s: %s", method.__name__, e)
            context.abort(_CODES[e.code], str(e))
        except DadiError as e:
            log.warning("%s failed: %s", method.__name__, e)
            context.abort(grpc.StatusCode.UNKNOWN, str(e))
        except Exception as e:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    return wrapper


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


def _info(snap: Snapshot) -> snapshots_pb2.Info:
    info = snapshots_pb2.Info(name=snap.key, parent=snap.parent, kind=snap.kind, labels=snap.labels)
    info.created_at.FromNanoseconds(int(snap.created * 1e9))
    info.updated_at.FromNanoseconds(int(snap.updated * 1e9))
    return info


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: DadiSnapshotter):
        self.sn = snapshotter

    @_rpc
    def Prepare(self, request, context, ns):
        mounts = self.sn.prepare(ns, request.key, request.parent, dict(request.labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_rpc
    def View(self, request, context, ns):
        mounts = self.sn.view(ns, request.key, request.parent, dict(request.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_rpc
    def Mounts(self, request, context, ns):
        return snapshots_pb2.MountsResponse(mounts=_mounts(self.sn.mounts(ns, request.key)))

    @_rpc
    def Commit(self, request, context, ns):
        self.sn.commit(ns, request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_rpc
    def Remove(self, request, context, ns):
        self.sn.remove(ns, request.key)
        return empty_pb2.Empty()

    @_rpc
    def Stat(self, request, context, ns):
        return snapshots_pb2.StatSnapshotResponse(info=_info(self.sn.stat(ns, request.key)))

    @_rpc
    def Update(self, request, context, ns):
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        snap = self.sn.update(ns, request.info.name, dict(request.info.labels), paths)
        return snapshots_pb2.UpdateSnapshotResponse(info=_info(snap))

    @_rpc
    def List(self, request, context, ns):
        snaps = self.sn.list(ns, list(request.filters))
        # containerd reads a stream of batches; 100 a message keeps each one small.
        return iter([snapshots_pb2.ListSnapshotsResponse(info=[_info(s) for s in snaps[i:i + 100]])
                     for i in range(0, len(snaps), 100)])

    @_rpc
    def Usage(self, request, context, ns):
        size, inodes = self.sn.usage(ns, request.key)
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    @_rpc
    def Cleanup(self, request, context, ns):
        self.sn.cleanup()
        return empty_pb2.Empty()
