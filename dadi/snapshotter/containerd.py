"""A client of containerd's own gRPC API (content, images, leases, snapshots), for `dadi pull`.

Every call carries the namespace ("containerd-namespace" metadata) and, inside `lease()`, the lease
("containerd-lease"), so that containerd's garbage collector keeps what is being written until the
image record refers to it.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2

from dadi.errors import DadiError
from dadi.snapshotter.proto import (
    content_pb2,
    content_pb2_grpc,
    descriptor_pb2,
    images_pb2,
    images_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    snapshots_pb2,
    snapshots_pb2_grpc,
)

TIMEOUT = 120.0  # seconds for one call; a Prepare may wait for the snapshotter's work
WRITE_CHUNK = 1 << 20
LEASE_EXPIRY = 3600  # seconds: a pull that dies leaves a lease that containerd drops after this


class ContainerdClient:
    def __init__(self, address: Path, namespace: str = "default"):
        self.address = Path(address)
        self.namespace = namespace
        self.channel = grpc.insecure_channel(f"unix://{self.address.resolve()}")
        self.content = content_pb2_grpc.ContentStub(self.channel)
        self.images = images_pb2_grpc.ImagesStub(self.channel)
        self.leases = leases_pb2_grpc.LeasesStub(self.channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(self.channel)
        self._lease: str | None = None

    def close(self) -> None:
        self.channel.close()

    def _metadata(self) -> list[tuple[str, str]]:
        meta = [("containerd-namespace", self.namespace)]
        if self._lease:
            meta.append(("containerd-lease", self._lease))
        return meta

    def call(self, method, request, what: str):
        try:
            return method(request, metadata=self._metadata(), timeout=TIMEOUT)
        except grpc.RpcError as e:
            raise ContainerdError(e.code(), f"containerd at {self.address}: {what}: {e.details()}") from None

    @contextlib.contextmanager
    def lease(self) -> Iterator[str]:
        expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + LEASE_EXPIRY))
        lease_id = f"dadi-pull-{secrets.token_hex(6)}"
        self.call(self.leases.Create, leases_pb2.CreateRequest(
            id=lease_id, labels={"containerd.io/gc.expire": expire}), "creating a lease")
        self._lease = lease_id
        try:
            yield lease_id
        finally:
            self._lease = None
            with contextlib.suppress(ContainerdError):
                self.call(self.leases.Delete, leases_pb2.DeleteRequest(id=lease_id), "deleting the lease")

    # -- content -------------------------------------------------------------------------------------

    def content_labels(self, digest: str) -> dict[str, str] | None:
        """The labels of blob `digest` in the content store, or None when it is not there."""
        try:
            reply = self.call(self.content.Info, content_pb2.InfoRequest(digest=digest), f"content {digest}")
        except ContainerdError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return dict(reply.info.labels)

    def put_content(self, digest: str, data: bytes, labels: dict[str, str]) -> bool:
        """Store `data` (which hashes to `digest`) with `labels` added; False when it was there already."""
        if self.content_labels(digest) is None:
            ref = f"dadi-pull-{digest}"

            def requests():
                for offset in range(0, max(len(data), 1), WRITE_CHUNK):
                    yield content_pb2.WriteContentRequest(
                        action=content_pb2.WRITE, ref=ref, total=len(data), expected=digest, offset=offset,
                        data=data[offset:offset + WRITE_CHUNK])
                yield content_pb2.WriteContentRequest(action=content_pb2.COMMIT, ref=ref, total=len(data),
                                                      expected=digest, offset=len(data), labels=labels)

            try:
                for _ in self.content.Write(requests(), metadata=self._metadata(), timeout=TIMEOUT):
                    pass
                return True
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.ALREADY_EXISTS:  # someone else wrote it meanwhile
                    raise ContainerdError(e.code(), f"containerd at {self.address}: writing {digest}: "
                                          f"{e.details()}") from None
        info = content_pb2.Info(digest=digest, labels=labels)
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        self.call(self.content.Update, content_pb2.UpdateRequest(info=info, update_mask=mask),
                  f"labelling {digest}")
        return False

    # -- images --------------------------------------------------------------------------------------

    def put_image(self, name: str, media_type: str, digest: str, size: int) -> bool:
        """Create or retarget image record `name`; True when it was created."""
        image = images_pb2.Image(name=name, target=descriptor_pb2.Descriptor(
            media_type=media_type, digest=digest, size=size))
        try:
            self.call(self.images.Create, images_pb2.CreateImageRequest(image=image), f"creating image {name}")
            return True
        except ContainerdError as e:
            if e.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
        mask = field_mask_pb2.FieldMask(paths=["target"])
        self.call(self.images.Update, images_pb2.UpdateImageRequest(image=image, update_mask=mask),
                  f"updating image {name}")
        return False

    # -- snapshots -----------------------------------------------------------------------------------

    def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        try:
            self.call(self.snapshots.Stat, snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key),
                      f"snapshot {key}")
            return True
        except ContainerdError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return False
            raise

    def prepare_remote(self, snapshotter: str, key: str, parent: str, labels: dict[str, str]) -> None:
        """Prepare a remote layer: the snapshotter must answer ALREADY_EXISTS (it recorded the target)."""
        request = snapshots_pb2.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent,
                                                       labels=labels)
        try:
            self.call(self.snapshots.Prepare, request, f"preparing {key} with snapshotter {snapshotter}")
        except ContainerdError as e:
            if e.code == grpc.StatusCode.ALREADY_EXISTS:
                return
            raise
        # It made an ordinary active snapshot: this snapshotter does not know dadi layers.
        with contextlib.suppress(ContainerdError):
            self.call(self.snapshots.Remove, snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key),
                      f"removing {key}")
        raise DadiError(f"snapshotter {snapshotter!r} of containerd at {self.address} did not take "
                        f"{labels.get('containerd.io/snapshot.ref')} as a remote dadi layer: is it "
                        "`dadi snapshotter` (proxy_plugins in containerd's config.toml)?")


class ContainerdError(DadiError):
    def __init__(self, code, message: str):
        super().__init__(message)
        self.code = code
