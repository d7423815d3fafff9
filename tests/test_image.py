"""The image I/O layer: digests, manifest parsing, decompression, OCI layouts, docker archives, refs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from imagebuilder import OCILayoutBuilder, TarBuilder, read_layout_image, write_docker_archive

from dadi.digests import VerifyingReader, chain_ids, check_digest, digest_hex, sha256_digest
from dadi.errors import ImageError
from dadi.image import mediatypes as mt
from dadi.image.compression import open_decompressed
from dadi.image.docker_archive import DockerArchiveSource
from dadi.image.manifest import Descriptor, ImageConfig, ImageManifest, dump_json, select_platform
from dadi.image.oci_layout import OCILayoutSource, OCILayoutTarget
from dadi.image.transports import ImageRef, open_source, open_target, parse_image_ref
from dadi.progress import CountingReader, Progress, human_bytes
from dadi.units import parse_rate, parse_size


def _hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digest(data: bytes) -> str:
    return "sha256:" + _hex(data)


def _read_all(stream, chunk: int = 7) -> bytes:
    out = b""
    while data := stream.read(chunk):
        out += data
    return out


# --------------------------------------------------------------------------------------------- digests


def test_sha256_digest_is_oci_form():
    assert sha256_digest(b"") == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert digest_hex(sha256_digest(b"abc")) == _hex(b"abc")


def test_chain_ids_follow_the_oci_definition():
    # ChainID(L0) = DiffID(L0); ChainID(Ln) = SHA256(ChainID(Ln-1) + " " + DiffID(Ln)), by hand.
    d0, d1, d2 = (_digest(b"layer %d" % i) for i in range(3))
    c0 = d0
    c1 = "sha256:" + hashlib.sha256(f"{c0} {d1}".encode("ascii")).hexdigest()
    c2 = "sha256:" + hashlib.sha256(f"{c1} {d2}".encode("ascii")).hexdigest()
    assert chain_ids([d0, d1, d2]) == [c0, c1, c2]
    assert chain_ids([d0]) == [d0]
    assert chain_ids([]) == []
    # Order matters: the same layers stacked differently are a different image.
    assert chain_ids([d1, d0])[1] != c1


@pytest.mark.parametrize(
    "bad",
    [
        "sha256:../../x",
        "sha256:" + "a" * 63,
        "sha256:" + "A" * 64,
        "sha512:" + "a" * 128,
        "a" * 64,
        "sha256:" + "a" * 64 + "/../../etc",
        "sha256:" + "a" * 64 + "\n",
        "",
        None,
        64,
    ],
)
def test_check_digest_refuses_malformed_and_path_like_digests(bad):
    with pytest.raises(ImageError, match="layer 3: not a sha256 digest"):
        check_digest(bad, "layer 3")


def test_check_digest_accepts_a_real_digest():
    good = _digest(b"x")
    assert check_digest(good, "x") == good


def test_verifying_reader_exact_stream_passes():
    data = os.urandom(1000)
    reader = VerifyingReader(io.BytesIO(data), _digest(data), len(data), "layer L")
    assert _read_all(reader) == data
    assert reader.bytes_read == 1000


def test_verifying_reader_unknown_size_still_checks_digest():
    data = b"hello"
    reader = VerifyingReader(io.BytesIO(data), _digest(data), None, "blob B")
    assert reader.read() == data
    assert reader.read() == b""
    reader = VerifyingReader(io.BytesIO(data), _digest(b"other"), None, "blob B")
    reader.read()
    with pytest.raises(ImageError, match="digest mismatch"):
        reader.read()


def test_verifying_reader_short_stream_says_truncated():
    data = b"0123456789"
    reader = VerifyingReader(io.BytesIO(data[:6]), _digest(data), len(data), "layer L")
    with pytest.raises(ImageError, match=r"layer L: 6 bytes, but its descriptor says 10 \(truncated\?\)"):
        _read_all(reader)


def test_verifying_reader_long_stream_is_refused_as_soon_as_it_overruns():
    data = b"0123456789"
    reader = VerifyingReader(io.BytesIO(data + b"extra"), _digest(data), len(data), "layer L")
    assert reader.read(10) == data
    with pytest.raises(ImageError, match="layer L: longer than the 10 bytes its descriptor says"):
        reader.read(10)


def test_verifying_reader_wrong_digest_names_expected_and_actual():
    data = b"the real bytes"
    claimed = _digest(b"what the manifest says")
    reader = VerifyingReader(io.BytesIO(data), claimed, len(data), "layer L")
    with pytest.raises(ImageError) as err:
        _read_all(reader)
    message = str(err.value)
    assert "layer L: digest mismatch" in message
    assert f"expected {claimed}" in message
    assert f"got {_digest(data)}" in message


def test_verifying_reader_refuses_a_path_like_expected_digest():
    with pytest.raises(ImageError, match="not a sha256 digest"):
        VerifyingReader(io.BytesIO(b""), "sha256:../../x", 0, "layer L")


def test_verifying_reader_read_zero_does_not_verify_early():
    data = b"abc"
    reader = VerifyingReader(io.BytesIO(data), _digest(data), 3, "layer L")
    assert reader.read(0) == b""  # not EOF: no "0 bytes, but ... says 3"
    assert _read_all(reader) == data


# --------------------------------------------------------------------------------------------- manifests


def _desc(data: bytes, media_type: str, **extra) -> dict:
    return {"mediaType": media_type, "digest": _digest(data), "size": len(data), **extra}


CONFIG = json.dumps({"rootfs": {"type": "layers", "diff_ids": [_digest(b"tar")]}}).encode()
LAYER = b"layer blob"


def _manifest(media_type: str | None = mt.OCI_MANIFEST, **changes) -> dict:
    obj = {
        "schemaVersion": 2,
        "config": _desc(CONFIG, mt.OCI_CONFIG),
        "layers": [_desc(LAYER, mt.OCI_LAYER_GZIP)],
    }
    if media_type:
        obj["mediaType"] = media_type
    obj.update(changes)
    return obj


def test_parse_oci_manifest():
    raw = json.dumps(_manifest(annotations={"a": "b"})).encode()
    manifest = ImageManifest.parse(raw, "m")
    assert manifest.media_type == mt.OCI_MANIFEST
    assert manifest.config == Descriptor(mt.OCI_CONFIG, _digest(CONFIG), len(CONFIG))
    assert manifest.layers == (Descriptor(mt.OCI_LAYER_GZIP, _digest(LAYER), len(LAYER)),)
    assert manifest.annotations == {"a": "b"}
    assert manifest.digest == _digest(raw)


def test_parse_docker_schema2_manifest():
    obj = _manifest(mt.DOCKER_MANIFEST)
    obj["config"]["mediaType"] = mt.DOCKER_CONFIG
    obj["layers"][0]["mediaType"] = mt.DOCKER_LAYER_GZIP
    manifest = ImageManifest.parse(json.dumps(obj).encode(), "m")
    assert manifest.media_type == mt.DOCKER_MANIFEST
    assert manifest.layers[0].media_type == mt.DOCKER_LAYER_GZIP


def test_manifest_without_media_type_uses_the_one_it_was_served_as():
    raw = json.dumps(_manifest(None)).encode()
    assert ImageManifest.parse(raw, "m").media_type == mt.OCI_MANIFEST
    assert ImageManifest.parse(raw, "m", mt.DOCKER_MANIFEST).media_type == mt.DOCKER_MANIFEST


@pytest.mark.parametrize("media_type", [mt.OCI_INDEX, mt.DOCKER_MANIFEST_LIST, None])
def test_index_is_refused_with_a_clear_message(media_type):
    obj = {"schemaVersion": 2, "manifests": [_desc(b"m", mt.OCI_MANIFEST)]}
    if media_type:
        obj["mediaType"] = media_type
    with pytest.raises(ImageError, match="src: is an image index; select a platform manifest first"):
        ImageManifest.parse(json.dumps(obj).encode(), "src")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"config": None}, "m: config: a descriptor must be a JSON object"),
        ({"config": {"mediaType": mt.OCI_CONFIG, "digest": _digest(CONFIG)}}, "descriptor size must be"),
        ({"config": _desc(CONFIG, mt.OCI_CONFIG, size=-1)}, "m: config: descriptor size must be a non-neg"),
        ({"config": _desc(CONFIG, mt.OCI_CONFIG, size="12")}, "got '12'"),
        ({"config": _desc(CONFIG, mt.OCI_CONFIG, size=True)}, "got True"),
        ({"config": _desc(CONFIG, mt.OCI_CONFIG, size=1.5)}, "got 1.5"),
        ({"config": {"digest": _digest(CONFIG), "size": 3}}, "m: config: descriptor without a mediaType"),
        ({"config": _desc(CONFIG, mt.OCI_CONFIG, digest="md5:abc")}, "m: config: descriptor digest: not a"),
        ({"layers": [_desc(LAYER, "x", digest="sha256:../../x")]}, "m: layer 0: descriptor digest: not a"),
        ({"layers": [_desc(LAYER, "x", annotations={"k": 1})]}, "m: layer 0: annotations must map strings"),
        ({"layers": [_desc(LAYER, "x", platform="linux")]}, "m: layer 0: platform must be a JSON object"),
        ({"layers": "none"}, "m: 'layers' must be a list"),
        ({"schemaVersion": 1}, "m: unsupported schemaVersion 1"),
        ({"mediaType": "application/json"}, "m: unsupported manifest media type 'application/json'"),
    ],
)
def test_bad_manifests_name_the_problem(change, message):
    obj = _manifest()
    obj.update(change)
    with pytest.raises(ImageError, match=message):
        ImageManifest.parse(json.dumps(obj).encode(), "m")


def test_manifest_missing_config_is_named():
    obj = _manifest()
    del obj["config"]
    with pytest.raises(ImageError, match="m: config: a descriptor must be a JSON object"):
        ImageManifest.parse(json.dumps(obj).encode(), "m")


@pytest.mark.parametrize("annotations", ["text", 5, ["a", "b"], {"k": 1}])
def test_manifest_with_malformed_annotations_is_an_image_error(annotations):
    raw = json.dumps(_manifest(annotations=annotations)).encode()
    with pytest.raises(ImageError, match="m: annotations must map strings to strings"):
        ImageManifest.parse(raw, "m")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "m: not valid JSON"),
        (b"\xff\xfe\x00garbage", "m: not valid JSON"),
        (b"", "m: not valid JSON"),
        (b"[1, 2]", "m: expected a JSON object"),
        (b'"manifest"', "m: expected a JSON object"),
    ],
)
def test_non_json_manifest(raw, message):
    with pytest.raises(ImageError, match=message):
        ImageManifest.parse(raw, "m")


def test_descriptor_json_round_trip():
    desc = Descriptor(mt.OCI_LAYER_TAR, _digest(b"x"), 1, {"b": "2", "a": "1"}, {"os": "linux"})
    obj = desc.to_json()
    assert list(obj["annotations"]) == ["a", "b"]  # sorted: canonical bytes, stable digests
    assert Descriptor.from_json(obj, "d") == desc
    assert Descriptor(mt.OCI_LAYER_TAR, _digest(b"x"), 1).to_json() == {
        "mediaType": mt.OCI_LAYER_TAR,
        "digest": _digest(b"x"),
        "size": 1,
    }


def test_dump_json_is_canonical():
    assert dump_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


def test_image_config_parsing():
    config = ImageConfig.parse(CONFIG, "c")
    assert config.diff_ids == [_digest(b"tar")]
    with pytest.raises(ImageError, match="c: config without rootfs of type 'layers'"):
        ImageConfig.parse(b'{"rootfs": {"type": "other", "diff_ids": []}}', "c")
    with pytest.raises(ImageError, match="c: config without rootfs of type 'layers'"):
        ImageConfig.parse(b"{}", "c")
    with pytest.raises(ImageError, match="c: config rootfs.diff_ids must be a list"):
        ImageConfig.parse(b'{"rootfs": {"type": "layers"}}', "c")
    with pytest.raises(ImageError, match=r"c: rootfs.diff_ids\[1\]: not a sha256 digest"):
        ImageConfig.parse(
            json.dumps({"rootfs": {"type": "layers", "diff_ids": [_digest(b"a"), "sha256:../x"]}}).encode(), "c"
        )


# ------------------------------------------------------------------------------------ select_platform


def _index(*platforms: dict | None) -> bytes:
    manifests = []
    for i, plat in enumerate(platforms):
        entry = _desc(b"manifest %d" % i, mt.OCI_MANIFEST)
        if plat is not None:
            entry["platform"] = plat
        manifests.append(entry)
    return json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests}).encode()


AMD64 = {"os": "linux", "architecture": "amd64"}
ARM64 = {"os": "linux", "architecture": "arm64", "variant": "v8"}
ARMV7 = {"os": "linux", "architecture": "arm", "variant": "v7"}


def test_select_platform_amd64_and_arm64():
    index = _index(ARM64, AMD64, ARMV7)
    assert select_platform(index, "i").digest == _digest(b"manifest 1")
    assert select_platform(index, "i", "linux/amd64").digest == _digest(b"manifest 1")
    assert select_platform(index, "i", "linux/arm64").digest == _digest(b"manifest 0")
    assert select_platform(index, "i", "linux/arm64/v8").digest == _digest(b"manifest 0")
    assert select_platform(index, "i", "linux/arm/v7").digest == _digest(b"manifest 2")


def test_select_platform_variant_must_match_when_asked_for():
    index = _index(ARMV7, AMD64)
    with pytest.raises(ImageError, match="i: no manifest for platform linux/arm/v6"):
        select_platform(index, "i", "linux/arm/v6")


def test_select_platform_single_entry_without_platform_is_taken():
    assert select_platform(_index(None), "i", "linux/amd64").digest == _digest(b"manifest 0")
    # One entry for another platform is not silently run on this one.
    with pytest.raises(ImageError, match="i: no manifest for platform linux/amd64; it has linux/arm64/v8"):
        select_platform(_index(ARM64), "i", "linux/amd64")


def test_select_platform_none_matching_names_the_platform():
    with pytest.raises(ImageError, match="idx: no manifest for platform linux/s390x"):
        select_platform(_index(AMD64, ARM64), "idx", "linux/s390x")


def test_select_platform_bad_index():
    with pytest.raises(ImageError, match='i: an index without a "manifests" list'):
        select_platform(b'{"schemaVersion": 2}', "i")
    with pytest.raises(ImageError, match="i: not valid JSON"):
        select_platform(b"<html>", "i")
    bad = json.dumps({"manifests": [{"mediaType": mt.OCI_MANIFEST, "digest": "x", "size": 1}]}).encode()
    with pytest.raises(ImageError, match=r"i: manifest for linux/amd64: descriptor digest: not a sha256 digest"):
        select_platform(bad, "i")


# ----------------------------------------------------------------------------------------- compression

TAR = TarBuilder().dir("etc").file("etc/hostname", b"dadi\n").file("big", os.urandom(300_000)).build()


def _decompress(blob: bytes, compression: str, what: str = "layer L") -> bytes:
    with open_decompressed(io.BytesIO(blob), compression, what) as stream:
        return _read_all(stream, 65536)


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none", "auto"])
def test_decompress_each_kind(compression):
    blob = {
        "gzip": gzip.compress(TAR),
        "zstd": zstandard.ZstdCompressor().compress(TAR),
        "none": TAR,
        "auto": TAR,
    }[compression]
    out = _decompress(blob, compression)
    assert out == TAR
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        assert tar.extractfile("etc/hostname").read() == b"dadi\n"


@pytest.mark.parametrize(
    "blob",
    [gzip.compress(TAR), zstandard.ZstdCompressor().compress(TAR), TAR],
    ids=["gzip", "zstd", "none"],
)
def test_auto_sniffs_the_magic_number(blob):
    assert _decompress(blob, "auto") == TAR


def test_zstd_multi_frame_is_read_across_frames():
    frames = b"".join(zstandard.ZstdCompressor().compress(TAR[i : i + 50_000]) for i in range(0, len(TAR), 50_000))
    assert _decompress(frames, "zstd") == TAR
    assert _decompress(frames, "auto") == TAR


def test_zstd_frames_without_content_size_in_a_stream():
    out = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as writer:
        writer.write(TAR)
    assert _decompress(out.getvalue(), "zstd") == TAR


def test_gzip_multi_member():
    half = len(TAR) // 2
    assert _decompress(gzip.compress(TAR[:half]) + gzip.compress(TAR[half:]), "gzip") == TAR


def test_empty_uncompressed_stream():
    assert _decompress(b"", "none") == b""
    assert _decompress(b"", "auto") == b""


def test_media_type_says_gzip_but_bytes_are_not():
    with pytest.raises(ImageError, match="layer L: media type says gzip, but the blob does not start with"):
        _decompress(TAR, "gzip")
    with pytest.raises(ImageError, match="layer L: media type says zstd, but the blob does not start with"):
        _decompress(gzip.compress(TAR), "zstd")


def test_unknown_compression():
    with pytest.raises(ImageError, match="layer L: unknown compression 'bzip2'"):
        _decompress(TAR, "bzip2")


def test_corrupt_gzip_in_the_middle_names_the_layer():
    blob = bytearray(gzip.compress(TAR, compresslevel=1))
    middle = len(blob) // 2
    blob[middle : middle + 64] = bytes(b ^ 0xFF for b in blob[middle : middle + 64])
    with pytest.raises(ImageError, match=r"layer sha256:abc: corrupt gzip stream"):
        _decompress(bytes(blob), "gzip", "layer sha256:abc")


def test_truncated_gzip_is_an_error():
    blob = gzip.compress(TAR)
    with pytest.raises(ImageError, match="layer L: corrupt gzip stream"):
        _decompress(blob[: len(blob) // 2], "gzip")


def test_corrupt_zstd_is_an_error():
    # Damage in the frame's block headers is caught by the decoder. (Damage inside a raw block is not
    # detectable without a frame checksum; the layer's diff_id check catches that, see test_convert_errors.)
    blob = bytearray(zstandard.ZstdCompressor().compress(TAR))
    blob[6:70] = b"\xff" * 64
    with pytest.raises(ImageError, match="layer L: corrupt zstd stream"):
        _decompress(bytes(blob), "zstd")


def test_truncated_zstd_is_an_error():
    blob = zstandard.ZstdCompressor().compress(TAR)
    with pytest.raises(ImageError, match="layer L: corrupt zstd stream"):
        _decompress(blob[: len(blob) // 2], "zstd")


# ---------------------------------------------------------------------------------- OCI layout: source


def _tar(name: str, data: bytes) -> bytes:
    return TarBuilder().file(name, data).build()


def build_layout(layout: Path, tag: str = "v1", *layers: bytes, compression: str = "gzip") -> OCILayoutBuilder:
    builder = OCILayoutBuilder(layout, tag)
    for layer in layers or (_tar("a", b"A"),):
        builder.add_layer(layer, compression=compression)
    builder.write()
    return builder


def _write_blob(layout: Path, data: bytes) -> str:
    (layout / "blobs" / "sha256" / _hex(data)).write_bytes(data)
    return _digest(data)


def _set_index(layout: Path, manifests: list[dict]) -> None:
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))


def _index_entries(layout: Path) -> list[dict]:
    return json.loads((layout / "index.json").read_text())["manifests"]


def test_layout_source_reads_the_tagged_image(tmp_path):
    tars = [_tar("a", b"first"), _tar("b", b"second")]
    build_layout(tmp_path, "v1", *tars)
    build_layout(tmp_path, "v2", _tar("c", b"other"))
    expected = read_layout_image(tmp_path, "v1")

    source = OCILayoutSource(tmp_path, "v1")
    assert source.description == f"oci:{tmp_path}:v1"
    manifest = source.get_manifest()
    assert manifest.digest == expected.manifest_digest
    assert [d.media_type for d in manifest.layers] == [mt.OCI_LAYER_GZIP] * 2
    config = source.get_config(manifest)
    assert config.diff_ids == [_digest(t) for t in tars]
    for desc, blob, tar in zip(manifest.layers, expected.layer_blobs, tars, strict=True):
        with source.open_blob(desc, "layer") as reader:
            assert _read_all(reader, 4096) == blob
        with open_decompressed(source.open_blob(desc, "layer"), "auto", "layer") as stream:
            assert stream.read() == tar
    assert OCILayoutSource(tmp_path, "v2").get_manifest().digest != manifest.digest


def test_layout_source_without_tag_takes_the_only_image(tmp_path):
    builder = build_layout(tmp_path, "only")
    source = OCILayoutSource(tmp_path, None)
    assert source.description == f"oci:{tmp_path}"
    assert source.get_manifest().digest == builder.manifest_digest


def test_layout_source_without_tag_and_two_images_lists_their_names(tmp_path):
    build_layout(tmp_path, "v1")
    build_layout(tmp_path, "v2", _tar("b", b"B"))
    with pytest.raises(ImageError, match="index.json: 2 images; name one of: v1, v2"):
        OCILayoutSource(tmp_path, None).get_manifest()


def test_layout_source_missing_tag(tmp_path):
    build_layout(tmp_path, "v1")
    with pytest.raises(ImageError, match=r"index.json: no image tagged 'v3'"):
        OCILayoutSource(tmp_path, "v3").get_manifest()


def test_layout_source_not_a_layout(tmp_path):
    with pytest.raises(ImageError, match=r"oci:.*:v1: not an OCI image layout \(no index.json\)"):
        OCILayoutSource(tmp_path, "v1")


def test_layout_source_empty_index(tmp_path):
    _set_index(tmp_path, [])
    with pytest.raises(ImageError, match="index.json: no manifests"):
        OCILayoutSource(tmp_path, "v1").get_manifest()


def test_layout_source_missing_layer_blob(tmp_path):
    build_layout(tmp_path)
    source = OCILayoutSource(tmp_path, "v1")
    layer = source.get_manifest().layers[0]
    (tmp_path / "blobs" / "sha256" / digest_hex(layer.digest)).unlink()
    with pytest.raises(ImageError, match=f"blob {layer.digest} is missing"):
        source.open_blob(layer, "layer 0")


def test_layout_source_missing_manifest_blob(tmp_path):
    builder = build_layout(tmp_path)
    (tmp_path / "blobs" / "sha256" / digest_hex(builder.manifest_digest)).unlink()
    with pytest.raises(ImageError, match=f"blob {builder.manifest_digest} is missing"):
        OCILayoutSource(tmp_path, "v1").get_manifest()


def test_layout_source_tampered_blobs_are_caught(tmp_path):
    build_layout(tmp_path)
    source = OCILayoutSource(tmp_path, "v1")
    manifest = source.get_manifest()
    config_file = tmp_path / "blobs" / "sha256" / digest_hex(manifest.config.digest)
    config_file.write_bytes(config_file.read_bytes().replace(b"amd64", b"arm64"))
    with pytest.raises(ImageError, match=f"config {manifest.config.digest}: digest mismatch"):
        source.get_config(manifest)
    layer = manifest.layers[0]
    layer_file = tmp_path / "blobs" / "sha256" / digest_hex(layer.digest)
    layer_file.write_bytes(layer_file.read_bytes() + b"junk")
    with pytest.raises(ImageError, match="layer 0: longer than the"), source.open_blob(layer, "layer 0") as blob:
        _read_all(blob, 1 << 20)


def test_layout_source_manifest_size_lie(tmp_path):
    builder = build_layout(tmp_path)
    entries = _index_entries(tmp_path)
    entries[0]["size"] += 1
    _set_index(tmp_path, entries)
    with pytest.raises(ImageError, match=f"manifest {builder.manifest_digest}: .* bytes, but its descriptor"):
        OCILayoutSource(tmp_path, "v1").get_manifest()


def _multi_platform_layout(layout: Path) -> tuple[str, str]:
    """A layout whose tag "multi" names an index of an amd64 and an arm64 image (built as tags a, b)."""
    a = build_layout(layout, "amd", _tar("arch", b"amd64"))
    b = build_layout(layout, "arm", _tar("arch", b"arm64"))
    entries = {e["annotations"][mt.OCI_REF_NAME]: e for e in _index_entries(layout)}
    manifests = []
    for name, plat in (("arm", ARM64), ("amd", AMD64)):
        entry = dict(entries[name])
        del entry["annotations"]
        manifests.append({**entry, "platform": plat})
    index_raw = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests}).encode()
    digest = _write_blob(layout, index_raw)
    _set_index(
        layout,
        [
            {
                "mediaType": mt.OCI_INDEX,
                "digest": digest,
                "size": len(index_raw),
                "annotations": {mt.OCI_REF_NAME: "multi"},
            }
        ],
    )
    return a.manifest_digest, b.manifest_digest


def test_layout_source_nested_index_selects_the_platform(tmp_path):
    amd, arm = _multi_platform_layout(tmp_path)
    assert OCILayoutSource(tmp_path, "multi").get_manifest().digest == amd
    assert OCILayoutSource(tmp_path, "multi", "linux/arm64").get_manifest().digest == arm
    source = OCILayoutSource(tmp_path, None, "linux/arm64/v8")
    manifest = source.get_manifest()
    assert manifest.digest == arm
    with open_decompressed(source.open_blob(manifest.layers[0], "l"), "gzip", "l") as stream:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            member = tar.next()
            assert tar.extractfile(member).read() == b"arm64"
    with pytest.raises(ImageError, match="no manifest for platform linux/ppc64le"):
        OCILayoutSource(tmp_path, "multi", "linux/ppc64le").get_manifest()


def test_layout_source_index_nested_too_deeply(tmp_path):
    build_layout(tmp_path)
    entry = _index_entries(tmp_path)[0]
    del entry["annotations"]
    for _ in range(5):
        raw = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [entry]}).encode()
        entry = {"mediaType": mt.OCI_INDEX, "digest": _write_blob(tmp_path, raw), "size": len(raw)}
    _set_index(tmp_path, [entry])
    with pytest.raises(ImageError, match="indexes nested too deeply"):
        OCILayoutSource(tmp_path, None).get_manifest()


def test_layout_source_manifest_whose_annotation_says_manifests(tmp_path):
    # A plain manifest that merely mentions the word "manifests" is still a manifest, not an index.
    build_layout(tmp_path)
    entry = _index_entries(tmp_path)[0]
    manifest = json.loads((tmp_path / "blobs" / "sha256" / digest_hex(entry["digest"])).read_bytes())
    manifest["annotations"] = {"org.example.note": "manifests"}
    raw = json.dumps(manifest).encode()
    entry.update(digest=_write_blob(tmp_path, raw), size=len(raw))
    _set_index(tmp_path, [entry])
    parsed = OCILayoutSource(tmp_path, "v1").get_manifest()
    assert parsed.digest == _digest(raw)
    assert parsed.annotations == {"org.example.note": "manifests"}


def test_layout_source_read_range(tmp_path):
    build_layout(tmp_path, "v1", _tar("x", os.urandom(5000)), compression="none")
    source = OCILayoutSource(tmp_path, "v1")
    layer = source.get_manifest().layers[0]
    blob = source.blob_file(layer).read_bytes()
    assert len(blob) == layer.size
    assert source.read_range(layer, 0, 512) == blob[:512]
    assert source.read_range(layer, 1000, 37) == blob[1000:1037]
    assert source.read_range(layer, layer.size - 10, 100) == blob[-10:]  # short at the end, not padded
    assert source.read_range(layer, layer.size, 10) == b""


# ---------------------------------------------------------------------------------- OCI layout: target


def test_layout_target_creates_a_layout(tmp_path):
    layout = tmp_path / "new" / "layout"
    target = OCILayoutTarget(layout, "v1")
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert json.loads((layout / "index.json").read_text()) == {"schemaVersion": 2, "manifests": []}
    assert (layout / "blobs" / "sha256").is_dir()
    assert target.description == f"oci:{layout}:v1"


def test_layout_target_put_blob_from_memory_and_file(tmp_path):
    target = OCILayoutTarget(tmp_path, "v1")
    data = os.urandom(3 << 20)  # more than one copy buffer
    digest = _digest(data)
    assert not target.has_blob(digest)
    assert target.put_blob(digest, len(data), data=data) == "uploaded"
    assert target.has_blob(digest)
    assert (tmp_path / "blobs" / "sha256" / _hex(data)).read_bytes() == data
    assert target.put_blob(digest, len(data), data=data) == "exists"

    src = tmp_path / "src.bin"
    other = os.urandom(1000)
    src.write_bytes(other)
    assert target.put_blob(_digest(other), len(other), path=src) == "uploaded"
    assert (tmp_path / "blobs" / "sha256" / _hex(other)).read_bytes() == other
    # Nothing half-written is left behind.
    assert sorted(p.name for p in (tmp_path / "blobs" / "sha256").iterdir()) == sorted([_hex(data), _hex(other)])


def test_layout_target_put_blob_replaces_a_wrong_sized_file(tmp_path):
    target = OCILayoutTarget(tmp_path, "v1")
    data = b"complete blob"
    (tmp_path / "blobs" / "sha256" / _hex(data)).write_bytes(data[:5])
    assert target.put_blob(_digest(data), len(data), data=data) == "uploaded"
    assert (tmp_path / "blobs" / "sha256" / _hex(data)).read_bytes() == data


def test_layout_target_failed_put_blob_leaves_nothing(tmp_path):
    target = OCILayoutTarget(tmp_path / "layout", "v1")
    with pytest.raises(FileNotFoundError):
        target.put_blob(_digest(b"x"), 1, path=tmp_path / "does-not-exist")
    assert list((tmp_path / "layout" / "blobs" / "sha256").iterdir()) == []
    assert not target.has_blob(_digest(b"x"))


def test_layout_target_refuses_path_like_digests(tmp_path):
    target = OCILayoutTarget(tmp_path / "layout", "v1")
    with pytest.raises(ImageError, match="not a sha256 digest"):
        target.put_blob("sha256:../../../escape", 1, data=b"x")
    assert not (tmp_path / "escape").exists()
    with pytest.raises(ImageError, match="not a sha256 digest"):
        target.has_blob("sha256:../../index.json")


def _write_image(target: OCILayoutTarget, layer_text: bytes) -> tuple[bytes, str]:
    tar = _tar("f", layer_text)
    layer = gzip.compress(tar, mtime=0)
    config = dump_json({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [_digest(tar)]}})
    for blob in (layer, config):
        target.put_blob(_digest(blob), len(blob), data=blob)
    manifest = dump_json(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": _desc(config, mt.OCI_CONFIG),
            "layers": [_desc(layer, mt.OCI_LAYER_GZIP)],
        }
    )
    return manifest, target.put_manifest(manifest, mt.OCI_MANIFEST)


def test_layout_target_put_manifest_round_trips_through_the_source(tmp_path):
    target = OCILayoutTarget(tmp_path, "v1")
    manifest, where = _write_image(target, b"one")
    assert where == f"oci:{tmp_path}:v1@{_digest(manifest)}"
    entries = _index_entries(tmp_path)
    assert entries == [
        {
            "mediaType": mt.OCI_MANIFEST,
            "digest": _digest(manifest),
            "size": len(manifest),
            "annotations": {mt.OCI_REF_NAME: "v1"},
        }
    ]
    source = OCILayoutSource(tmp_path, "v1")
    parsed = source.get_manifest()
    assert parsed.raw == manifest
    assert len(source.get_config(parsed).diff_ids) == 1
    assert read_layout_image(tmp_path, "v1").manifest_digest == _digest(manifest)


def test_layout_target_replaces_the_tag_instead_of_duplicating_it(tmp_path):
    build_layout(tmp_path, "keep")  # an image already there, under another tag
    target = OCILayoutTarget(tmp_path, "v1")
    first, _ = _write_image(target, b"one")
    second, _ = _write_image(target, b"two")
    again, _ = _write_image(target, b"two")  # put_manifest twice with the same manifest
    assert again == second
    entries = _index_entries(tmp_path)
    tags = [e["annotations"][mt.OCI_REF_NAME] for e in entries]
    assert sorted(tags) == ["keep", "v1"]
    (v1,) = (e for e in entries if e["annotations"][mt.OCI_REF_NAME] == "v1")
    assert v1["digest"] == _digest(second)
    assert OCILayoutSource(tmp_path, "v1").get_manifest().raw == second
    assert OCILayoutSource(tmp_path, "keep").get_manifest().layers  # the other tag still reads
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_layout_target_second_tag_adds_an_entry(tmp_path):
    m1, _ = _write_image(OCILayoutTarget(tmp_path, "a"), b"one")
    m2, _ = _write_image(OCILayoutTarget(tmp_path, "b"), b"two")
    assert {e["annotations"][mt.OCI_REF_NAME]: e["digest"] for e in _index_entries(tmp_path)} == {
        "a": _digest(m1),
        "b": _digest(m2),
    }


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")
def test_layout_target_output_is_read_by_skopeo(tmp_path):
    manifest, _ = _write_image(OCILayoutTarget(tmp_path, "v1"), b"one")
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{tmp_path}:v1"], check=True, capture_output=True
    ).stdout
    assert out == manifest


# -------------------------------------------------------------------------------------- docker archive


def _docker_archive(tmp_path: Path, *tars: bytes, compression: str = "gzip") -> tuple[Path, list[bytes]]:
    layout = tmp_path / "layout"
    tars = tars or (_tar("a", b"first"), _tar("b", b"second"))
    build_layout(layout, "v1", *tars, compression=compression)
    return write_docker_archive(layout, "v1", tmp_path / "image.tar"), list(tars)


def _archive_members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _rewrite_archive(archive: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(archive, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_docker_archive_synthesises_a_manifest(tmp_path):
    archive, tars = _docker_archive(tmp_path)
    members = _archive_members(archive)
    docker_manifest = json.loads(members["manifest.json"])[0]

    source = DockerArchiveSource(archive)
    assert source.description == f"docker-archive:{archive}"
    manifest = source.get_manifest()
    assert manifest.media_type == mt.OCI_MANIFEST
    config_raw = members[docker_manifest["Config"]]
    assert manifest.config == Descriptor(mt.OCI_CONFIG, _digest(config_raw), len(config_raw))
    # Layers are the archive's (uncompressed) members: their digests are the members' digests.
    layer_bytes = [members[name] for name in docker_manifest["Layers"]]
    assert layer_bytes == tars
    assert [(d.media_type, d.digest, d.size) for d in manifest.layers] == [
        (mt.OCI_LAYER_TAR, _digest(b), len(b)) for b in layer_bytes
    ]
    assert source.get_config(manifest).diff_ids == [_digest(t) for t in tars]
    for desc, data in zip(manifest.layers, layer_bytes, strict=True):
        with source.open_blob(desc, "layer") as reader:
            assert _read_all(reader, 1000) == data
        assert source.read_range(desc, 512, 100) == data[512:612]
    assert source.get_manifest() is manifest
    source.close()


def test_docker_archive_through_open_source(tmp_path):
    archive, _ = _docker_archive(tmp_path)
    source = open_source(parse_image_ref(f"docker-archive:{archive}:dadi-test/v1:latest"))
    assert isinstance(source, DockerArchiveSource)
    assert len(source.get_manifest().layers) == 2
    source.close()
    with pytest.raises(ImageError, match="no image tagged 'other:latest'"):
        open_source(parse_image_ref(f"docker-archive:{archive}:other:latest"))


def test_docker_archive_gzip_layer_is_sniffed(tmp_path):
    archive, tars = _docker_archive(tmp_path)
    members = _archive_members(archive)
    entry = json.loads(members["manifest.json"])[0]
    members[entry["Layers"][0]] = gzip.compress(members[entry["Layers"][0]], mtime=0)
    _rewrite_archive(archive, members)
    source = DockerArchiveSource(archive)
    layer = source.get_manifest().layers[0]
    assert layer.media_type == mt.OCI_LAYER_GZIP
    with open_decompressed(source.open_blob(layer, "l"), mt.LAYER_COMPRESSION[layer.media_type], "l") as s:
        assert s.read() == tars[0]


def test_docker_archive_tampered_layer_fails_verification(tmp_path):
    archive, _ = _docker_archive(tmp_path)
    source = DockerArchiveSource(archive)
    layer = source.get_manifest().layers[0]
    forged = Descriptor(layer.media_type, _digest(b"something else"), layer.size)
    with pytest.raises(ImageError, match="no blob"):
        source.open_blob(forged, "layer 0")


def test_docker_archive_diff_ids_count_mismatch(tmp_path):
    archive, _ = _docker_archive(tmp_path)
    members = _archive_members(archive)
    entry = json.loads(members["manifest.json"])[0]
    config = json.loads(members[entry["Config"]])
    config["rootfs"]["diff_ids"].pop()
    members[entry["Config"]] = json.dumps(config).encode()
    _rewrite_archive(archive, members)
    source = DockerArchiveSource(archive)
    with pytest.raises(ImageError, match="2 layers but 1 diff_ids in the config"):
        source.get_manifest()
    # Asking again must not hand out the manifest that was just found inconsistent.
    with pytest.raises(ImageError, match="2 layers but 1 diff_ids in the config"):
        source.get_manifest()


def test_docker_archive_missing_layer_member(tmp_path):
    archive, _ = _docker_archive(tmp_path)
    members = _archive_members(archive)
    entry = json.loads(members["manifest.json"])[0]
    del members[entry["Layers"][1]]
    _rewrite_archive(archive, members)
    with pytest.raises(ImageError, match=f"layer {entry['Layers'][1]} is missing from the archive"):
        DockerArchiveSource(archive).get_manifest()


def test_docker_archive_missing_config_and_manifest(tmp_path):
    archive, _ = _docker_archive(tmp_path)
    members = _archive_members(archive)
    entry = json.loads(members["manifest.json"])[0]
    del members[entry["Config"]]
    _rewrite_archive(archive, members)
    with pytest.raises(ImageError, match=f"{entry['Config']} is missing from the archive"):
        DockerArchiveSource(archive).get_manifest()
    del members["manifest.json"]
    _rewrite_archive(archive, members)
    with pytest.raises(ImageError, match="manifest.json is missing from the archive"):
        DockerArchiveSource(archive)


def test_docker_archive_not_an_archive(tmp_path):
    bad = tmp_path / "image.tar"
    bad.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ImageError, match="docker-archive:.*: cannot read the archive"):
        DockerArchiveSource(bad)
    with pytest.raises(ImageError, match="cannot read the archive"):
        DockerArchiveSource(tmp_path / "missing.tar")


def test_docker_archive_empty_manifest_list(tmp_path):
    archive = tmp_path / "image.tar"
    _rewrite_archive(archive, {"manifest.json": b"[]"})
    with pytest.raises(ImageError, match="manifest.json: expected a non-empty JSON array"):
        DockerArchiveSource(archive)


# ---------------------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("oci:/img", ImageRef("oci", "/img", None)),
        ("oci:/img:v1", ImageRef("oci", "/img", "v1")),
        ("oci:relative/dir:latest", ImageRef("oci", "relative/dir", "latest")),
        ("oci:/img:", ImageRef("oci", "/img", None)),
        ("docker-archive:/tmp/x.tar", ImageRef("docker-archive", "/tmp/x.tar", None)),
        ("docker-archive:x.tar:repo/name:tag", ImageRef("docker-archive", "x.tar", "repo/name:tag")),
        ("docker://localhost:5000/repo:tag", ImageRef("docker", "localhost:5000/repo:tag")),
        ("docker://busybox", ImageRef("docker", "busybox")),
        ("docker://r.io/a/b@sha256:" + "0" * 64, ImageRef("docker", "r.io/a/b@sha256:" + "0" * 64)),
    ],
)
def test_parse_image_ref(text, ref):
    assert parse_image_ref(text) == ref
    if not text.endswith(":"):
        assert str(ref) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("oci:", "no path after oci:"),
        ("oci::tag", "no path after oci:"),
        ("docker-archive:", "no path after docker-archive:"),
        ("docker://", "empty registry reference"),
        ("/some/dir", "unknown image reference; use oci:DIR"),
        ("docker:busybox", "unknown image reference"),
        ("containers-storage:x", "unknown image reference"),
        ("", "unknown image reference"),
    ],
)
def test_parse_image_ref_errors(text, message):
    with pytest.raises(ImageError, match=message):
        parse_image_ref(text)


def test_open_target_rules(tmp_path):
    with pytest.raises(ImageError, match=r"a target layout needs a tag \(oci:DIR:TAG\)"):
        open_target(parse_image_ref(f"oci:{tmp_path}"))
    with pytest.raises(ImageError, match="cannot write to a docker-archive reference"):
        open_target(parse_image_ref(f"docker-archive:{tmp_path}/x.tar"))
    target = open_target(parse_image_ref(f"oci:{tmp_path}/out:v1"))
    assert isinstance(target, OCILayoutTarget)
    assert (tmp_path / "out" / "index.json").is_file()


def test_open_source_oci_passes_platform(tmp_path):
    from dadi.image.transports import RegistryOptions

    amd, arm = _multi_platform_layout(tmp_path)
    ref = parse_image_ref(f"oci:{tmp_path}:multi")
    assert open_source(ref).get_manifest().digest == amd
    assert open_source(ref, RegistryOptions(platform="linux/arm64")).get_manifest().digest == arm


# ------------------------------------------------------------------------------------------ parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64KiB", 64 << 10),
        ("64k", 64 << 10),
        ("64K", 64 << 10),
        ("64kb", 64 << 10),
        ("1G", 1 << 30),
        ("1GiB", 1 << 30),
        ("64g", 64 << 30),
        ("2m", 2 << 20),
        ("3T", 3 << 40),
        ("65536", 65536),
        (" 512 MiB ", 512 << 20),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "-1", "1.5G", "64x", "64 KiB KiB", "G", "1P"])
def test_parse_size_rejects_bad_sizes(text):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


@pytest.mark.parametrize(("text", "rate"), [("100M", 100 << 20), ("100MiB/s", 100 << 20), ("1g/s", 1 << 30),
                                            (4096, 4096)])
def test_parse_rate(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "/s", "-1M/s"])
def test_parse_rate_rejects_bad_rates(text):
    with pytest.raises(ValueError, match="is not a rate"):
        parse_rate(text)


# -------------------------------------------------------------------------------------------- progress


def test_human_bytes():
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(5 << 20) == "5.0 MiB"
    assert human_bytes(3 << 40) == "3072.0 GiB"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_pipe_prints_one_line_per_step():
    out = io.StringIO()
    progress = Progress(out)
    progress.start("layer 1/2")
    reader = CountingReader(io.BytesIO(b"x" * 5000), progress)
    assert _read_all(reader, 1000) == b"x" * 5000
    progress.done("5000 bytes")
    progress.note("all done")
    assert out.getvalue() == "layer 1/2: 5000 bytes\nall done\n"


def test_progress_on_a_terminal_redraws_in_place():
    out = _Tty()
    progress = Progress(out, interval=0)
    progress.start("layer 1/1")
    progress.advance(2048)
    progress.done("ok")
    text = out.getvalue()
    assert text.startswith("\r\x1b[Klayer 1/1: 0 B at")
    assert "\r\x1b[Klayer 1/1: 2.0 KiB at" in text
    assert text.endswith("\r\x1b[Klayer 1/1: ok\n")


def test_progress_quiet_prints_nothing():
    out = _Tty()
    progress = Progress(out, quiet=True, interval=0)
    progress.start("x")
    progress.advance(10)
    progress.done("y")
    progress.note("z")
    assert out.getvalue() == ""
