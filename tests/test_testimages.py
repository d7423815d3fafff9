"""The test images hold what tests/images.py claims, and tests/treecompare.py sees every difference.

These guard the end-to-end tests' yardstick: if an image silently lost its whiteout or the comparison
stopped noticing a changed owner, a broken converter would pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import images
import pytest
from imagebuilder import OCILayoutBuilder, TarBuilder, read_layout_image, write_docker_archive
from treecompare import compare_trees

needs_root_and_umoci = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("umoci") is None or not images.BUSYBOX.exists(),
    reason="needs root, umoci and busybox-static",
)
pytestmark = needs_root_and_umoci


def children(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


# --- the busybox image -----------------------------------------------------------------------------


def test_busybox_image_is_reproducible(busybox_image, tmp_path):
    layout, tag = busybox_image
    again, _ = images.build_busybox_image(tmp_path)
    assert read_layout_image(again, tag).manifest_digest == read_layout_image(layout, tag).manifest_digest
    assert sorted(p.name for p in (again / "blobs/sha256").iterdir()) == sorted(
        p.name for p in (layout / "blobs/sha256").iterdir()
    )


def test_busybox_image_layers_use_every_compression_and_valid_diff_ids(busybox_image):
    layout, tag = busybox_image
    image = read_layout_image(layout, tag)
    assert [t.rsplit(".", 1)[-1] for t in image.layer_media_types] == [
        "tar+gzip",
        "tar+gzip",
        "tar+zstd",
        "tar",
        "tar+gzip",
    ]
    assert image.config["rootfs"]["diff_ids"] == [
        "sha256:" + hashlib.sha256(t).hexdigest() for t in image.layer_tars()
    ]
    assert (image.config["architecture"], image.config["os"]) == ("amd64", "linux")
    assert len(image.config["history"]) == 5
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == tag


def test_busybox_base_layer_is_umocis_tar_with_applet_links(busybox_image):
    layout, tag = busybox_image
    with tarfile.open(fileobj=io.BytesIO(read_layout_image(layout, tag).layer_tars()[0])) as tar:
        members = {m.name: m for m in tar.getmembers()}
    # umoci stores the first of bin/busybox's hardlinks it meets as the file, the others as links to it.
    stored = [m for m in members.values() if m.isreg() and m.name.startswith("bin/")]
    assert [m.size for m in stored] == [images.BUSYBOX.stat().st_size]
    assert members["bin/sh"].islnk() and members["bin/sh"].linkname == stored[0].name
    assert members["usr/bin/env"].issym() and members["usr/bin/env"].linkname == "../../bin/busybox"
    assert members["sbin/ifconfig"].linkname == "/bin/busybox"
    assert members["tmp"].mode == 0o1777


def test_whiteouts_remove_lower_files_dirs_and_links(busybox_rootfs):
    root = busybox_rootfs
    assert children(root / "data") == {"keep.txt"}  # gone.txt (layer 3) and subdir/ (layer 5) removed
    for gone in ("usr/bin/wget", "bin/ls", "links/dangling", "hl/b", "misc/a-b"):
        assert not os.path.lexists(root / gone), gone
    assert (root / "misc/a.b").exists() and (root / "names/.whale-not-a-whiteout").exists()
    assert not any(name.startswith(".wh.") for _, dirs, files in os.walk(root) for name in dirs + files)


def test_opaque_dirs_hide_lower_children_and_keep_new_ones(busybox_rootfs):
    opq = busybox_rootfs / "opq"
    assert children(opq) == {"keep", "new-before-marker", "new-dir"}
    assert (opq / "keep").read_bytes() == b"new keep\n"
    assert stat.S_IMODE(opq.stat().st_mode) == 0o750
    assert children(busybox_rootfs / "var/log") == set()


def test_whiteout_and_recreate_in_one_layer_keeps_only_the_new_entry(busybox_rootfs):
    root = busybox_rootfs
    assert children(root / "recreate-dir") == {"new-child"}
    assert stat.S_IMODE((root / "recreate-dir").stat().st_mode) == 0o700
    assert (root / "recreate-file").read_bytes() == b"new content, other size\n"
    assert os.readlink(root / "recreate-kind") == "data/keep.txt"


def test_entries_change_kind_without_whiteouts(busybox_rootfs):
    swap = busybox_rootfs / "swap"
    assert (swap / "was-dir").read_bytes() == b"now a file\n"
    assert children(swap / "was-file") == {"child"}
    assert children(swap / "was-link") == {"inside"} and not (swap / "was-link").is_symlink()
    assert os.readlink(swap / "dir-to-link") == "../data"


def test_devices_fifos_and_symlinks(busybox_rootfs):
    root = busybox_rootfs
    for rel, is_kind, numbers in (
        ("dev/null", stat.S_ISCHR, (1, 3)),
        ("dev/big-numbers", stat.S_ISCHR, (250, 70000)),
        ("dev/sda", stat.S_ISBLK, (8, 0)),
    ):
        st = os.lstat(root / rel)
        assert is_kind(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == numbers, rel
    assert stat.S_ISFIFO(os.lstat(root / "run/fifos/pipe").st_mode)
    assert os.readlink(root / "links/abs") == "/etc/passwd"
    assert os.readlink(root / "links/rel") == "../data/keep.txt"
    assert os.readlink(root / "links/dir-rel") == "../data"
    assert os.readlink(root / "links/long-target") == "../" + images.LONG_PATH
    assert os.lstat(root / "links/owned").st_uid == 65537


def test_xattrs_in_every_namespace_survive(busybox_rootfs):
    def xattr(rel, name):
        return os.getxattr(busybox_rootfs / rel, name, follow_symlinks=False)

    assert xattr("xattrs/ping", "security.capability") == images.CAP_NET_RAW_EP
    assert xattr("xattrs/binary", "user.blob") == b"\xff\xfe\x00\x01 not utf-8"
    assert xattr("xattrs/trusted", "trusted.dadi-test") == b"root only"
    assert xattr("xattrs/dir", "user.on-a-dir") == b"yes"
    # Layer 4 re-wrote the file with one xattr: the other one of layer 2 must be gone.
    assert os.listxattr(busybox_rootfs / "xattrs/user") == ["user.comment"]
    assert xattr("xattrs/user", "user.comment") == b"changed"


def test_hardlinks_within_and_across_layers(busybox_rootfs):
    root = busybox_rootfs

    def inode(rel):
        return os.lstat(root / rel).st_ino

    bin_links = [p for p in (root / "bin").iterdir() if p.stat().st_ino == inode("bin/busybox")]
    assert inode("app/bb") == inode("bin/busybox")  # layer 4 links to a layer 1 file
    assert os.lstat(root / "bin/busybox").st_nlink == len(bin_links) + 1
    assert "cat" not in {p.name for p in bin_links} and "sh" in {p.name for p in bin_links}
    assert inode("hl/c") == inode("hl/a") and os.lstat(root / "hl/a").st_nlink == 2
    assert inode("hl/new2") == inode("hl/new1")
    assert inode("hl/to-symlink") == inode("links/abs")
    assert inode("long/link-to-long-path") == inode(images.LONG_PATH)
    # A hardlink entry's own header metadata is ignored: the target's owner and mode hold.
    assert (os.lstat(root / "hl/c").st_uid, stat.S_IMODE(os.lstat(root / "hl/c").st_mode)) == (1000, 0o640)


def test_owners_modes_and_times(busybox_rootfs):
    root = busybox_rootfs

    def st(rel):
        return os.lstat(root / rel)

    assert (st("owners/high").st_uid, st("owners/high").st_gid) == (100000, 100001)
    assert (st("owners/huge").st_uid, st("owners/huge").st_gid) == (4_000_000, 4_000_001)
    for rel, mode in (
        ("modes/setuid", 0o4755),
        ("modes/setgid", 0o2755),
        ("modes/all-bits", 0o7777),
        ("modes/no-perms", 0),
        ("modes/sticky-dir", 0o1777),
        ("modes/setgid-dir", 0o2775),
        ("tmp", 0o1777),
        ("root", 0o700),
        ("app/bin/tool", 0o4755),
        ("etc/hostname", 0o600),
    ):
        assert stat.S_IMODE(st(rel).st_mode) == mode, rel
    assert st("times/fraction").st_mtime_ns == images.T0 * 10**9 + 123456789
    assert st("times/fraction-dir").st_mtime_ns == images.T0 * 10**9 + 500_000_000
    assert st("times/epoch").st_mtime_ns == 0 and st("times/year-2100").st_mtime == 4_102_444_800
    assert st(".").st_mtime_ns == (images.T0 + 100) * 10**9 + 250_000_000
    assert st("order/late").st_mtime == images.T0 - 1000 and stat.S_IMODE(st("order/late").st_mode) == 0o750
    assert st("data").st_mtime == images.T0  # whiteouts below it do not touch a dir's defined mtime


def test_names_long_paths_implicit_dirs_and_big_files(busybox_rootfs):
    root = busybox_rootfs
    assert "ünïcødé ☃ 日本語.txt" in children(root / "names")
    assert (root / "names/tab\there").read_bytes() == b"tab\there\n"
    assert (root / "long" / images.LONG_COMPONENT).read_bytes() == b"long name\n"
    assert len(images.LONG_PATH.encode()) > 255 and (root / images.LONG_PATH).read_bytes() == b"long path\n"
    assert (root / "implicit/a/b/file.txt").read_bytes() == b"parents implicit\n"
    assert stat.S_IMODE((root / "implicit/a/b").stat().st_mode) == 0o711
    assert (root / "misc/empty").stat().st_size == 0
    assert (root / "big/holes.bin").read_bytes() == images._sparse_like_data(4 * 1024 * 1024, seed=1)
    assert (root / "etc/passwd").read_text().endswith("app:x:100000:100000::/app:/bin/sh\n")


def test_image_defines_every_mtime_so_two_unpacks_are_identical(busybox_image, busybox_rootfs, tmp_path):
    # umoci stamps implicitly created dirs with the time of unpacking; the image re-states them later.
    layout, tag = busybox_image
    again = images.umoci_unpack(layout, tag, tmp_path / "bundle")
    assert compare_trees(busybox_rootfs, again) == []
    assert os.lstat(again / "implicit/a/b").st_mtime == images.T0 + 4


def test_docker_archive_holds_the_same_image(busybox_image, busybox_rootfs, tmp_path):
    layout, tag = busybox_image
    archive = write_docker_archive(layout, tag, tmp_path / "image.tar")
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        layer_digests = [
            "sha256:" + hashlib.sha256(tar.extractfile(name).read()).hexdigest()
            for name in manifest[0]["Layers"]
        ]
        config = json.loads(tar.extractfile(manifest[0]["Config"]).read())
    assert manifest[0]["RepoTags"] == [f"dadi-test/{tag}:latest"]
    assert layer_digests == config["rootfs"]["diff_ids"]
    # skopeo, the converter's own transport, reads it back into a layout umoci unpacks identically.
    subprocess.run(
        ["skopeo", "copy", "--quiet", f"docker-archive:{archive}", f"oci:{tmp_path / 'copied'}:{tag}"],
        check=True,
    )
    rootfs = images.umoci_unpack(tmp_path / "copied", tag, tmp_path / "bundle")
    assert compare_trees(busybox_rootfs, rootfs) == []


def test_layout_builder_keeps_other_tags_and_writes_go_style_pax(tmp_path):
    first = OCILayoutBuilder(tmp_path, "one")
    first.add_layer(TarBuilder().file("a", b"a").build(), compression="none")
    first.write()
    second = OCILayoutBuilder(tmp_path, "two")
    tar_bytes = TarBuilder().file("b", b"b", xattrs={"user.x": b"\xff"}, mtime="1600000000.5").build()
    second.add_layer(tar_bytes, compression="zstd")
    second.write()
    assert (
        read_layout_image(tmp_path, "one").layer_tars()[0]
        != read_layout_image(tmp_path, "two").layer_tars()[0]
    )
    assert b"hdrcharset" not in tar_bytes  # Go never writes it; a reader must cope with raw bytes
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        member = tar.getmember("b")
    assert member.pax_headers["mtime"] == "1600000000.5"


# --- compare_trees ---------------------------------------------------------------------------------


@pytest.fixture
def tree_copy(busybox_rootfs, tmp_path) -> Path:
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", busybox_rootfs, copy], check=True)
    return copy


@contextlib.contextmanager
def mtimes_kept(*paths: Path):
    """Undo the mtime side effects of a mutation, so that each mutation shows up as exactly one line."""
    saved = [(p, os.lstat(p).st_mtime_ns) for p in paths]
    yield
    for path, ns in saved:
        os.utime(path, ns=(ns, ns), follow_symlinks=False)


def test_compare_trees_finds_nothing_in_an_identical_copy(busybox_rootfs, tree_copy):
    with mtimes_kept(tree_copy):
        (tree_copy / "lost+found").mkdir()  # what mkfs leaves in an exported disk: ignored by default
    assert compare_trees(busybox_rootfs, tree_copy) == []


def _replace_with_copy(path: Path) -> None:
    with mtimes_kept(path.parent):
        data, st = path.read_bytes(), os.lstat(path)
        path.unlink()
        path.write_bytes(data)
        os.chmod(path, stat.S_IMODE(st.st_mode))
        os.chown(path, st.st_uid, st.st_gid)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _replace_symlink(path: Path, target: str) -> None:
    with mtimes_kept(path.parent):
        ns = os.lstat(path).st_mtime_ns
        path.unlink()
        os.symlink(target, path)
        os.utime(path, ns=(ns, ns), follow_symlinks=False)


def _remove(path: Path) -> None:
    with mtimes_kept(path.parent):
        path.unlink()


def _add_file(path: Path) -> None:
    with mtimes_kept(path.parent):
        path.write_bytes(b"new")


def _file_to_dir(path: Path) -> None:
    with mtimes_kept(path.parent):
        path.unlink()
        path.mkdir()


def _rewrite(path: Path, data: bytes) -> None:
    with mtimes_kept(path):
        path.write_bytes(data)


def _mknod(path: Path, major: int, minor: int) -> None:
    with mtimes_kept(path.parent, path):
        st = os.lstat(path)
        path.unlink()
        os.mknod(path, stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(path, stat.S_IMODE(st.st_mode))  # mknod's mode passes through the umask


MUTATIONS = {
    "chmod": (lambda r: os.chmod(r / "etc/passwd", 0o600), "etc/passwd: mode 0644 != 0600"),
    "setuid dropped": (lambda r: os.chmod(r / "modes/setuid", 0o755), "modes/setuid: mode 4755 != 0755"),
    "sticky dropped": (lambda r: os.chmod(r / "tmp", 0o777), "tmp: mode 1777 != 0777"),
    "root dir mode": (lambda r: os.chmod(r, 0o700), ".: mode 0755 != 0700"),
    "chown uid": (lambda r: os.chown(r / "owners/high", 5, -1), "owners/high: uid 100000 != 5"),
    "chown gid": (lambda r: os.chown(r / "owners/huge", -1, 7), "owners/huge: gid 4000001 != 7"),
    "symlink owner": (
        lambda r: os.chown(r / "links/owned", 0, -1, follow_symlinks=False),
        "links/owned: uid 65537 != 0",
    ),
    "content, same size": (
        lambda r: _rewrite(r / "data/keep.txt", b"KEPT\n"),
        "data/keep.txt: content sha256 "
        + hashlib.sha256(b"kept\n").hexdigest()
        + " != "
        + hashlib.sha256(b"KEPT\n").hexdigest(),
    ),
    "size": (lambda r: _rewrite(r / "misc/empty", b"x"), "misc/empty: size 0 != 1"),
    "xattr value": (
        lambda r: os.setxattr(r / "xattrs/user", "user.comment", b"other"),
        "xattrs/user: xattr user.comment b'changed' != b'other'",
    ),
    "xattr added": (
        lambda r: os.setxattr(r / "etc/motd", "trusted.extra", b"1"),
        "etc/motd: xattr trusted.extra unexpected (b'1')",
    ),
    "capability lost": (
        lambda r: os.removexattr(r / "xattrs/ping", "security.capability"),
        f"xattrs/ping: xattr security.capability missing (expected {images.CAP_NET_RAW_EP!r})",
    ),
    "mtime nanoseconds": (
        lambda r: os.utime(r / "times/fraction", ns=(0, images.T0 * 10**9 + 123456790)),
        "times/fraction: mtime 1600000000.123456789 != 1600000000.123456790",
    ),
    "symlink mtime": (
        lambda r: os.utime(r / "links/dir-abs", ns=(0, 0), follow_symlinks=False),
        "links/dir-abs: mtime 1600000000.000000000 != 0.000000000",
    ),
    "hardlink broken": (lambda r: _replace_with_copy(r / "hl/c"), "hl/a: hardlinked with ['hl/c'] != []"),
    "symlink target": (
        lambda r: _replace_symlink(r / "links/rel", "../data/other"),
        "links/rel: symlink target '../data/keep.txt' != '../data/other'",
    ),
    "missing": (lambda r: _remove(r / "etc/group"), "etc/group: missing (file)"),
    "unexpected": (lambda r: _add_file(r / "etc/extra"), "etc/extra: unexpected (file)"),
    "type": (lambda r: _file_to_dir(r / "etc/motd"), "etc/motd: type file != dir"),
    "device numbers": (lambda r: _mknod(r / "dev/null", 1, 5), "dev/null: device 1:3 != 1:5"),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_compare_trees_reports_each_difference_in_one_line(busybox_rootfs, tree_copy, mutation):
    mutate, expected_line = MUTATIONS[mutation]
    mutate(tree_copy)
    assert compare_trees(busybox_rootfs, tree_copy) == [expected_line]


def test_compare_trees_can_compare_whole_seconds(busybox_rootfs, tree_copy):
    os.utime(tree_copy / "times/fraction", ns=(0, images.T0 * 10**9))
    assert compare_trees(busybox_rootfs, tree_copy, mtime_resolution_ns=10**9) == []
    assert len(compare_trees(busybox_rootfs, tree_copy)) == 1


# --- the Debian image ------------------------------------------------------------------------------


@pytest.mark.slow
def test_debian_image_builds_with_umoci_and_caches_debootstrap(tmp_path):
    cache = images.default_cache_dir()  # may already hold the tarball: then "first" is a cached build too
    started = time.monotonic()
    layout, tag = images.build_debian_image(tmp_path / "first", cache)
    first_seconds = time.monotonic() - started
    assert (cache / images.DEBIAN_CACHE_NAME).exists()
    started = time.monotonic()
    again, _ = images.build_debian_image(tmp_path / "again", cache)
    cached_seconds = time.monotonic() - started
    print(f"debian image: first build {first_seconds:.1f} s, cached build {cached_seconds:.1f} s")
    try:
        image = read_layout_image(layout, tag)
        assert len(image.layer_blobs) >= 3
        assert read_layout_image(again, tag).manifest_digest == image.manifest_digest
        rootfs = images.umoci_unpack(layout, tag, tmp_path / "bundle")
        assert (rootfs / "etc/debian_version").read_text().startswith("12.")
        assert not (rootfs / "etc/motd").exists() and not (rootfs / "usr/share/doc/apt").exists()
        assert (rootfs / "usr/share/doc/bash/copyright").exists()  # from the docs layer
        assert (rootfs / "etc/hostname").read_text() == "dadi-debian\n"
        assert os.stat(rootfs / "opt/app/bin/bash").st_ino == os.stat(rootfs / "usr/bin/bash").st_ino
        assert os.readlink(rootfs / "usr/local/bin/app") == "/opt/app/bin/run"
        assert compare_trees(rootfs, images.umoci_unpack(layout, tag, tmp_path / "bundle2")) == []
    finally:
        shutil.rmtree(tmp_path)
