"""Access traces: which chunks a container reads in its first seconds, recorded once, replayed by prefetch.

A starting container reads the same few percent of its image every time. `dadi mount --record-trace
FILE` writes those chunks, in the order they were first read, to FILE; `dadi trace push IMAGE FILE`
stores the trace in the registry beside the image; every later mount of the image finds it and
prefetches those chunks first, several requests at once, so that the reads of the start find them
local (or in flight) instead of paying a round trip each.

Where a trace is stored (docs/FORMAT.md, "Traces"): an OCI artifact manifest
    artifactType  application/vnd.dadi.trace.v1+json
    config        the OCI empty descriptor ({})
    layers        [the trace JSON, media type application/vnd.dadi.trace.v1+json]
    subject       the image's manifest
tagged `sha256-<hex of the image manifest digest>.dadi-trace` in the image's repository (in an OCI
layout: that ref name in index.json). The tag makes it findable with one manifest GET on any
registry, including those without the OCI 1.1 referrers API; the subject lets registries that have
it list the trace as a referrer too. The trace names layers by digest, so a trace stays valid for an
image that shares layers with the one it was recorded on: entries of other layers are skipped.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from dadi.digests import check_digest, sha256_digest
from dadi.errors import DadiError, ImageError, NotFound
from dadi.image import mediatypes as mt
from dadi.image.base import ImageSource
from dadi.image.manifest import ImageManifest, dump_json, load_json
from dadi.image.transports import ImageRef, RegistryOptions, open_source, open_target

TRACE_MEDIA_TYPE = "application/vnd.dadi.trace.v1+json"
OCI_EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
OCI_EMPTY = b"{}"
TRACE_TAG_SUFFIX = ".dadi-trace"
MAX_TRACE_BYTES = 64 << 20  # a 64 GiB image has a million 64 KiB chunks; a trace of all of them fits


@dataclass(frozen=True)
class Trace:
    """Chunks in the order a container first read them, as (layer digest, chunk index)."""

    layers: tuple[str, ...]
    chunks: tuple[tuple[int, int], ...]  # (position in `layers`, chunk index)
    seconds: float

    def to_json(self) -> bytes:
        return dump_json({"mediaType": TRACE_MEDIA_TYPE, "layers": list(self.layers),
                          "chunks": [list(c) for c in self.chunks], "seconds": self.seconds})

    @classmethod
    def parse(cls, raw: bytes, where: str) -> Trace:
        obj = load_json(raw, where)
        if obj.get("mediaType") != TRACE_MEDIA_TYPE:
            raise ImageError(f"{where}: not a dadi trace (mediaType {obj.get('mediaType')!r})")
        layers = obj.get("layers")
        chunks = obj.get("chunks")
        if not isinstance(layers, list) or not isinstance(chunks, list):
            raise ImageError(f"{where}: 'layers' and 'chunks' must be lists")
        layers = tuple(check_digest(d, f"{where}: layers[{i}]") for i, d in enumerate(layers))
        parsed = []
        for n, entry in enumerate(chunks):
            if (not isinstance(entry, list) or len(entry) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in entry)
                    or entry[0] >= len(layers)):
                raise ImageError(f"{where}: chunks[{n}] = {entry!r} is not [layer position, chunk index]")
            parsed.append((entry[0], entry[1]))
        seconds = obj.get("seconds", 0)
        return cls(layers, tuple(parsed), float(seconds) if isinstance(seconds, int | float) else 0.0)

    def chunks_of(self, digest: str, chunk_count: int) -> list[int]:
        """This trace's chunks of layer `digest`, in trace order; indexes beyond the layer are dropped."""
        positions = {i for i, d in enumerate(self.layers) if d == digest}
        return [index for layer, index in self.chunks if layer in positions and index < chunk_count]


class TraceRecorder:
    """Records the chunks a view reads from when it is made until `seconds` later."""

    def __init__(self, path: Path, layers: list[str], seconds: float, clock=time.monotonic):
        self.path = Path(path)
        self.layers = list(layers)
        self.seconds = seconds
        self._clock = clock
        self._until = clock() + seconds
        self._seen: set[tuple[int, int]] = set()
        self._order: list[tuple[int, int]] = []
        self._position = {d: i for i, d in reversed(list(enumerate(self.layers)))}
        self.written = False

    @property
    def recording(self) -> bool:
        return not self.written and self._clock() < self._until

    def record(self, digest: str, indexes) -> None:
        if not self.recording:
            return
        layer = self._position[digest]
        for index in indexes:
            key = (layer, index)
            if key not in self._seen:
                self._seen.add(key)
                self._order.append(key)

    def write(self) -> int:
        """Write the trace file (atomically); the number of chunks in it. Recording stops."""
        trace = Trace(tuple(self.layers), tuple(self._order), self.seconds)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_bytes(trace.to_json())
        os.replace(tmp, self.path)
        self.written = True
        return len(self._order)


def trace_tag(manifest_digest: str) -> str:
    """The tag a trace of the image with this manifest digest is stored under."""
    return check_digest(manifest_digest, "image manifest").replace(":", "-") + TRACE_TAG_SUFFIX


def trace_ref(image: ImageRef, manifest_digest: str) -> ImageRef:
    """Where the trace of `image` (whose manifest has `manifest_digest`) lives: same repository, own tag."""
    tag = trace_tag(manifest_digest)
    if image.transport == "oci":
        return ImageRef("oci", image.path, tag)
    if image.transport == "docker":
        from dadi.registry import parse_registry_ref

        reg = parse_registry_ref(image.path)
        host = "docker.io" if str(reg).startswith("docker.io/") else reg.host
        return ImageRef("docker", f"{host}/{reg.repository}:{tag}")
    raise DadiError(f"{image}: traces live beside images in registries and OCI layouts only")


def push_trace(image: ImageRef, trace_file: Path, options: RegistryOptions) -> dict:
    """Store the trace in `trace_file` beside `image`; what was stored, and where."""
    raw = Path(trace_file).read_bytes()
    if len(raw) > MAX_TRACE_BYTES:
        raise DadiError(f"{trace_file}: {len(raw)} bytes is too big for a trace (at most {MAX_TRACE_BYTES})")
    trace = Trace.parse(raw, str(trace_file))
    source = open_source(image, options)
    try:
        manifest = source.get_manifest()
    finally:
        source.close()
    layers = {d.digest for d in manifest.layers}
    if not layers & set(trace.layers):
        raise DadiError(f"{trace_file}: the trace names none of {image}'s layers; recorded on another image?")
    trace_digest = sha256_digest(raw)
    artifact = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": TRACE_MEDIA_TYPE,
        "config": {"mediaType": OCI_EMPTY_MEDIA_TYPE, "digest": sha256_digest(OCI_EMPTY), "size": len(OCI_EMPTY)},
        "layers": [{"mediaType": TRACE_MEDIA_TYPE, "digest": trace_digest, "size": len(raw)}],
        "subject": {"mediaType": manifest.media_type, "digest": manifest.digest, "size": len(manifest.raw)},
    }
    target_ref = trace_ref(image, manifest.digest)
    target = open_target(target_ref, options)
    target.put_blob(sha256_digest(OCI_EMPTY), len(OCI_EMPTY), data=OCI_EMPTY)
    target.put_blob(trace_digest, len(raw), data=raw)
    where = target.put_manifest(dump_json(artifact), mt.OCI_MANIFEST)
    return {"trace": where, "image_manifest": manifest.digest, "chunks": len(trace.chunks),
            "trace_digest": trace_digest}


def find_trace(image: ImageRef, manifest: ImageManifest, options: RegistryOptions) -> Trace | None:
    """The trace stored beside `image`, or None when it has none. A trace that is there but broken raises."""
    ref = trace_ref(image, manifest.digest)
    source = open_source(ref, options)
    try:
        return read_trace(source, str(ref))
    finally:
        source.close()


def read_trace(source: ImageSource, where: str) -> Trace | None:
    """The trace in the artifact `source` opens (its trace_ref), or None when there is none. For callers
    that open the source themselves (the supernode, with a node's credentials and its own proxy)."""
    try:
        artifact = source.get_manifest()
    except NotFound:
        return None
    layers = [d for d in artifact.layers if d.media_type == TRACE_MEDIA_TYPE]
    if len(layers) != 1 or layers[0].size > MAX_TRACE_BYTES:
        raise ImageError(f"{where}: a trace artifact must hold one trace of at most {MAX_TRACE_BYTES} bytes")
    raw = source.read_blob(layers[0], f"{where}: trace")  # checked against its digest
    return Trace.parse(raw, f"{where}: trace")
