"""Reading the dadi layers of an image: tables fetched by range and checked against the manifest."""

from __future__ import annotations

from dadi.errors import FormatError, ImageError
from dadi.format.blob import parse_tables, tables_offset
from dadi.format.model import LayerTables
from dadi.image import mediatypes as mt
from dadi.image.base import ImageSource
from dadi.image.manifest import Descriptor, ImageManifest


def require_dadi_image(manifest: ImageManifest, where: str) -> None:
    for i, desc in enumerate(manifest.layers):
        if desc.media_type != mt.DADI_LAYER:
            raise ImageError(f"{where}: layer {i} has media type {desc.media_type!r}: not a dadi image")


def tables_location(desc: Descriptor, where: str) -> tuple[int, int, str]:
    """(offset, size, digest) of a layer's tables, from the manifest annotations that vouch for them."""
    try:
        size = int(desc.annotations[mt.ANN_TABLES_SIZE])
        digest = desc.annotations[mt.ANN_TABLES_DIGEST]
    except (KeyError, ValueError):
        raise ImageError(f"{where}: layer {desc.digest} lacks valid {mt.ANN_TABLES_SIZE}/digest annotations") from None
    try:
        offset = tables_offset(desc.size, size)
    except FormatError as exc:
        raise ImageError(f"{where}: layer {desc.digest}: {exc}") from exc
    return offset, size, digest


def load_layer_tables(source: ImageSource, desc: Descriptor) -> LayerTables:
    offset, size, digest = tables_location(desc, source.description)
    data = source.read_range(desc, offset, size)
    try:
        return parse_tables(data, blob_size=desc.size, expected_digest=digest)
    except FormatError as exc:
        raise FormatError(f"{source.description}: layer {desc.digest}: {exc}") from exc
