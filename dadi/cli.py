"""The dadi command line: `dadi convert`, `dadi export`, `dadi inspect` (node commands come with the daemon)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from dadi import __version__
from dadi.errors import DadiError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64G', '64GiB', '65536', '64k' -> bytes (binary units)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 64KiB, 64G)")
    number, unit = int(match.group(1)), match.group(2).lower()
    return number << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[unit]


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        return value if isinstance(value, int) else parse_size(value)


SIZE = SizeType()


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


@main.command("mount", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def mount_cmd():
    """Mount a dadi image lazily (not built yet: the node daemon is the next milestone)."""
    click.echo("dadi: error: `dadi mount` is not implemented yet; use `dadi export` and a loop mount", err=True)
    sys.exit(2)


def convert_main() -> None:
    """The `dadi-convert` console script: `dadi convert` for CI builders."""
    main(["convert", *sys.argv[1:]], prog_name="dadi-convert")


def mount_main() -> None:
    """The `dadi-mount` console script: `dadi mount` for nodes."""
    main(["mount", *sys.argv[1:]], prog_name="dadi-mount")


if __name__ == "__main__":
    main()
