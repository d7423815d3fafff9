"""dadi convert end to end on real images: convert, export, e2fsck, loop-mount, compare with umoci unpack."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import dadi_cli, fsck_clean, loop_mounted

from dadi.image import mediatypes as mt

pytestmark = pytest.mark.needs_root


def convert(src: str, dest: str, cache: Path, *extra: str) -> dict:
    result = dadi_cli("convert", src, dest, "--cache-dir", str(cache), "--json", "-q", *extra)
    return json.loads(result.stdout)


def assert_same_tree_as_umoci(layout: Path, tag: str, dadi_ref: str, work: Path, *extra: str) -> None:
    from images import umoci_unpack
    from treecompare import compare_trees

    work.mkdir(exist_ok=True)
    disk = work / "disk.img"
    dadi_cli("export", dadi_ref, str(disk), "-q", *extra)
    fsck_clean(disk)
    expected = umoci_unpack(layout, tag, work / "bundle")
    with loop_mounted(disk, work / "mnt") as mnt:
        differences = compare_trees(expected, mnt)
    assert differences == [], "dadi export differs from umoci unpack:\n" + "\n".join(differences[:50])


def test_busybox_image_converts_to_the_same_tree_as_umoci_unpack(busybox_image, tmp_path):
    layout, tag = busybox_image
    summary = convert(f"oci:{layout}:{tag}", f"oci:{tmp_path / 'out'}:dadi", tmp_path / "cache")
    assert len(summary["layers"]) >= 5
    assert all(not layer["reused"] for layer in summary["layers"])
    assert_same_tree_as_umoci(layout, tag, f"oci:{tmp_path / 'out'}:dadi", tmp_path)


def test_converted_manifest_carries_dadi_layers_and_annotations(busybox_image, tmp_path):
    layout, tag = busybox_image
    out = tmp_path / "out"
    summary = convert(f"oci:{layout}:{tag}", f"oci:{out}:dadi", tmp_path / "cache")
    info = json.loads(dadi_cli("inspect", f"oci:{out}:dadi", "--json").stdout)
    assert info["dadi"] is True
    assert info["manifest_digest"] == summary["manifest_digest"]
    source = json.loads(dadi_cli("inspect", f"oci:{layout}:{tag}", "--json").stdout)
    for layer, src_diff_id in zip(info["layers"], source["diff_ids"], strict=True):
        assert layer["media_type"] == mt.DADI_LAYER
        assert layer["annotations"][mt.ANN_SOURCE_DIFF_ID] == src_diff_id
        assert layer["chunks"] >= 1 and layer["changed_bytes"] > 0
    # The config's diff_ids name the dadi blobs (what containerd will see as the layers).
    assert info["diff_ids"] == [layer["digest"] for layer in info["layers"]]


def test_conversion_is_reproducible_across_directories_and_caches(busybox_image, tmp_path):
    layout, tag = busybox_image
    first = convert(f"oci:{layout}:{tag}", f"oci:{tmp_path / 'a'}:x", tmp_path / "cache-a")
    second = convert(f"oci:{layout}:{tag}", f"oci:{tmp_path / 'b'}:x", tmp_path / "cache-b")
    assert first["manifest_digest"] == second["manifest_digest"]
    assert [layer["digest"] for layer in first["layers"]] == [layer["digest"] for layer in second["layers"]]
    for layer in first["layers"]:
        hexdigest = layer["digest"].split(":")[1]
        a = (tmp_path / "a" / "blobs" / "sha256" / hexdigest).read_bytes()
        assert a == (tmp_path / "b" / "blobs" / "sha256" / hexdigest).read_bytes()


def test_second_conversion_reuses_every_layer_from_the_cache(busybox_image, tmp_path):
    layout, tag = busybox_image
    cache = tmp_path / "cache"
    first = convert(f"oci:{layout}:{tag}", f"oci:{tmp_path / 'a'}:x", cache)
    again = convert(f"oci:{layout}:{tag}", f"oci:{tmp_path / 'b'}:x", cache)
    assert all(layer["reused"] for layer in again["layers"])
    assert again["manifest_digest"] == first["manifest_digest"]
    # Into the same target again: every blob is there already, nothing is uploaded.
    third = convert(f"oci:{layout}:{tag}", f"oci:{tmp_path / 'b'}:x", cache)
    assert {layer["upload"] for layer in third["layers"]} == {"exists"}


def test_an_image_sharing_lower_layers_converts_only_its_new_layer(busybox_image, tmp_path):
    layout, tag = busybox_image
    cache = tmp_path / "cache"
    base = convert(f"oci:{layout}:{tag}", f"oci:{tmp_path / 'a'}:base", cache)
    # Derive an image with one more layer on top of the same chain, with umoci as a builder would.
    derived = tmp_path / "derived"
    subprocess.run(["cp", "-a", str(layout), str(derived)], check=True)
    subprocess.run(["umoci", "tag", "--image", f"{derived}:{tag}", "derived"], check=True)
    (tmp_path / "hello.txt").write_text("hello\n")
    subprocess.run(
        ["umoci", "insert", "--image", f"{derived}:derived", str(tmp_path / "hello.txt"), "/app/hello.txt"],
        check=True,
    )
    summary = convert(f"oci:{derived}:derived", f"oci:{tmp_path / 'a'}:derived", cache)
    reused = [layer["reused"] for layer in summary["layers"]]
    assert reused == [True] * len(base["layers"]) + [False]
    assert [layer["digest"] for layer in summary["layers"][:-1]] == [layer["digest"] for layer in base["layers"]]
    assert_same_tree_as_umoci(derived, "derived", f"oci:{tmp_path / 'a'}:derived", tmp_path / "check")


def test_docker_archive_source_gives_the_same_image(busybox_image, tmp_path):
    from imagebuilder import write_docker_archive

    layout, tag = busybox_image
    archive = tmp_path / "image.tar"
    write_docker_archive(layout, tag, archive)
    from_oci = convert(f"oci:{layout}:{tag}", f"oci:{tmp_path / 'a'}:x", tmp_path / "cache-a")
    from_archive = convert(f"docker-archive:{archive}", f"oci:{tmp_path / 'b'}:x", tmp_path / "cache-b")
    assert [layer["digest"] for layer in from_archive["layers"]] == [layer["digest"] for layer in from_oci["layers"]]


def test_registry_round_trip(busybox_image, registry, tmp_path):
    layout, tag = busybox_image
    # The source image goes into the registry with skopeo, the real tool, as a CI pipeline would.
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{registry.host}/src:v1"],
        check=True,
        capture_output=True,
    )
    dest = f"docker://{registry.host}/dadi/busybox:v1"
    summary = convert(f"docker://{registry.host}/src:v1", dest, tmp_path / "cache", "--plain-http")
    assert {layer["upload"] for layer in summary["layers"]} == {"uploaded"}
    again = convert(f"docker://{registry.host}/src:v1", dest, tmp_path / "cache", "--plain-http")
    assert {layer["upload"] for layer in again["layers"]} == {"exists"}
    assert again["manifest_digest"] == summary["manifest_digest"]
    # An ordinary client sees an ordinary OCI image.
    raw = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", dest], check=True, capture_output=True
    ).stdout
    assert json.loads(raw)["layers"][0]["mediaType"] == mt.DADI_LAYER
    assert_same_tree_as_umoci(layout, tag, dest, tmp_path, "--plain-http")


@pytest.mark.slow
def test_debian_image_converts_to_the_same_tree_as_umoci_unpack(debian_image, tmp_path):
    layout, tag = debian_image
    summary = convert(f"oci:{layout}:{tag}", f"oci:{tmp_path / 'out'}:dadi", tmp_path / "cache")
    assert len(summary["layers"]) >= 3
    assert_same_tree_as_umoci(layout, tag, f"oci:{tmp_path / 'out'}:dadi", tmp_path)
