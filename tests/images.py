"""Real OCI test images: a small busybox image with every corner of layer semantics, and a Debian one.

Test support for the end-to-end tests (image -> `dadi convert` -> `dadi export` -> e2fsck -> mount ->
compare with `umoci unpack` of the same image). umoci is the reference builder and unpacker here: the
busybox base layer comes out of `umoci repack`, the Debian layers out of `umoci insert`/`umoci repack`;
the busybox fixture layers are hand-written tars because no builder emits all the odd cases.

Facts about umoci 0.4.7 (Debian's) that shaped the images, found by experiment:
- it keeps nanosecond mtimes from PAX records, and restores a parent directory's mtime after adding
  or whiting out a child, but the directories it creates implicitly (MkdirAll for a child whose parents
  have no entries) get the time of unpacking, and so does the parent of the topmost one. Nothing
  defines those mtimes, so the busybox image states the parent again later in the same layer, and the
  implicit dirs themselves in the next layer: the final tree is fully defined (two `umoci unpack`s at
  different times are identical), while the converter still has to create implicit parents;
- it cannot read zstd layers ("blob is not correct mediatype"), so `umoci_unpack` hands it a copy of
  the layout with those layers recompressed as gzip: the same tars, the same diff ids;
- opaque markers work whichever side of the new children they stand on in the tar.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

from imagebuilder import (
    LAYER_MEDIA_TYPES,
    OCILayoutBuilder,
    TarBuilder,
    compress,
    decompress,
    read_layout_image,
    sha256_digest,
)

BUSYBOX = Path("/bin/busybox")
BUSYBOX_TAG = "busybox-cases"
DEBIAN_TAG = "debian-bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_CACHE_NAME = "debian-bookworm-minbase.tar"
DEBIAN_MTIME = 1_686_355_200  # 2023-06-10, bookworm's release: what the app layer's edits are stamped with

# security.capability, VFS_CAP_REVISION_2, effective flag set, permitted = CAP_NET_RAW (bit 13):
# exactly what `setcap cap_net_raw+ep` writes.
CAP_NET_RAW_EP = bytes.fromhex("0100000200200000000000000000000000000000")

# Debian content moved out of the base layer into a layer of its own.
DEBIAN_DOC_DIRS = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info")

T0 = 1_600_000_000  # a fixed instant: every mtime in the busybox image is derived from it

LONG_COMPONENT = "n" * 150 + ".txt"  # > 100 bytes: no room in the ustar name field, needs PAX
LONG_DIRS = ["long/" + "/".join(["d" * 60] * depth) for depth in range(1, 5)]
LONG_PATH = LONG_DIRS[-1] + "/" + "f" * 120  # > 255 bytes in total: no room in ustar prefix+name either


def _run(*args: str | Path, cwd: Path | None = None) -> None:
    subprocess.run([str(a) for a in args], check=True, cwd=cwd, stdout=subprocess.DEVNULL)


# --- busybox image -------------------------------------------------------------------------------


def _busybox_base_layer(workdir: Path) -> bytes:
    """Layer 1, built by umoci: busybox with its applets, as `busybox --install` lays them out.

    Applets in bin/ are hardlinks of bin/busybox (plain `--install`), the others absolute or relative
    symlinks (`--install -s` style). Returns the uncompressed tar umoci wrote.
    """
    layout, bundle = workdir / "umoci-layout", workdir / "umoci-bundle"
    shutil.rmtree(layout, ignore_errors=True)
    shutil.rmtree(bundle, ignore_errors=True)
    _run("umoci", "init", "--layout", layout)
    _run("umoci", "new", "--image", f"{layout}:base")
    _run("umoci", "unpack", "--image", f"{layout}:base", bundle)
    rootfs = bundle / "rootfs"

    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "var/log", "run", "home"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").mkdir()
    (rootfs / "root").mkdir()
    os.chmod(rootfs / "tmp", 0o1777)  # chmod, not mkdir(mode=): the umask would strip bits
    os.chmod(rootfs / "root", 0o700)
    shutil.copyfile(BUSYBOX, rootfs / "bin/busybox")
    os.chmod(rootfs / "bin/busybox", 0o755)
    applets = subprocess.run(
        [BUSYBOX, "--list-full"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in sorted(applets):
        if applet == "bin/busybox":
            continue
        target = rootfs / applet
        target.parent.mkdir(parents=True, exist_ok=True)
        if applet.startswith("bin/"):
            os.link(rootfs / "bin/busybox", target)
        elif applet.startswith("usr/bin/"):
            os.symlink("../../bin/busybox", target)
        elif "/" not in applet:
            os.symlink("bin/busybox", target)
        else:
            os.symlink("/bin/busybox", target)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (rootfs / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (rootfs / "etc/hostname").write_text("dadi-test\n")
    (rootfs / "var/log/boot.log").write_text("hidden by an opaque marker in layer 5\n")
    # umoci writes whole-second mtimes (it rounds), so whole seconds keep its tar reproducible.
    for dirpath, dirnames, filenames in os.walk(rootfs, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (T0, T0), follow_symlinks=False)
    os.chmod(rootfs, 0o755)
    os.utime(rootfs, (T0, T0))

    _run(
        "umoci",
        "repack",
        "--image",
        f"{layout}:base",
        "--history.created",
        "2020-09-13T12:26:40Z",
        "--history.comment",
        "busybox base",
        bundle,
    )
    tar_bytes = read_layout_image(layout, "base").layer_tars()[-1]
    shutil.rmtree(layout)
    shutil.rmtree(bundle)
    return tar_bytes


def _sparse_like_data(size: int, seed: int) -> bytes:
    """Random 256 KiB runs alternating with zero runs: holes for a converter that makes files sparse."""
    rng = random.Random(seed)
    out = bytearray(size)
    for offset in range(0, size, 768 * 1024):
        chunk = rng.randbytes(256 * 1024)
        out[offset : offset + len(chunk)] = chunk[: size - offset]
    return bytes(out)


def _fixtures_layer() -> bytes:
    """Layer 2 (gzip): everything the upper layers will whiteout, hide, replace or link to, plus all
    kinds of entries, owners, modes, times, xattrs, names."""
    t = TarBuilder()
    t.dir("data").file("data/gone.txt", b"whited out in layer 3\n").file("data/keep.txt", b"kept\n")
    t.dir("data/subdir").file("data/subdir/a", b"a\n").dir("data/subdir/deeper").file("data/subdir/deeper/b")

    t.dir("opq").file("opq/lower-file", b"hidden by the opaque marker\n").file("opq/keep", b"old keep\n")
    t.dir("opq/lower-dir").file("opq/lower-dir/child", b"hidden too\n")
    t.dir("recreate-dir").file("recreate-dir/old-child", b"must disappear\n")
    t.file("recreate-file", b"old content\n").file("recreate-kind", b"a file that becomes a symlink\n")

    t.dir("swap").dir("swap/was-dir").file("swap/was-dir/child", b"gone with its dir\n")
    t.file("swap/was-file", b"becomes a dir\n").symlink("swap/was-link", "/etc").dir("swap/dir-to-link")
    t.file("swap/dir-to-link/child", b"gone too\n")

    t.dir("hl").file("hl/a", b"hardlinked content\n", mode=0o640, uid=1000, gid=1000).hardlink("hl/b", "hl/a")

    t.dir("links").symlink("links/abs", "/etc/passwd").symlink("links/rel", "../data/keep.txt")
    t.symlink("links/dangling", "/nonexistent/target").symlink("links/dir-abs", "/etc")
    t.symlink("links/dir-rel", "../data").symlink("links/self-loop", "self-loop")
    t.symlink("links/long-target", "../" + LONG_PATH).symlink("links/owned", "../data", uid=65537, gid=65538)
    t.hardlink("hl/to-symlink", "links/abs")

    t.chardev("dev/null", 1, 3).chardev("dev/big-numbers", 250, 70000, mode=0o600)
    t.blockdev("dev/sda", 8, 0, gid=6).dir("run/fifos").fifo("run/fifos/pipe", mode=0o620)

    t.dir("owners").file("owners/high", b"uid above 65535\n", uid=100000, gid=100001)
    t.file("owners/huge", b"uid too big for ustar: PAX\n", uid=4_000_000, gid=4_000_001)
    t.dir("owners/dir-high", mode=0o750, uid=70000, gid=70001).file("owners/dir-high/f", uid=70000)

    t.dir("modes").file("modes/setuid", b"#!/bin/sh\n", mode=0o4755).file("modes/setgid", b"x", mode=0o2755)
    t.file("modes/all-bits", b"x", mode=0o7777).file("modes/no-perms", b"x", mode=0o000)
    t.dir("modes/sticky-dir", mode=0o1777).dir("modes/setgid-dir", mode=0o2775, gid=50)
    t.file("modes/sticky-dir/f", b"x", mode=0o600)

    t.dir("times").file("times/fraction", b"x", mtime=f"{T0}.123456789").file("times/epoch", b"x", mtime=0)
    t.file("times/year-2100", b"x", mtime=4_102_444_800).dir("times/fraction-dir", mtime=f"{T0}.5")

    t.dir("xattrs").file(
        "xattrs/user", b"x", xattrs={"user.comment": b"hello", "user.mime_type": b"text/plain"}
    )
    t.file("xattrs/binary", b"x", xattrs={"user.blob": b"\xff\xfe\x00\x01 not utf-8"})
    t.file(
        "xattrs/ping",
        b"#!/bin/sh\necho pretend ping\n",
        mode=0o755,
        xattrs={"security.capability": CAP_NET_RAW_EP},
    )
    t.file("xattrs/trusted", b"x", xattrs={"trusted.dadi-test": b"root only"})
    t.dir("xattrs/dir", xattrs={"user.on-a-dir": b"yes"})

    t.dir("long").file("long/" + LONG_COMPONENT, b"long name\n")
    for d in LONG_DIRS:
        t.dir(d)
    t.file(LONG_PATH, b"long path\n").hardlink("long/link-to-long-path", LONG_PATH)

    t.dir("names")
    for name in (
        "with space.txt",
        "single'quote",
        'double"quote',
        "back\\slash",
        "ünïcødé ☃ 日本語.txt",
        "-leading-dash",
        "semi;colon&amp",
        ".hidden",
        ".whale-not-a-whiteout",
        "tab\there",
        "#hash",
    ):
        t.file(f"names/{name}", name.encode() + b"\n")

    t.dir("implicit").dir("order").dir("misc").file("misc/empty", b"")
    t.file("misc/a-b", b"sorts after misc/a.b in some orders\n").file("misc/a.b", b"x")
    t.dir("big").file("big/holes.bin", _sparse_like_data(4 * 1024 * 1024, seed=1), mode=0o600)
    t.file("big/zeros.bin", bytes(1024 * 1024))
    return t.build()


def _changes_layer() -> bytes:
    """Layer 3 (zstd): whiteouts, opaque dirs, re-creations, swaps, hardlinks across layers."""
    t = TarBuilder()
    t.whiteout("data/gone.txt")

    # Opaque: the dir entry itself changes mode; new children on both sides of the marker stay.
    t.dir("opq", mode=0o750).file("opq/new-before-marker", b"new\n").opaque("opq")
    t.file("opq/keep", b"new keep\n").dir("opq/new-dir").file("opq/new-dir/x", b"x\n")

    # Whiteout and re-creation in one layer: only the lower incarnation disappears.
    t.whiteout("recreate-dir").dir("recreate-dir", mode=0o700).file("recreate-dir/new-child", b"new\n")
    t.whiteout("recreate-file").file("recreate-file", b"new content, other size\n", mode=0o600)
    t.whiteout("recreate-kind").symlink("recreate-kind", "data/keep.txt")

    # Replacement without whiteouts: the kind of entry changes.
    t.file("swap/was-dir", b"now a file\n").dir("swap/was-file", mode=0o711).file("swap/was-file/child")
    t.dir("swap/was-link").file("swap/was-link/inside", b"inside\n").symlink("swap/dir-to-link", "../data")

    t.hardlink("hl/c", "hl/a")  # target in a lower layer
    t.file("hl/new1", b"new group\n", mode=0o755).hardlink("hl/new2", "hl/new1")

    # A child with no entries for its parents; then children before their parent's own entry.
    t.file("implicit/a/b/file.txt", b"parents implicit\n")
    t.file("order/late/child", b"before its parent\n").dir("order/late", mode=0o750, mtime=T0 - 1000)
    # umoci's MkdirAll touches these two; re-stating them keeps their mtime defined.
    t.dir("implicit", mtime=T0 + 1).dir("order", mtime=T0 + 2)
    return t.build()


def _app_layer() -> bytes:
    """Layer 4 (uncompressed): the sort of change an application layer makes."""
    t = TarBuilder()
    t.whiteout("bin/ls")  # one of bin/busybox's hardlinks: the others keep the inode
    t.whiteout("usr/bin/wget").whiteout("links/dangling").whiteout("hl/b")
    t.file("bin/cat", b'#!/bin/sh\nexec /bin/busybox cat "$@"\n', mode=0o755)  # a hardlink replaced
    t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:100000:100000::/app:/bin/sh\n")
    t.file("etc/hostname", b"dadi-test\n", mode=0o600)  # same content, new mode
    t.file("xattrs/user", b"x", xattrs={"user.comment": b"changed"})  # the other xattr goes away
    t.dir("app", mode=0o755, uid=100000, gid=100000).dir("app/bin", uid=100000, gid=100000)
    t.file("app/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o4755).hardlink("app/bb", "bin/busybox")
    t.file("app/config.json", b'{"answer": 42}\n', uid=100000, gid=100000, mtime=f"{T0 + 5}.000000001")
    # Layer 3 created these implicitly, with whatever metadata the unpacker chose: define it now.
    t.dir("implicit/a", mtime=T0 + 3).dir("implicit/a/b", mode=0o711, mtime=T0 + 4)
    return t.build()


def _final_layer() -> bytes:
    """Layer 5 (gzip): root dir metadata, an emptied dir, a whole tree whited out."""
    t = TarBuilder()
    t.dir(".", mode=0o755, mtime=f"{T0 + 100}.25")
    t.opaque("var/log").whiteout("data/subdir").whiteout("misc/a-b")
    t.file("etc/motd", b"built by tests/images.py\n")
    return t.build()


def build_busybox_image(workdir: Path) -> tuple[Path, str]:
    """Build the busybox test image (5 layers: gzip, gzip, zstd, uncompressed, gzip) under `workdir`.

    Returns (layout dir, tag). The same machine and busybox binary give the same manifest digest.
    Needs root (umoci unpack/repack of the base layer) and /bin/busybox.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    layout = workdir / "busybox-oci"
    shutil.rmtree(layout, ignore_errors=True)
    builder = OCILayoutBuilder(layout, BUSYBOX_TAG)
    builder.add_layer(_busybox_base_layer(workdir), compression="gzip", comment="busybox base (umoci repack)")
    builder.add_layer(_fixtures_layer(), compression="gzip", comment="fixtures for the upper layers")
    builder.add_layer(_changes_layer(), compression="zstd", comment="whiteouts, opaque dirs, swaps")
    builder.add_layer(_app_layer(), compression="none", comment="application layer")
    builder.add_layer(_final_layer(), compression="gzip", comment="root metadata, emptied dirs")
    builder.write()
    return layout, BUSYBOX_TAG


# --- Debian image --------------------------------------------------------------------------------


def _debian_rootfs_tarball(workdir: Path, cache_dir: Path) -> Path:
    """The debootstrapped minbase rootfs as a tarball, built once per cache_dir."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarball = cache_dir / DEBIAN_CACHE_NAME
    if tarball.exists():
        return tarball
    target = workdir / "debootstrap-rootfs"
    shutil.rmtree(target, ignore_errors=True)
    _run("debootstrap", "--variant=minbase", "bookworm", target, DEBIAN_MIRROR)
    # Neither apt's downloaded .debs nor its lists belong in an image; debootstrap leaves them behind.
    shutil.rmtree(target / "var/cache/apt/archives", ignore_errors=True)
    (target / "var/cache/apt/archives/partial").mkdir(parents=True)
    partial = tarball.with_suffix(".partial")
    _run(
        "tar",
        "--create",
        "--file",
        partial,
        "--numeric-owner",
        "--xattrs",
        "--xattrs-include=*",
        "--sort=name",
        "--directory",
        target,
        ".",
    )
    partial.rename(tarball)  # a crash mid-tar must not leave a truncated cache behind
    shutil.rmtree(target)
    return tarball


def _set_mtimes(mtime: int, *paths: Path) -> None:
    for path in paths:
        if os.path.lexists(path):
            os.utime(path, (mtime, mtime), follow_symlinks=False)


def _extract(tarball: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    _run(
        "tar",
        "--extract",
        "--file",
        tarball,
        "--numeric-owner",
        "--xattrs",
        "--xattrs-include=*",
        "--directory",
        dest,
    )


def build_debian_image(workdir: Path, cache_dir: Path) -> tuple[Path, str]:
    """Build a 3-layer Debian bookworm minbase image with umoci under `workdir`.

    Layer 1: the rootfs without docs, man pages, locales (`umoci insert`); layer 2: those
    (`umoci insert` of a tree holding only them, so the lower dirs are not repeated); layer 3: an
    application layer made by `umoci unpack`, editing the rootfs, `umoci repack` - so umoci writes the
    whiteouts for what was deleted. The first call runs debootstrap (minutes), later ones reuse the
    tarball in cache_dir. Needs root.
    """
    workdir, cache_dir = Path(workdir), Path(cache_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    tarball = _debian_rootfs_tarball(workdir, cache_dir)
    layout, scratch = workdir / "debian-oci", workdir / "debian-scratch"
    for path in (layout, scratch):
        shutil.rmtree(path, ignore_errors=True)
    image = f"{layout}:{DEBIAN_TAG}"
    created = ("--history.created", "2023-06-10T00:00:00Z")

    rootfs, docs = scratch / "rootfs", scratch / "docs"
    _extract(tarball, rootfs)
    for rel in DEBIAN_DOC_DIRS:
        if (rootfs / rel).exists():
            (docs / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(rootfs / rel, docs / rel)
            (rootfs / rel).mkdir()  # the empty dir stays in the base, as in slim images
            shutil.copystat(docs / rel, rootfs / rel)
    _set_mtimes(DEBIAN_MTIME, rootfs / "usr/share")  # the moves touched it; keep the layer reproducible
    _run("umoci", "init", "--layout", layout)
    _run("umoci", "new", "--image", image)
    _run(
        "umoci",
        "config",
        "--image",
        image,
        "--created",
        "2023-06-10T00:00:00Z",
        "--config.cmd",
        "/bin/bash",
        "--no-history",
    )
    _run(
        "umoci", "insert", "--image", image, *created, "--history.comment", "debootstrap minbase", rootfs, "/"
    )
    for rel in DEBIAN_DOC_DIRS:
        if (docs / rel).exists():
            _run(
                "umoci", "insert", "--image", image, *created, "--history.comment", rel, docs / rel, "/" + rel
            )

    bundle = scratch / "bundle"
    _run("umoci", "unpack", "--image", image, bundle)
    app_root = bundle / "rootfs"
    (app_root / "etc/motd").unlink()  # whiteout of a file
    shutil.rmtree(app_root / "usr/share/doc/apt")  # whiteout of a dir of the docs layer
    shutil.rmtree(app_root / "var/lib/apt/lists", ignore_errors=True)
    (app_root / "etc/hostname").write_text("dadi-debian\n")  # a modified file
    (app_root / "opt/app/bin").mkdir(parents=True)
    (app_root / "opt/app/bin/run").write_text("#!/bin/sh\nexec /bin/bash -c 'echo app'\n")
    os.chmod(app_root / "opt/app/bin/run", 0o755)
    os.link(app_root / "usr/bin/bash", app_root / "opt/app/bin/bash")  # hardlink to a lower-layer file
    os.symlink("/opt/app/bin/run", app_root / "usr/local/bin/app")
    (app_root / "opt/app/data.bin").write_bytes(random.Random(7).randbytes(512 * 1024))
    _set_mtimes(
        DEBIAN_MTIME,
        *(app_root / p for p in ("etc", "etc/hostname", "usr/share/doc", "var/lib/apt", "usr/local/bin")),
        *(app_root / p for p in ("usr/local/bin/app", "opt", "opt/app", "opt/app/bin", "opt/app/bin/run")),
        app_root / "opt/app/data.bin",
    )
    _run("umoci", "repack", "--image", image, *created, "--history.comment", "app", bundle)
    _run("umoci", "gc", "--layout", layout)
    shutil.rmtree(scratch)
    return layout, DEBIAN_TAG


def default_cache_dir() -> Path:
    """Where tests keep the debootstrap tarball between runs: $DADI_TEST_CACHE, else the repo's
    .cache/test-images (the same place tests/conftest.py uses)."""
    return Path(
        os.environ.get("DADI_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "test-images")
    )


# --- unpacking with umoci ------------------------------------------------------------------------


def _layout_umoci_can_read(layout_dir: Path, tag: str, scratch: Path) -> Path:
    """A copy of the layout in which zstd layers are gzip ones, or the layout itself if it has none."""
    image = read_layout_image(layout_dir, tag)
    if not any(t.endswith("+zstd") for t in image.layer_media_types):
        return layout_dir
    copy = scratch / "layout-gzip"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(layout_dir, copy)
    manifest = json.loads(json.dumps(image.manifest))
    for descriptor, blob in zip(manifest["layers"], image.layer_blobs, strict=True):
        if descriptor["mediaType"].endswith("+zstd"):
            gz = compress(decompress(blob, descriptor["mediaType"]), "gzip")
            descriptor.update(mediaType=LAYER_MEDIA_TYPES["gzip"], digest=sha256_digest(gz), size=len(gz))
            (copy / "blobs/sha256" / descriptor["digest"].split(":")[1]).write_bytes(gz)
    manifest_bytes = json.dumps(manifest).encode()
    (copy / "blobs/sha256" / sha256_digest(manifest_bytes).split(":")[1]).write_bytes(manifest_bytes)
    index = json.loads((copy / "index.json").read_text())
    for descriptor in index["manifests"]:
        if descriptor.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            descriptor.update(digest=sha256_digest(manifest_bytes), size=len(manifest_bytes))
    (copy / "index.json").write_text(json.dumps(index))
    return copy


def umoci_unpack(layout_dir: Path, tag: str, dest: Path) -> Path:
    """`umoci unpack` the tagged image into the bundle dir `dest` (must not exist); returns its rootfs.

    Needs root, so that owners, devices and trusted.* xattrs are real. zstd layers, which umoci 0.4.7
    cannot read, are recompressed to gzip in a scratch copy beside `dest` first.
    """
    dest = Path(dest)
    scratch = dest.parent / (dest.name + ".umoci-scratch")
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        readable = _layout_umoci_can_read(Path(layout_dir), tag, scratch)
        _run("umoci", "unpack", "--image", f"{readable}:{tag}", dest)
    finally:
        shutil.rmtree(scratch)
    return dest / "rootfs"


def layer_member_names(layout_dir: Path, tag: str) -> list[list[str]]:
    """The entry names of every layer tar, bottom layer first (for tests that check the tars)."""
    result = []
    for tar_bytes in read_layout_image(layout_dir, tag).layer_tars():
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            result.append(tar.getnames())
    return result
