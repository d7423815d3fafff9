"""The dadi command line: convert, export and inspect images; mount, run and watch them on nodes."""
# ruff: noqa: E402 - the imports follow gc.disable() on purpose (see there)

from __future__ import annotations

import gc

# No garbage collection while the command line's modules load: they make many objects and all of them
# live on, so every collection then is wasted work: `dadi mount --help` took 61-63 ms of CPU with them and
# 54-57 ms without (perf stat; 8 mounts at once share the node's cores with their containers). Back on at
# the end of this module.
gc.disable()

import json
import sys
from pathlib import Path

import click

from dadi import __version__
from dadi.errors import DadiError


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        from dadi.units import parse_size

        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


class RateType(click.ParamType):
    name = "rate"

    def convert(self, value, param, ctx):
        from dadi.units import parse_rate

        try:
            return parse_rate(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


RATE = RateType()


def _registry_options(plain_http: bool, authfile: str | None, platform: str = "linux/amd64"):
    from dadi.image.transports import RegistryOptions

    return RegistryOptions(plain_http=plain_http, authfile=authfile, platform=platform)


def _plain_http_option(f):
    return click.option("--plain-http", is_flag=True, help="Talk plain HTTP to docker:// registries.")(f)


def _authfile_option(f):
    return click.option(
        "--authfile",
        type=click.Path(dir_okay=False),
        help="Registry credentials (docker config.json format); default ~/.docker/config.json.",
    )(f)


def _run(fn):
    """Bad input is a clear one-line error and exit status 1, never a traceback."""
    try:
        return fn()
    except DadiError as exc:
        click.echo(f"dadi: error: {exc}", err=True)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dadi")
def main() -> None:
    """dadi: lazy-loading container images, DADI style.

    Images keep their layers, but each layer is the changed blocks of one virtual ext4 disk, cut into
    lz4 chunks that nodes fetch on demand. Build machines convert OCI images with `dadi convert`.
    """


@main.command("convert")
@click.argument("src")
@click.argument("dest")
@_plain_http_option
@_authfile_option
@click.option("--platform", default="linux/amd64", show_default=True, help="Platform to pick from an index.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Converted-layer cache [~/.cache/dadi/convert].")
@click.option("--chunk-size", type=SIZE, default=None, help="Uncompressed bytes per chunk [format default].")
@click.option("--disk-size", type=SIZE, default="64GiB", show_default=True, help="Virtual disk size.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def convert_cmd(src, dest, plain_http, authfile, platform, cache_dir, chunk_size, disk_size, as_json, quiet):
    """Convert the OCI image SRC into a dadi image at DEST.

    \b
    SRC:  oci:DIR[:TAG]  docker-archive:FILE  docker://HOST/REPO:TAG (or @sha256:...)
    DEST: oci:DIR:TAG    docker://HOST/REPO:TAG

    Layers are applied in user space (no root, no mounts). The same input always gives the same
    digests; layer chains converted before are reused from the cache and blobs the target has are
    not uploaded again. The manifest is written only once every blob is in place.
    """

    def work():
        from dadi.convert.cache import ConvertCache, default_cache_dir
        from dadi.convert.pipeline import ConvertOptions, convert_image
        from dadi.format.blob import DEFAULT_CHUNK_SIZE
        from dadi.image.transports import open_source, open_target, parse_image_ref
        from dadi.progress import Progress, human_bytes

        reg = _registry_options(plain_http, authfile, platform)
        options = ConvertOptions(
            chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
            disk_size=disk_size,
            cache_dir=Path(cache_dir) if cache_dir else None,
        )
        cache = ConvertCache(options.cache_dir or default_cache_dir())
        source = open_source(parse_image_ref(src), reg)
        target = open_target(parse_image_ref(dest), reg)
        progress = Progress(quiet=quiet)
        try:
            report = convert_image(source, target, options, cache, progress)
        finally:
            source.close()
        summary = report.to_json()
        if as_json:
            click.echo(json.dumps(summary, indent=2))
        elif not quiet:
            click.echo(
                f"converted {len(report.layers)} layers ({summary['layers_reused']} reused) in "
                f"{summary['seconds']:.1f} s: {human_bytes(summary['source_bytes'])} -> "
                f"{human_bytes(summary['dadi_bytes'])}; manifest {report.manifest_digest}",
                err=True,
            )

    _run(work)


@main.command("export")
@click.argument("image")
@click.argument("file", type=click.Path(dir_okay=False))
@_plain_http_option
@_authfile_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def export_cmd(image, file, plain_http, authfile, as_json, quiet):
    """Flatten the dadi image IMAGE into FILE, a sparse raw ext4 disk (e2fsck it, loop-mount it)."""

    def work():
        from dadi.export import export_image
        from dadi.image.transports import open_source, parse_image_ref
        from dadi.progress import Progress

        source = open_source(parse_image_ref(image), _registry_options(plain_http, authfile))
        try:
            result = export_image(source, Path(file), Progress(quiet=quiet))
        finally:
            source.close()
        if as_json:
            click.echo(json.dumps(result, indent=2))

    _run(work)


@main.command("inspect")
@click.argument("image")
@_plain_http_option
@_authfile_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect_cmd(image, plain_http, authfile, as_json):
    """Show IMAGE's layers, sizes, chunks, compression ratio and annotations."""

    def work():
        from dadi.image.transports import open_source, parse_image_ref
        from dadi.inspect_image import format_inspection, inspect_image

        source = open_source(parse_image_ref(image), _registry_options(plain_http, authfile))
        try:
            info = inspect_image(source)
        finally:
            source.close()
        click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info))

    _run(work)


def _root_option(f):
    return click.option(
        "--root", type=click.Path(file_okay=False), envvar="DADI_ROOT", default="/var/lib/dadi",
        show_default=True, help="The node daemon's root directory (env DADI_ROOT).",
    )(f)


def _daemon_setting_options(f):
    f = click.option("--cache-quota", type=SIZE, default=None,
                     help="Evict cached blobs no view uses, least recently used first, above this size.")(f)
    f = click.option("--prefetch-bandwidth", type=RATE, default=None, metavar="RATE",
                     help="Cap background prefetch at RATE (e.g. 100MiB/s); reads are never capped.")(f)
    return f


@main.command("daemon")
@_root_option
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="Settings file (TOML) [default: ROOT/daemon.toml when it exists].")
@_daemon_setting_options
@click.option("--prefetch-delay", type=float, default=None, metavar="SECONDS",
              help="Seconds after a mount before background prefetch starts [2].")
@click.option("--metrics", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics.")
@click.option("--p2p-listen", default=None, metavar="HOST:PORT",
              help="Serve the verified chunks this node holds to peers here, and announce them to supernodes.")
@click.option("-v", "--verbose", is_flag=True, help="Log every view and prefetch event.")
def daemon_cmd(root, config_file, cache_quota, prefetch_bandwidth, prefetch_delay, metrics, p2p_listen, verbose):
    """Run the node daemon in the foreground (`dadi mount` starts one in the background when needed).

    It serves the FUSE file system of views under ROOT/fs, the chunk cache under ROOT/cache and a
    control socket ROOT/control.sock. SIGTERM or SIGINT flush every view and stop it. Settings come
    from the config file, then from these options (docs/ARCHITECTURE.md lists them).
    """
    import logging

    from dadi.node.config import CONFIG_NAME, load_config
    from dadi.node.daemon import Daemon

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def work():
        path = Path(config_file) if config_file else Path(root) / CONFIG_NAME
        config = load_config(path, required=bool(config_file)).with_overrides(
            cache_quota=cache_quota, prefetch_bandwidth=prefetch_bandwidth, prefetch_delay=prefetch_delay,
            metrics=metrics, p2p_listen=p2p_listen)
        Daemon(Path(root), config).run()

    _run(work)


@main.command("mount")
@click.argument("image")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", help="View name: a --rw view's writes are kept under this name across mounts.")
@click.option("--rw", is_flag=True, help="Mount read-write over a private writable layer.")
@_root_option
@_plain_http_option
@_authfile_option
@click.option("--no-prefetch", is_flag=True, help="Fetch only what reads need; no background download.")
@click.option("--io-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a read may wait for the network before it fails with EIO.")
@click.option("--prefetch-delay", type=float, default=None, metavar="SECONDS",
              help="Seconds before background prefetch starts [daemon's setting, 2].")
@click.option("--record-trace", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Record the chunks this view reads in its first seconds to FILE (see `dadi trace`).")
@click.option("--trace-seconds", type=float, default=None, metavar="SECONDS",
              help="How long --record-trace records [daemon's setting, 30].")
@click.option("--supernode", "supernodes", multiple=True, metavar="URL",
              help="Fetch through this supernode before the registry (repeatable: pieces are spread over them).")
@click.option("--p2p-listen", default=None, metavar="HOST:PORT",
              help="The daemon serves the verified chunks it holds to peers here and announces them to the "
                   "supernodes, which redirect other nodes to it for hot pieces.")
@click.option("--read-ahead", type=SIZE, default="512KiB", show_default=True,
              help="The loop device's read-ahead: how much ext4 reads at once from a file read in order.")
@_daemon_setting_options
@click.option("--json", "as_json", is_flag=True, help="Print where the view went as JSON.")
def mount_cmd(image, directory, name, rw, root, plain_http, authfile, no_prefetch, io_timeout, prefetch_delay,
              record_trace, trace_seconds, supernodes, p2p_listen, read_ahead, cache_quota, prefetch_bandwidth,
              as_json):
    """Mount dadi IMAGE (docker://... or oci:DIR:TAG) lazily at DIRECTORY.

    Only the manifest and the layers' tables are fetched now; data is read on demand, then the rest
    in the background (the image's trace first, when one was pushed), so that the view soon needs no
    network at all. --cache-quota and --prefetch-bandwidth change the running daemon's settings.
    """
    from dadi.node.mounting import mount

    def work():
        settings = {k: v for k, v in (("cache_quota", cache_quota), ("prefetch_bandwidth", prefetch_bandwidth))
                    if v is not None}
        info = mount(Path(root), image, Path(directory), name=name, rw=rw, plain_http=plain_http,
                     authfile=authfile, prefetch=not no_prefetch, io_timeout=io_timeout,
                     prefetch_delay=prefetch_delay, record_trace=Path(record_trace).resolve() if record_trace else None,
                     trace_seconds=trace_seconds, settings=settings, read_ahead=read_ahead,
                     supernodes=list(supernodes), p2p_listen=p2p_listen)
        click.echo(json.dumps(info) if as_json else f"mounted {image} at {info['mountpoint']} ({info['loop']})")

    _run(work)


@main.command("umount")
@click.argument("directory", type=click.Path())
@click.option("--force", is_flag=True, help="Detach lazily even if the mount is busy.")
@_root_option
def umount_cmd(directory, force, root):
    """Unmount the view at DIRECTORY, detach its loop device and flush its writable layer."""
    from dadi.node.mounting import umount

    _run(lambda: umount(Path(root), Path(directory), force=force))


@main.command("ls")
@_root_option
@click.option("--json", "as_json", is_flag=True)
def ls_cmd(root, as_json):
    """List the views of the daemon under ROOT."""
    from dadi.node.control import request

    def work():
        views = request(Path(root), {"op": "list"})["views"]
        if as_json:
            click.echo(json.dumps(views, indent=2))
        for view in [] if as_json else views:
            click.echo(f"{view['name']}\t{view['image']}\t{'rw' if view['rw'] else 'ro'}\t"
                       f"{view.get('mountpoint') or '-'}\tprefetch {view['prefetch_state']}")

    _run(work)


@main.command("stats")
@click.argument("directory", type=click.Path())
@_root_option
@click.option("--json", "as_json", is_flag=True)
@click.option("--wait-prefetch", type=float, default=None, metavar="SECONDS",
              help="First wait (up to SECONDS) until background prefetch is done.")
def stats_cmd(directory, root, as_json, wait_prefetch):
    """What the view at DIRECTORY (or named DIRECTORY) read, from where, and how much is local."""
    from dadi.node.control import request
    from dadi.node.mounting import find_view
    from dadi.progress import human_bytes

    def work():
        name = find_view(Path(root), Path(directory))["name"]
        if wait_prefetch is not None:
            stats = request(Path(root), {"op": "wait_prefetch", "name": name, "timeout": wait_prefetch})
        else:
            stats = request(Path(root), {"op": "stats", "name": name})
        stats.pop("ok", None)
        if as_json:
            click.echo(json.dumps(stats, indent=2))
            return
        click.echo(f"view {stats['name']} of {stats['image']}")
        click.echo(f"  local: {human_bytes(stats['bytes_local'])} of {human_bytes(stats['bytes_total'])}, "
                   f"{stats['chunks_local']}/{stats['chunks_total']} chunks; prefetch {stats['prefetch_state']}")
        click.echo(f"  fetched on demand {human_bytes(stats['bytes_on_demand'])}, "
                   f"prefetched {human_bytes(stats['bytes_prefetched'])}")
        click.echo(f"  {stats['layers_verified']}/{stats['layers_total']} layers complete and verified"
                   + (f"; trace: {stats['trace_chunks']} chunks" if stats["trace_chunks"] is not None else ""))
        click.echo(f"  reads {stats['reads']}, errors {stats['read_errors']}, io timeouts {stats['io_timeouts']}, "
                   f"corrupt chunks {stats['corrupt_chunks']}")
        native = stats.get("native")
        click.echo(f"  native read path: {native['reads_local']} reads from the local cache, {native['fallbacks']} "
                   "passed to the Python path" if native else "  served by the Python read path")
        if stats.get("page_cache"):
            click.echo("  every chunk local: the loop device reads the view through the page cache")

    _run(work)


@main.command("gc")
@_root_option
@click.option("--quota", type=SIZE, default=None,
              help="Keep the cache within this size, evicting least recently used blobs first; "
                   "without it, remove every blob no view uses.")
@click.option("--json", "as_json", is_flag=True)
def gc_cmd(root, quota, as_json):
    """Free chunk-cache space: remove cached blobs that no mounted view uses.

    Goes through the daemon when one runs under ROOT (it knows which blobs are in use), else works on
    ROOT/cache directly.
    """
    from dadi.node.control import DaemonNotRunning, request
    from dadi.progress import human_bytes

    def work():
        try:
            result = request(Path(root), {"op": "gc", "quota": quota})
            result.pop("ok", None)
        except DaemonNotRunning:
            from dadi.node.chunkcache import ChunkCache

            with ChunkCache(Path(root) / "cache") as cache:
                before = cache.usage()
                removed = cache.gc() if quota is None else cache.evict(quota)
                result = {"removed": removed, "freed": before - cache.usage(), "usage": cache.usage()}
        if as_json:
            click.echo(json.dumps(result, indent=2))
        else:
            click.echo(f"removed {len(result['removed'])} blobs, freed {human_bytes(result['freed'])}; "
                       f"the cache now holds {human_bytes(result['usage'])}")

    _run(work)


@main.group("trace")
def trace_group():
    """Access traces: what a container reads first, so that later mounts prefetch it first.

    Record one with `dadi mount --record-trace FILE`, store it beside the image with `dadi trace
    push`; every mount of that image then finds it (docs/FORMAT.md, "Traces").
    """


@trace_group.command("push")
@click.argument("image")
@click.argument("trace_file", type=click.Path(exists=True, dir_okay=False))
@_plain_http_option
@_authfile_option
@click.option("--json", "as_json", is_flag=True)
def trace_push_cmd(image, trace_file, plain_http, authfile, as_json):
    """Store TRACE_FILE beside IMAGE (docker://... or oci:DIR:TAG) for its later mounts."""
    from dadi.image.transports import parse_image_ref
    from dadi.node.trace import push_trace

    def work():
        result = push_trace(parse_image_ref(image), Path(trace_file), _registry_options(plain_http, authfile))
        click.echo(json.dumps(result, indent=2) if as_json else
                   f"trace of {result['chunks']} chunks stored at {result['trace']}")

    _run(work)


@main.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("image")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_root_option
@_plain_http_option
@_authfile_option
@click.option("--rw", is_flag=True, help="Give the command a writable view (its writes are discarded).")
@click.option("--no-prefetch", is_flag=True, help="Fetch only what the command reads.")
@click.option("--io-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a read may wait for the network before it fails with EIO.")
def run_cmd(image, command, root, plain_http, authfile, rw, no_prefetch, io_timeout):
    """Mount IMAGE, run COMMAND chrooted into it (with /proc, /sys, /dev), unmount; exit with its code.

    Example: dadi run oci:./img:dadi -- /bin/sh -c 'cat /etc/os-release'
    """
    from dadi.node.mounting import run_in_image

    code = _run(lambda: run_in_image(Path(root), image, list(command), rw=rw, plain_http=plain_http,
                                     authfile=authfile, prefetch=not no_prefetch, io_timeout=io_timeout))
    sys.exit(code)


def convert_main() -> None:
    """The `dadi-convert` console script: `dadi convert` for CI builders."""
    main(["convert", *sys.argv[1:]], prog_name="dadi-convert")


def mount_main() -> None:
    """The `dadi-mount` console script: `dadi mount` for nodes."""
    main(["mount", *sys.argv[1:]], prog_name="dadi-mount")


import dadi.cli_p2p  # noqa: F401 - registers `dadi supernode` and `dadi prewarm` on main
import dadi.cli_snapshotter  # noqa: F401 - registers `dadi snapshotter` and `dadi pull` on main

gc.freeze()  # what the imports made stays: later collections (the daemons run for months) skip it
gc.enable()

if __name__ == "__main__":
    # python -m dadi.cli: the commands register on the module dadi.cli, which this run (__main__) is not.
    from dadi.cli import main as registered_main

    registered_main()
