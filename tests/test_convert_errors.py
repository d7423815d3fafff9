"""Bad input to dadi convert: a clear error naming what and where, and no image written."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
from conftest import dadi_cli
from imagebuilder import OCILayoutBuilder, TarBuilder


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build_image(layout: Path, *tars: bytes) -> None:
    builder = OCILayoutBuilder(layout, "v1")
    for tar in tars:
        builder.add_layer(tar)
    builder.write()


def rewrite_manifest(layout: Path, edit) -> None:
    """Let edit(manifest, write_blob) change the tagged manifest; re-link it from index.json."""
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / desc["digest"][7:]).read_bytes())

    def write_blob(data: bytes) -> str:
        (blobs / _digest(data)[7:]).write_bytes(data)
        return _digest(data)

    edit(manifest, write_blob)
    raw = json.dumps(manifest).encode()
    desc["digest"], desc["size"] = write_blob(raw), len(raw)
    (layout / "index.json").write_text(json.dumps(index))


def replace_layer_blob(layout: Path, layer: int, blob: bytes, *, diff_id_of: bytes | None = None) -> None:
    """Swap a layer's blob and fix its descriptor (and optionally its diff_id) so only the content is bad."""

    def edit(manifest, write_blob):
        manifest["layers"][layer]["digest"] = write_blob(blob)
        manifest["layers"][layer]["size"] = len(blob)
        if diff_id_of is not None:
            config = json.loads((layout / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_bytes())
            config["rootfs"]["diff_ids"][layer] = _digest(diff_id_of)
            raw = json.dumps(config).encode()
            manifest["config"]["digest"], manifest["config"]["size"] = write_blob(raw), len(raw)

    rewrite_manifest(layout, edit)


def good_tar() -> bytes:
    return TarBuilder().file("etc/hello", b"hello\n").dir("var/empty").build()


def convert_fails(tmp_path: Path, layout: Path) -> str:
    out = tmp_path / "out"
    result = dadi_cli(
        "convert", f"oci:{layout}:v1", f"oci:{out}:x", "--cache-dir", str(tmp_path / "cache"), "-q", check=False
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    # No partial image: the target never gets a manifest for the tag.
    index = out / "index.json"
    assert not index.exists() or json.loads(index.read_text())["manifests"] == []
    return result.stderr


def test_corrupt_gzip_is_reported_with_the_layer(tmp_path):
    layout = tmp_path / "img"
    build_image(layout, good_tar(), good_tar())
    blob = bytearray(gzip.compress(good_tar(), mtime=0))
    blob[30:60] = b"\xff" * 30
    replace_layer_blob(layout, 1, bytes(blob))
    err = convert_fails(tmp_path, layout)
    assert "corrupt gzip" in err and _digest(bytes(blob)) in err


def test_truncated_tar_is_reported_with_the_layer(tmp_path):
    layout = tmp_path / "img"
    build_image(layout, good_tar())
    tar = TarBuilder().file("big", b"x" * 100_000).build()[:50_000]
    replace_layer_blob(layout, 0, gzip.compress(tar, mtime=0), diff_id_of=tar)
    err = convert_fails(tmp_path, layout)
    assert "layer 0" in err
    assert "truncated" in err.lower() or "unexpected end" in err.lower()


def test_missing_blob_is_named(tmp_path):
    layout = tmp_path / "img"
    build_image(layout, good_tar(), TarBuilder().file("b", b"b").build())
    manifest_digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest[7:]).read_bytes())
    missing = manifest["layers"][1]["digest"]
    (layout / "blobs" / "sha256" / missing[7:]).unlink()
    err = convert_fails(tmp_path, layout)
    assert f"blob {missing} is missing" in err


def test_unknown_media_type_is_refused_before_any_work(tmp_path):
    layout = tmp_path / "img"
    build_image(layout, good_tar())

    def edit(manifest, _write_blob):
        manifest["layers"][0]["mediaType"] = "application/x-mystery"

    rewrite_manifest(layout, edit)
    err = convert_fails(tmp_path, layout)
    assert "unknown media type 'application/x-mystery'" in err


def test_blob_whose_bytes_do_not_match_its_digest_is_refused(tmp_path):
    layout = tmp_path / "img"
    build_image(layout, good_tar())
    manifest_digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest[7:]).read_bytes())
    layer = manifest["layers"][0]["digest"]
    (layout / "blobs" / "sha256" / layer[7:]).write_bytes(gzip.compress(b"not the layer" * 100, mtime=0))
    err = convert_fails(tmp_path, layout)
    assert layer in err and ("digest mismatch" in err or "bytes, but its descriptor says" in err)


def test_diff_id_that_does_not_match_the_tar_is_refused(tmp_path):
    layout = tmp_path / "img"
    build_image(layout, good_tar())
    tar = TarBuilder().file("other", b"other").build()
    replace_layer_blob(layout, 0, gzip.compress(tar, mtime=0), diff_id_of=b"something else")
    err = convert_fails(tmp_path, layout)
    assert "diff_id" in err and "digest mismatch" in err


@pytest.mark.needs_root
def test_path_climbing_out_is_refused_naming_the_entry(tmp_path):
    layout = tmp_path / "img"
    build_image(layout, good_tar(), TarBuilder().file("../../etc/evil", b"x").build())
    err = convert_fails(tmp_path, layout)
    assert "evil" in err and "layer 1" in err


def test_a_failed_conversion_leaves_the_cache_usable(tmp_path):
    layout = tmp_path / "img"
    build_image(layout, good_tar(), TarBuilder().file("../escape", b"x").build())
    convert_fails(tmp_path, layout)
    good = tmp_path / "good"
    build_image(good, good_tar(), TarBuilder().file("fine", b"x").build())
    result = dadi_cli(
        "convert", f"oci:{good}:v1", f"oci:{tmp_path / 'out2'}:x", "--cache-dir", str(tmp_path / "cache"), "--json",
        "-q",
    )
    summary = json.loads(result.stdout)
    # The first layer (same chain) was converted by the failed run and is reused now.
    assert [layer["reused"] for layer in summary["layers"]] == [True, False]
