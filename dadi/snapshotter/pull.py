"""`dadi pull --containerd SOCK IMAGE`: a dadi image into containerd without downloading its layers.

    registry: manifest + config (kilobytes)
    -> containerd content store: config (label gc.ref.snapshot.SNAPSHOTTER = top chain id) and manifest
       (labels gc.ref.content.config / .l.N), under a lease so the collector leaves them alone meanwhile
    -> for each layer, bottom first: Prepare("extract-... CHAINID", parent CHAINID-1) through containerd's
       snapshots service with the layer's annotations, snapshot.ref = CHAINID, and
       containerd.io/snapshot/dadi/image-ref (docker://HOST/REPO@MANIFEST) and .../dadi/layer.digest:
       the dadi snapshotter records a remote layer and answers ALREADY_EXISTS
    -> the image record NAME -> manifest (NAME = IMAGE without docker://, ":latest" when it has no tag)

Afterwards `ctr run --snapshotter dadi NAME ID CMD` finds the image unpacked and starts at once; the
node daemon fetches what the container reads. The chain of gc labels makes `ctr images rm` + gc
remove the snapshots again.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path

from dadi.digests import chain_ids
from dadi.errors import ImageError
from dadi.image import mediatypes as mt
from dadi.image.dadi_layers import require_dadi_image
from dadi.image.transports import RegistryOptions, open_source, parse_image_ref
from dadi.registry.reference import parse_registry_ref
from dadi.snapshotter import labels as lb
from dadi.snapshotter.containerd import ContainerdClient


def image_name(image: str) -> str:
    """containerd's name for IMAGE: the reference without docker://, with ":latest" if it has no tag."""
    text = image.removeprefix("docker://")
    parse_registry_ref(text)  # a clear error for a bad reference
    if "@" not in text and ":" not in text.rsplit("/", 1)[-1]:
        text += ":latest"
    return text


def pull(address: Path, image: str, *, namespace: str = "default", snapshotter: str = "dadi",
         plain_http: bool = False, authfile: str | None = None, platform: str = "linux/amd64",
         progress: Callable[[str], None] = lambda line: None) -> dict:
    started = time.monotonic()
    name = image_name(image)
    ref = parse_registry_ref(name)
    source = open_source(parse_image_ref("docker://" + name),
                         RegistryOptions(plain_http=plain_http, authfile=authfile, platform=platform))
    try:
        manifest = source.get_manifest()
        where = f"docker://{name}"
        require_dadi_image(manifest, where)
        config = source.get_config(manifest)
    finally:
        source.close()
    diff_ids = config.diff_ids
    if len(diff_ids) != len(manifest.layers):
        raise ImageError(f"{where}: {len(manifest.layers)} layers but {len(diff_ids)} rootfs.diff_ids")
    chains = chain_ids(diff_ids)
    pinned = f"docker://{ref.host}/{ref.repository}@{manifest.digest}"
    progress(f"{name}: manifest {manifest.digest}, {len(manifest.layers)} dadi layers")

    client = ContainerdClient(address, namespace)
    layers = []
    try:
        with client.lease():
            config_labels = {f"containerd.io/gc.ref.snapshot.{snapshotter}": chains[-1]} if chains else {}
            client.put_content(manifest.config.digest, config.raw, config_labels)
            manifest_labels = {"containerd.io/gc.ref.content.config": manifest.config.digest}
            manifest_labels.update({f"containerd.io/gc.ref.content.l.{i}": desc.digest
                                    for i, desc in enumerate(manifest.layers)})
            client.put_content(manifest.digest, manifest.raw, manifest_labels)
            for i, (desc, chain) in enumerate(zip(manifest.layers, chains, strict=True)):
                parent = chains[i - 1] if i else ""
                existed = client.snapshot_exists(snapshotter, chain)
                if not existed:
                    snap_labels = {k: v for k, v in desc.annotations.items() if k.startswith(lb.INHERITED_PREFIX)}
                    snap_labels.update({lb.TARGET: chain, lb.IMAGE_REF: pinned, lb.LAYER_DIGEST: desc.digest})
                    key = f"extract-{secrets.token_hex(8)} {chain}"
                    client.prepare_remote(snapshotter, key, parent, snap_labels)
                layers.append({"digest": desc.digest, "chain_id": chain, "size": desc.size,
                               "snapshot": "existed" if existed else "prepared"})
                progress(f"{name}: layer {i + 1}/{len(chains)} {desc.digest[:19]} "
                         f"{'already there' if existed else 'remote snapshot ' + chain[:19]}")
            created = client.put_image(name, manifest.media_type or mt.OCI_MANIFEST, manifest.digest,
                                       len(manifest.raw))
    finally:
        client.close()
    progress(f"{name}: image {'created' if created else 'updated'} in containerd ({namespace})")
    return {
        "image": name, "namespace": namespace, "snapshotter": snapshotter, "manifest": manifest.digest,
        "config": manifest.config.digest, "reference": pinned, "layers": layers,
        "bytes_fetched": len(manifest.raw) + len(config.raw), "image_created": created,
        "seconds": round(time.monotonic() - started, 3),
    }
