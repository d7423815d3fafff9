"""The containerd commands, `dadi snapshotter` and `dadi pull`, registered onto dadi.cli's group (the import
at the end of dadi/cli.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dadi.cli import _authfile_option, _run, main

DEFAULT_SNAPSHOTTER_ROOT = "/var/lib/dadi-snapshotter"
DEFAULT_SNAPSHOTTER_SOCKET = "/run/dadi/snapshotter.sock"


@main.command("snapshotter")
@click.option("--root", type=click.Path(file_okay=False), default=DEFAULT_SNAPSHOTTER_ROOT, show_default=True,
              help="Where snapshots and their metadata (metadata.db) live.")
@click.option("--address", type=click.Path(dir_okay=False), default=DEFAULT_SNAPSHOTTER_SOCKET,
              show_default=True, help="Unix socket to serve containerd's snapshots API on.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML settings (see below); options given here override it.")
@click.option("--plain-http", is_flag=True, default=None, help="Talk plain HTTP to the images' registries.")
@click.option("--rw-mode", type=click.Choice(["dev", "overlayfs"]), default=None,
              help="How containers over dadi images write [dev].")
@click.option("--daemon-root", type=click.Path(file_okay=False), default=None,
              help="The node daemon's root [$DADI_ROOT or /var/lib/dadi].")
@click.option("-v", "--verbose", is_flag=True, help="Log every call.")
def snapshotter_cmd(root, address, config_file, plain_http, rw_mode, daemon_root, verbose):
    """Serve containerd's snapshots API: a proxy snapshotter that runs dadi images lazily.

    \b
    containerd's config.toml (version 2):
        [proxy_plugins.dadi]
          type = "snapshot"
          address = "/run/dadi/snapshotter.sock"
    then `dadi pull --containerd /run/containerd/containerd.sock IMAGE` and
    `ctr run --snapshotter dadi IMAGE ID CMD` (or CRI with snapshotter = "dadi" and
    disable_snapshot_annotations = false).

    Layers of dadi images are not downloaded: each container gets a view of the image in the node
    daemon (started under the daemon root when none runs), read chunk by chunk on demand. Ordinary
    images work as with containerd's overlayfs snapshotter.

    \b
    Settings file (TOML, every key optional):
        rw_mode = "dev"          # "dev": writable dadi view on a loop device, mounted ext4;
                                 # "overlayfs": read-only view + overlayfs upper dir under --root
        daemon_root = "/var/lib/dadi"
        plain_http = false
        authfile = "/root/.docker/config.json"
        prefetch = true          # fetch the rest of the image in the background
        io_timeout = 30.0        # seconds before an unservable read fails with EIO

    Stopping or restarting it does not disturb running containers (their views and loop devices
    belong to the node daemon and the kernel).
    """
    import logging

    from dadi.snapshotter.config import load_config
    from dadi.snapshotter.server import serve

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def go():
        config = load_config(Path(config_file) if config_file else None).with_overrides(
            plain_http=plain_http, rw_mode=rw_mode, daemon_root=Path(daemon_root) if daemon_root else None)
        serve(Path(root), Path(address), config)

    _run(go)


@main.command("pull")
@click.argument("image")
@click.option("--containerd", "address", type=click.Path(dir_okay=False),
              default="/run/containerd/containerd.sock", show_default=True, help="containerd's gRPC socket.")
@click.option("--namespace", "-n", default="default", show_default=True, help="containerd namespace.")
@click.option("--snapshotter", default="dadi", show_default=True,
              help="Name of the dadi snapshotter in containerd's proxy_plugins.")
@click.option("--plain-http", is_flag=True, help="Talk plain HTTP to the registry.")
@_authfile_option
@click.option("--platform", default="linux/amd64", show_default=True, help="Platform to pick from an index.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def pull_cmd(image, address, namespace, snapshotter, plain_http, authfile, platform, as_json, quiet):
    """Pull dadi image IMAGE (docker://HOST/REPO:TAG or HOST/REPO:TAG) into containerd, layers not downloaded.

    Only the manifest and config are fetched; the layers become remote snapshots of the dadi
    snapshotter. Then `ctr run --snapshotter dadi HOST/REPO:TAG ID CMD` starts a container at once.
    """
    from dadi.snapshotter.pull import pull

    def progress(line: str) -> None:
        if not quiet:
            click.echo(line, err=True)

    def go():
        summary = pull(Path(address), image, namespace=namespace, snapshotter=snapshotter,
                       plain_http=plain_http, authfile=authfile, platform=platform, progress=progress)
        if as_json:
            json.dump(summary, sys.stdout, indent=2)
            sys.stdout.write("\n")
        elif quiet:
            pass
        else:
            click.echo(f"{summary['image']}: ready for `ctr run --snapshotter {snapshotter}` "
                       f"({len(summary['layers'])} layers, {summary['bytes_fetched']} bytes fetched, "
                       f"{summary['seconds']:.2f} s)")

    _run(go)
