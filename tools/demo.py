#!/usr/bin/env python3
"""`make demo`: the converter's main job end to end, on a real image, printing what happened.

1. build a small real OCI image (busybox-static over several layers, with umoci and hand-made tars);
2. start docker-registry on loopback;
3. `dadi convert` it into the registry as a dadi image (and once more: everything is reused);
4. `dadi inspect` the result;
5. `dadi export` it from the registry into a raw ext4 disk, `e2fsck -fn` it, loop-mount it read-only,
   and run the image's busybox from it;
6. stop the registry and clean up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test-image builders and the registry helper

from images import build_busybox_image  # noqa: E402
from registry_server import RegistryServer  # noqa: E402

DADI = str(REPO / ".venv" / "bin" / "dadi")


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(*cmd: str, capture: bool = False) -> str:
    print("$ " + " ".join(cmd), flush=True)
    result = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return result.stdout if capture else ""


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="dadi-demo-"))
    mnt = work / "mnt"
    try:
        step("build a real OCI image (busybox-static, several layers)")
        layout, tag = build_busybox_image(work / "src")
        print(f"built oci:{layout}:{tag}")

        with RegistryServer(work / "registry") as registry:
            step(f"docker-registry listening on {registry.host}")
            dest = f"docker://{registry.host}/demo/busybox:dadi"
            step("convert (user space: no root, no mount)")
            out = run(DADI, "convert", f"oci:{layout}:{tag}", dest, "--plain-http", "--json",
                      "--cache-dir", str(work / "cache"), capture=True)
            summary = json.loads(out)
            print(f"{len(summary['layers'])} layers, {summary['source_bytes']} source bytes -> "
                  f"{summary['dadi_bytes']} dadi bytes in {summary['seconds']} s; manifest {summary['manifest_digest']}")

            step("convert again: every layer chain comes from the cache, every blob is in the registry")
            again = json.loads(run(DADI, "convert", f"oci:{layout}:{tag}", dest, "--plain-http", "--json", "-q",
                                   "--cache-dir", str(work / "cache"), capture=True))
            print(f"reused {again['layers_reused']}/{len(again['layers'])} layers, uploads: "
                  f"{sorted({layer['upload'] for layer in again['layers']})}, same digest: "
                  f"{again['manifest_digest'] == summary['manifest_digest']}")

            step("inspect the dadi image in the registry")
            run(DADI, "inspect", dest, "--plain-http")

            step("export it from the registry to a raw ext4 disk and check it")
            disk = work / "disk.img"
            run(DADI, "export", dest, str(disk), "--plain-http")
            print(f"disk: {disk.stat().st_size} bytes virtual, {disk.stat().st_blocks * 512} bytes allocated")
            run("e2fsck", "-fn", str(disk))

        if os.geteuid() == 0:
            step("loop-mount it read-only and run the image's busybox")
            mnt.mkdir()
            run("mount", "-t", "ext4", "-o", "loop,ro", str(disk), str(mnt))
            try:
                run("ls", "-l", str(mnt))
                run(str(mnt / "bin" / "busybox"), "echo", "hello from a dadi image")
            finally:
                subprocess.run(["umount", str(mnt)], check=False)
        step("done")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
