"""dadi inspect: what an image is made of - layers, sizes, chunks, compression, annotations."""

from __future__ import annotations

from dadi.image import mediatypes as mt
from dadi.image.base import ImageSource
from dadi.image.dadi_layers import load_layer_tables


def inspect_image(source: ImageSource) -> dict:
    manifest = source.get_manifest()
    config = source.get_config(manifest)
    layers = []
    for i, desc in enumerate(manifest.layers):
        info = {
            "index": i,
            "digest": desc.digest,
            "media_type": desc.media_type,
            "size": desc.size,
            "annotations": desc.annotations,
        }
        if desc.media_type == mt.DADI_LAYER:
            tables = load_layer_tables(source, desc)
            data_blocks = sum(e.count for e in tables.extents if not e.zero)
            zero_blocks = sum(e.count for e in tables.extents if e.zero)
            stored = sum(c.length for c in tables.chunks)
            info.update(
                {
                    "chunks": len(tables.chunks),
                    "chunk_size": tables.chunk_size,
                    "extents": len(tables.extents),
                    "changed_bytes": data_blocks * tables.block_size,
                    "zero_bytes": zero_blocks * tables.block_size,
                    "stored_bytes": stored,
                    "compression_ratio": round(stored / tables.packed_size, 4) if tables.packed_size else None,
                    "disk_size": tables.disk_size,
                }
            )
        layers.append(info)
    return {
        "image": source.description,
        "manifest_digest": manifest.digest,
        "media_type": manifest.media_type,
        "dadi": all(d.media_type == mt.DADI_LAYER for d in manifest.layers) and bool(manifest.layers),
        "config_digest": manifest.config.digest,
        "diff_ids": config.diff_ids,
        "annotations": manifest.annotations,
        "layers": layers,
        "total_size": sum(d.size for d in manifest.layers),
    }


def format_inspection(info: dict) -> str:
    from dadi.progress import human_bytes

    lines = [
        f"image     {info['image']}",
        f"manifest  {info['manifest_digest']}",
        f"kind      {'dadi' if info['dadi'] else 'OCI (not converted)'}, {len(info['layers'])} layers, "
        f"{human_bytes(info['total_size'])}",
    ]
    for layer in info["layers"]:
        line = f"  [{layer['index']}] {layer['digest'][:19]}  {human_bytes(layer['size']):>10}"
        if "chunks" in layer:
            ratio = layer["compression_ratio"]
            line += (
                f"  changed {human_bytes(layer['changed_bytes'])}, {layer['chunks']} chunks, "
                f"{layer['extents']} extents, lz4 ratio {ratio if ratio is not None else '-'}"
            )
            diff_id = layer["annotations"].get(mt.ANN_SOURCE_DIFF_ID, "?")
            line += f"\n       from {diff_id}"
        else:
            line += f"  {layer['media_type']}"
        lines.append(line)
    return "\n".join(lines)
