"""The P2P commands, `dadi supernode` and `dadi prewarm`, registered onto dadi.cli's group (the import
at the end of dadi/cli.py), so that they grow without touching the node's commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dadi.cli import SIZE, _authfile_option, _plain_http_option, _run, main


@main.command("supernode")
@click.option("--listen", required=True, metavar="HOST:PORT",
              help="Address to serve on, e.g. 0.0.0.0:5080 (port 0: a free port; the log says which).")
@click.option("--registry", required=True, metavar="HOST[:PORT]", help="The registry whose blobs it serves.")
@click.option("--cache-dir", required=True, type=click.Path(file_okay=False), help="Piece cache directory.")
@click.option("--cache-quota", type=SIZE, default=None,
              help="Disk the cache may take (e.g. 200GiB); least recently used blobs go first [no limit].")
@_plain_http_option
@click.option("--authfile", type=click.Path(exists=True, dir_okay=False),
              help="The supernode's own registry credentials (docker config.json format), used to fetch "
                   "blobs; nodes are still checked with theirs [default: ~/.docker/config.json].")
@click.option("--upstream-proxy", metavar="URL",
              help="Reach the registry through this HTTP proxy (a Dragonfly dfdaemon, say).")
@click.option("--access-ttl", type=float, default=60.0, show_default=True, metavar="SECONDS",
              help="How long a node's access to a blob, once the registry allowed it, is taken as granted.")
@click.option("--p2p-hot-requests", type=click.IntRange(min=1), default=None, metavar="N",
              help="Requests for a piece within 10 s that make it hot: from then on nodes are redirected to "
                   "peers that hold it [2].")
@click.option("--p2p-fanout", type=click.IntRange(min=1), default=None, metavar="N",
              help="Redirects one peer may be serving at once [4].")
@click.option("-v", "--verbose", is_flag=True, help="Log every piece fetched and every request refused.")
def supernode_cmd(listen, registry, cache_dir, cache_quota, plain_http, authfile, upstream_proxy, access_ttl,
                  p2p_hot_requests, p2p_fanout, verbose):
    """Serve blobs of REGISTRY to nodes, caching them in pieces: each piece leaves the registry once.

    Nodes ask GET /v2/REPO/blobs/sha256:HEX with a Range header, as they would ask the registry, and
    forward their registry credentials (Authorization: Basic); a node the registry refuses is refused
    here too. Nodes that serve peers (`dadi mount --p2p-listen`) announce their pieces to POST
    /p2p/announce; a request for a hot piece a peer holds is answered with a 307 to that peer
    (docs/P2P.md). POST /prewarm fills the cache with an image (see `dadi prewarm`); /healthz and /metrics
    are for operators. SIGTERM or SIGINT stop it; the cache is kept for the next start.
    """
    import logging

    import trio

    from dadi.p2p.supernode import SupernodeSettings, serve

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        # urllib3 logs every retried connection at WARNING; the supernode says what failed itself.
        logging.getLogger("urllib3").setLevel(logging.ERROR)
    if ":" not in listen:
        raise click.BadParameter("HOST:PORT, e.g. 0.0.0.0:5080", param_hint="--listen")
    if access_ttl < 0:
        raise click.BadParameter("must be >= 0", param_hint="--access-ttl")
    settings = SupernodeSettings(
        listen=listen, registry=registry, cache_dir=Path(cache_dir), cache_quota=cache_quota,
        plain_http=plain_http, authfile=authfile, upstream_proxy=upstream_proxy, allow_ttl=access_ttl,
        hot_requests=p2p_hot_requests, peer_fanout=p2p_fanout,
    )  # fmt: skip
    _run(lambda: trio.run(serve, settings))


@main.command("prewarm")
@click.argument("image")
@click.option("--supernode", required=True, metavar="URL", help="The supernode, e.g. http://sn1:5080.")
@click.option("--trace-only", is_flag=True,
              help="Only the chunks of the image's trace (and its tables), not every blob.")
@_authfile_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def prewarm_cmd(image, supernode, trace_only, authfile, as_json, quiet):
    """Fill a supernode's cache with IMAGE ([HOST/]REPO:TAG in the supernode's registry) before a rollout.

    Your registry credentials for the image (from --authfile) go to the supernode, which checks them
    with the registry: you can prewarm what you can pull.
    """
    from dadi.p2p.client import authorization_for, prewarm, registry_of
    from dadi.p2p.prewarm import resolve_image
    from dadi.progress import Progress, human_bytes

    progress = Progress(quiet=quiet)

    def on_event(event):
        if event["event"] == "error":
            progress.done("failed")
        elif event["event"] == "start":
            for warning in event.get("warnings", []):
                progress.note(f"warning: {warning}")
            what = f"{event['trace_chunks']} trace chunks of " if "trace_chunks" in event else ""
            progress.start(f"prewarm {what}{event['image']} ({human_bytes(event['bytes_total'])})")
        else:
            progress.advance_to(event["bytes_done"])

    def work():
        registry = registry_of(supernode)
        ref = resolve_image(image, registry)
        summary = prewarm(supernode, image, trace_only=trace_only, on_event=on_event,
                          authorization=authorization_for(registry, ref.repository, authfile))
        fetched = human_bytes(summary["bytes_fetched"])
        progress.done(f"{human_bytes(summary['bytes_done'])} cached ({fetched} fetched from the registry, "
                      f"the rest was cached already) in {summary['seconds']:.1f}s")
        if as_json:
            click.echo(json.dumps(summary, indent=2, sort_keys=True))

    try:
        _run(work)
    except KeyboardInterrupt:
        sys.exit(130)
