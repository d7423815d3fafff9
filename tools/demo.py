#!/usr/bin/env python3
"""`make demo`: a real image from conversion to a lazily mounted container, printing what happened.

1. build a small real OCI image (busybox-static over several layers, with umoci and hand-made tars);
2. start docker-registry on loopback;
3. `dadi convert` it into the registry as a dadi image (and once more: everything is reused);
4. `dadi inspect` the result;
5. `dadi export` it from the registry into a raw ext4 disk, `e2fsck -fn` it, loop-mount it read-only,
   and run the image's busybox from it;
6. `dadi mount` it lazily from the registry (a node daemon of the demo's own, under its temp dir, with
   background prefetch held back 5 s), run a command chrooted into it, and print what came on demand
   against the whole image, and how long the mount and the command took;
7. wait until the background prefetch is done (every chunk local, every layer verified), `dadi ls`;
8. `dadi umount`, stop the daemon, stop the registry, and check that no mount or loop device is left.

Needs root (umoci, loop devices, FUSE). Whatever it starts is undone in `finally` blocks, also when a
step fails or on Ctrl-C: mounts, loop devices, the daemon, the registry, the temp dir.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test-image builders and the registry helper

from images import build_busybox_image  # noqa: E402
from registry_server import RegistryServer  # noqa: E402

from dadi.errors import DadiError  # noqa: E402
from dadi.node.control import request  # noqa: E402
from dadi.node.mounting import default_name  # noqa: E402
from dadi.progress import human_bytes  # noqa: E402

DADI = str(REPO / ".venv" / "bin" / "dadi")
PREFETCH_DELAY = 5  # seconds: long enough that the first command's reads are all on demand
PREFETCH_WAIT = 30  # seconds `dadi stats --wait-prefetch` may wait; the image is a few MiB, over loopback
DAEMON_STOP_DEADLINE = 10.0
LOOP_RELEASE_WAIT = 10.0  # seconds the final check gives a busy loop device to be released
COMMAND = "cat /etc/motd; busybox | head -n 1"  # what runs in the lazily mounted image


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(*cmd: str, capture: bool = False) -> str:
    """Print and run `cmd`; its stdout when `capture`. A failure raises CalledProcessError."""
    print("$ " + shlex.join(cmd), flush=True)
    with subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE if capture else None) as process:
        try:
            out, _ = process.communicate()
        except BaseException as e:
            # Ctrl-C reached the command too: let it undo its own half-done work (a `dadi mount` detaches
            # its loop device) before the demo's cleanup runs, rather than killing it 0.25 s later.
            # A SIGTERM was the demo's alone: pass it on.
            if not isinstance(e, KeyboardInterrupt):
                process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, cmd, out)
    return out or ""


def timed(*cmd: str) -> float:
    """Seconds `run(*cmd)` took."""
    start = time.monotonic()
    run(*cmd)
    return time.monotonic() - start


# ---- what the demo leaves behind, found from the kernel's side -------------------------------------


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    inside, points = str(path) + "/", []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point == str(path) or point.startswith(inside):
                points.append(point)
    return sorted(points, key=len, reverse=True)  # a mount inside another has the longer path


def loop_devices_under(path: Path, view_names: set[str] = frozenset()) -> list[str]:
    """Loop devices whose backing file lies below `path`, or is one of these views' FUSE files.

    Once the daemon's FUSE mount is gone (lazily unmounted), a loop device still attached to a view's
    file names it by its path inside that mount only, "/VIEW-NAME".
    """
    result = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
                            capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        return []
    detached = {f"/{name}" for name in view_names}
    return [device["name"] for device in json.loads(result.stdout)["loopdevices"]
            if (back := (device.get("back-file") or "").removesuffix(" (deleted)")).startswith(str(path) + "/")
            or back in detached]


def quietly(*cmd: str, timeout: float = 60) -> None:
    """Run a cleanup command; its failure is seen afterwards in what is left, so it never raises here."""
    try:
        subprocess.run(cmd, capture_output=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        pass


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie no longer does: the daemon is not our child, init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def daemon_pids(root: Path) -> list[int]:
    """The pid of the dadi daemon serving `root`: from the daemon, else from /proc if it does not answer."""
    try:
        return [request(root, {"op": "ping"}, timeout=5)["pid"]]
    except DadiError:
        pass
    wanted = ["daemon", "--root", str(root)]
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if "dadi.cli" in argv and any(argv[i:i + 3] == wanted for i in range(len(argv))):
                pids.append(int(proc.name))
    return pids


def stop_daemon(root: Path, pid: int, *, verbose: bool) -> None:
    """SIGTERM (the daemon flushes its views and unmounts ROOT/fs), wait; SIGKILL past the deadline."""
    if verbose:
        print(f"$ kill -TERM {pid}", flush=True)
    start = time.monotonic()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    while alive(pid) and time.monotonic() - start < DAEMON_STOP_DEADLINE:
        time.sleep(0.05)  # the daemon is not our child: polling is the way to see it go
    if alive(pid):
        print(f"the daemon {pid} did not stop within {DAEMON_STOP_DEADLINE:.0f} s: SIGKILL", flush=True)
        os.kill(pid, signal.SIGKILL)
    elif verbose:
        print(f"daemon {pid} exited after {time.monotonic() - start:.2f} s", flush=True)
    if os.path.ismount(root / "fs"):  # a killed daemon leaves its FUSE mount behind
        if verbose:
            print(f"$ umount -l {root / 'fs'}", flush=True)
        subprocess.run(["umount", "-l", str(root / "fs")], capture_output=True)


def clean_up(work: Path, root: Path, view_names: set[str]) -> None:
    """Undo whatever a failed or interrupted demo left under `work`; quiet when there is nothing.

    `view_names` gains the daemon's views: the final check looks for their loop devices too.
    """
    try:
        listed = [view["name"] for view in request(root, {"op": "list"}, timeout=5)["views"]]
    except DadiError:  # no daemon (the usual case here), or one that does not answer
        listed = []
    view_names.update(listed)
    loops = loop_devices_under(work, view_names)  # before their files' FUSE mount goes away
    for name in listed:
        print(f"cleanup: dadi umount --force {name}", flush=True)
        quietly(DADI, "umount", "--force", "--root", str(root), name)
    for pid in daemon_pids(root):
        print(f"cleanup: stopping the dadi daemon {pid}", flush=True)
        stop_daemon(root, pid, verbose=False)
    for point in mounts_under(work):
        print(f"cleanup: umount -l {point}", flush=True)
        quietly("umount", "-l", point)
    for device in sorted(set(loops) | set(loop_devices_under(work, view_names))):
        if _loop_flag(device, "autoclear") is None:
            continue  # detached meanwhile
        if _loop_flag(device, "autoclear") == "1":
            continue  # detached already as far as losetup can: the kernel frees it with its last user
        print(f"cleanup: losetup -d {device}", flush=True)
        quietly("losetup", "-d", device)


def _loop_flag(device: str, flag: str) -> str | None:
    """/sys/block/loopN/loop/FLAG, or None once the device is detached."""
    try:
        return Path(f"/sys/block/{Path(device).name}/loop/{flag}").read_text().strip()
    except OSError:
        return None


def leftovers(work: Path, view_names: set[str], wait: float = LOOP_RELEASE_WAIT) -> list[str]:
    """What is still mounted under `work` or attached to a loop device. A loop device `losetup -d` could
    not detach at once (something still used it) is detached by the kernel when its last user lets go:
    give that a few seconds."""
    deadline = time.monotonic() + wait
    while loop_devices_under(work, view_names) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [f"mount {p}" for p in mounts_under(work)] + [
        f"loop device {d}" + (" (detached as soon as its last user lets go)" if _loop_flag(d, "autoclear") == "1" else "")
        for d in loop_devices_under(work, view_names)]


# ---- the demo ------------------------------------------------------------------------------------


def convert_and_export(layout: Path, tag: str, dest: str, work: Path) -> None:
    step("convert and push (user space: no root, no mount)")
    summary = json.loads(run(DADI, "convert", f"oci:{layout}:{tag}", dest, "--plain-http", "--json",
                             "--cache-dir", str(work / "cache"), capture=True))
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

    step("loop-mount the exported disk read-only and run the image's busybox")
    mnt = work / "export-mnt"
    mnt.mkdir()
    run("mount", "-t", "ext4", "-o", "loop,ro", str(disk), str(mnt))
    try:
        run(str(mnt / "bin" / "busybox"), "echo", "hello from an exported dadi image")
    finally:
        run("umount", str(mnt))
    disk.unlink()


def stats(mnt: Path, root: Path, *extra: str) -> dict:
    return json.loads(run(DADI, "stats", str(mnt), "--root", str(root), "--json", *extra, capture=True))


def show_local(s: dict) -> None:
    print(f"local: {human_bytes(s['bytes_local'])} of {human_bytes(s['bytes_total'])}, "
          f"{s['chunks_local']}/{s['chunks_total']} chunks; {s['layers_verified']}/{s['layers_total']} layers "
          f"verified; prefetch {s['prefetch_state']}; {s['reads']} reads, {s['read_errors']} errors, "
          f"{s['corrupt_chunks']} corrupt chunks")


def lazy_mount(dest: str, work: Path, root: Path, view_names: set[str]) -> None:
    mnt = work / "mnt"
    mnt.mkdir()
    view_names.add(default_name(dest, mnt))  # the name `dadi mount` gives it: cleanup looks for it
    step(f"mount it lazily from the registry (node daemon under {root}; prefetch after {PREFETCH_DELAY:.0f} s)")
    mount_seconds = timed(DADI, "mount", dest, str(mnt), "--root", str(root), "--plain-http",
                          "--prefetch-delay", f"{PREFETCH_DELAY:g}")
    print(f"mounted in {mount_seconds:.2f} s (starting the daemon, manifest and chunk tables only)")
    mounted_at = time.monotonic() - mount_seconds

    step("run a command in it: every block it reads is fetched on demand")
    command_seconds = timed("chroot", str(mnt), "/bin/sh", "-c", COMMAND)
    print(f"first command ran in {command_seconds:.2f} s")

    step("what came over the network on demand")
    s = stats(mnt, root)
    print(f"on demand: {human_bytes(s['bytes_on_demand'])} of {human_bytes(s['bytes_total'])} "
          f"({100 * s['bytes_on_demand'] / s['bytes_total']:.1f} %): "
          f"{human_bytes(s['bytes_on_demand'] - s['bytes_read_ahead'])} for reads (ext4's mount, the command), "
          f"{human_bytes(s['bytes_read_ahead'])} read ahead of them; prefetched {human_bytes(s['bytes_prefetched'])}")
    print(f"time: mount {mount_seconds:.2f} s + first command {command_seconds:.2f} s "
          f"= {mount_seconds + command_seconds:.2f} s to a running command")
    show_local(s)
    if s["prefetch_state"] != "waiting":
        print(f"note: prefetch was already {s['prefetch_state']}: some bytes may not have come on demand")

    step("finish the background prefetch: the view no longer needs the registry")
    s = stats(mnt, root, "--wait-prefetch", f"{PREFETCH_WAIT:g}")
    print(f"prefetch {s['prefetch_state']} {time.monotonic() - mounted_at:.1f} s after the mount: "
          f"prefetched {human_bytes(s['bytes_prefetched'])}, on demand {human_bytes(s['bytes_on_demand'])}")
    show_local(s)
    if s["prefetch_state"] != "done" or s["chunks_local"] != s["chunks_total"] \
            or s["layers_verified"] != s["layers_total"] or s["read_errors"] or s["corrupt_chunks"]:
        raise SystemExit(f"prefetch did not finish cleanly within {PREFETCH_WAIT:.0f} s")
    run(DADI, "ls", "--root", str(root))

    step("unmount")
    run(DADI, "umount", str(mnt), "--root", str(root))


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks, as Ctrl-C does


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root: umoci, loop devices and FUSE mounts", file=sys.stderr)
        return 1
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    work = Path(tempfile.mkdtemp(prefix="dadi-demo-"))
    root = work / "node"  # the daemon's root: never /var/lib/dadi
    view_names: set[str] = set()
    checked = False  # whether the last step has reported what is left
    try:
        step("build a real OCI image (busybox-static, several layers)")
        layout, tag = build_busybox_image(work / "src")
        print(f"built oci:{layout}:{tag}")

        step("start docker-registry on loopback")
        with RegistryServer(work / "registry") as registry:
            print(f"docker-registry (pid {registry.pid}) listening on {registry.host}")
            dest = f"docker://{registry.host}/demo/busybox:dadi"
            try:
                convert_and_export(layout, tag, dest, work)
                lazy_mount(dest, work, root, view_names)
                step("stop the node daemon")
                for pid in daemon_pids(root):
                    stop_daemon(root, pid, verbose=True)
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
                clean_up(work, root, view_names)
            step("stop the registry")
            registry_pid = registry.pid
            print(f"$ kill -TERM {registry_pid}", flush=True)
            registry.stop()
        step("nothing left behind")
        left = leftovers(work, view_names) + [f"dadi daemon {pid}" for pid in daemon_pids(root)] \
            + ([f"docker-registry {registry_pid}"] if alive(registry_pid) else [])
        print("left behind:\n  " + "\n  ".join(left) if left else
              f"no mount and no loop device under {work}; daemon and registry gone")
        checked = True
        step("done")
        return 1 if left else 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        clean_up(work, root, view_names)
        if not checked and (left := leftovers(work, view_names)):
            print("left behind:\n  " + "\n  ".join(left), file=sys.stderr)
        if mounts_under(work):  # never delete through a mount point
            print(f"left {work} in place: something is still mounted under it", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # main() has cleaned up already
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except subprocess.CalledProcessError as e:  # the command has said why
        how = f"was killed by {signal.Signals(-e.returncode).name}" if e.returncode < 0 else f"exited with {e.returncode}"
        print(f"\nmake demo failed: {shlex.join(e.cmd)} {how}", file=sys.stderr)
        sys.exit(1)
