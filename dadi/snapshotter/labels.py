"""Snapshot labels: which Prepare calls are dadi layers, and which image and layer they belong to.

containerd passes a layer descriptor's annotations under `containerd.io/snapshot/` into the labels of
the snapshot it prepares for that layer (and nothing else: see containerd's
snapshots.FilterInheritedLabels), plus `containerd.io/snapshot.ref`, the chain id it wants committed.
A dadi layer carries `containerd.io/snapshot/dadi/tables.digest` (docs/FORMAT.md). To mount it the
snapshotter also needs the image and the layer's digest, from one of two sources:

- `dadi pull`: `containerd.io/snapshot/dadi/image-ref` (`docker://HOST/REPO@sha256:MANIFEST`, pinned
  to the manifest) and `containerd.io/snapshot/dadi/layer.digest`;
- CRI (`disable_snapshot_annotations = false`): `containerd.io/snapshot/cri.image-ref`
  (`HOST/REPO:TAG`), `containerd.io/snapshot/cri.manifest-digest` and
  `containerd.io/snapshot/cri.layer-digest`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dadi.image import mediatypes as mt

TARGET = "containerd.io/snapshot.ref"
INHERITED_PREFIX = "containerd.io/snapshot/"
IMAGE_REF = mt.ANNOTATION_PREFIX + "image-ref"
LAYER_DIGEST = mt.ANNOTATION_PREFIX + "layer.digest"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"


class LabelError(ValueError):
    """A dadi layer's labels do not say enough to mount it."""


@dataclass(frozen=True)
class RemoteLayer:
    target: str  # the chain id containerd asked for (snapshot name to commit)
    layer: str  # the dadi layer blob's digest
    image: str  # docker://... reference the node daemon loads the manifest from

    def as_record(self) -> dict:
        return {"layer": self.layer, "image": self.image}


def is_dadi_layer(labels: dict[str, str]) -> bool:
    return mt.ANN_TABLES_DIGEST in labels


def image_reference(labels: dict[str, str]) -> str | None:
    """The image the layer belongs to, as the node daemon takes it (docker://, pinned when possible)."""
    ref = labels.get(IMAGE_REF)
    if ref:
        return ref if "://" in ref else "docker://" + ref
    ref = labels.get(CRI_IMAGE_REF)
    if not ref:
        return None
    ref = ref.removeprefix("docker://")
    manifest = labels.get(CRI_MANIFEST_DIGEST)
    if manifest and "@" not in ref:
        ref = f"{ref}@{manifest}"  # the tag may move; the manifest this layer came from may not
    return "docker://" + ref


def remote_layer(labels: dict[str, str]) -> RemoteLayer | None:
    """The remote layer these Prepare labels describe; None for an ordinary layer or a container.

    LabelError when the labels mark a dadi layer that cannot be mounted (no image or layer digest):
    containerd would download it and fail to apply it as a tar, so refusing is the clearer error.
    """
    target = labels.get(TARGET)
    if not target or not is_dadi_layer(labels):
        return None
    image = image_reference(labels)
    layer = labels.get(LAYER_DIGEST) or labels.get(CRI_LAYER_DIGEST)
    if not image or not layer:
        missing = " and ".join(name for name, value in (("image reference", image), ("layer digest", layer))
                               if not value)
        raise LabelError(
            f"layer {target} is a dadi layer but its labels carry no {missing} "
            f"({IMAGE_REF} / {LAYER_DIGEST}, or CRI's {CRI_IMAGE_REF} / {CRI_LAYER_DIGEST}): pull dadi "
            "images with `dadi pull`, or through CRI with disable_snapshot_annotations = false")
    return RemoteLayer(target, layer, image)
