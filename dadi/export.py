"""dadi export: flatten a dadi image into a sparse raw ext4 disk file (for fsck, loop mounts, debugging)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from dadi.errors import DadiError
from dadi.format.flatten import flatten
from dadi.image.base import ImageSource
from dadi.image.dadi_layers import load_layer_tables, require_dadi_image
from dadi.image.oci_layout import OCILayoutSource
from dadi.progress import Progress, human_bytes


def export_image(source: ImageSource, out_path: Path, progress: Progress) -> dict:
    started = time.monotonic()
    manifest = source.get_manifest()
    require_dadi_image(manifest, source.description)
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise DadiError(f"cannot export to {out_path}: directory {out_path.parent} does not exist")
    with contextlib.ExitStack() as stack:
        layers = []
        tmp_dir = None
        for i, desc in enumerate(manifest.layers):
            tables = load_layer_tables(source, desc)
            if isinstance(source, OCILayoutSource):
                blob = stack.enter_context(open(source.blob_file(desc), "rb"))
            else:
                # A remote blob is fetched whole (digest-checked) and read locally.
                if tmp_dir is None:
                    tmp_dir = stack.enter_context(tempfile.TemporaryDirectory(dir=out_path.parent))
                local = Path(tmp_dir) / f"layer-{i}"
                progress.start(f"fetch layer {i + 1}/{len(manifest.layers)} {desc.digest[7:19]}")
                with source.open_blob(desc, f"{source.description}: layer {desc.digest}") as stream, open(
                    local, "wb"
                ) as out:
                    while block := stream.read(1 << 20):
                        out.write(block)
                        progress.advance(len(block))
                progress.done(human_bytes(desc.size))
                blob = stack.enter_context(open(local, "rb"))
            layers.append((tables, blob))
        tmp_out = out_path.with_name(f".{out_path.name}.tmp")
        progress.start(f"export {len(layers)} layers to {out_path}")
        try:
            written = flatten(tmp_out, layers, progress=progress)
            os.replace(tmp_out, out_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_out)
            raise
        progress.done(f"{human_bytes(written)} of data on a {human_bytes(layers[0][0].disk_size)} disk")
    return {
        "image": source.description,
        "manifest_digest": manifest.digest,
        "output": str(out_path),
        "disk_size": layers[0][0].disk_size,
        "data_bytes": written,
        "layers": len(layers),
        "seconds": round(time.monotonic() - started, 3),
    }

