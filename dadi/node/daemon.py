"""The node daemon: one per root directory. Owns the FUSE file system of views, the chunk cache, fetching
and prefetch, and answers `dadi mount/umount/ls/stats` on a unix control socket in the root.

Layout of the root (default /var/lib/dadi):
    control.sock         JSON-lines control socket (one request, one reply per connection)
    fs/                  the FUSE mount: one file per view, the view's disk
    native/              the native read path's FUSE mount: one file per read-only view, the same disk,
                         served from the chunk cache by C threads (dadi.node.nativeviews)
    native.sock          where the native read path asks the Python one for what is not local
    cache/               the chunk cache (dadi.node.chunkcache)
    views/NAME/view.json what the view is (image, options) and where it is attached (loop, mountpoint)
                         (add_view "layers": [digests] views only those bottom layers of the image)
    views/NAME/writable/ the view's private writable layer (with --rw), kept across umount/mount
    daemon.log           the daemon's log when `dadi mount` started it
    daemon.toml          optional settings (dadi.node.config)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pyfuse3
import trio

from dadi.errors import DadiError
from dadi.format.blob import FOOTER_SIZE, HEADER_SIZE
from dadi.node import loopdev, prefetch
from dadi.node.config import DaemonConfig
from dadi.node.fusefs import ViewsFS, view_inode
from dadi.node.nativeviews import NativeViews, load_native_server, serve_fallbacks
from dadi.node.view import ChunkLRU, LayerBlob, View

log = logging.getLogger(__name__)

TABLE_REQUESTS = 8  # a mount's requests for its layers' tables in flight at once
METADATA_TIMEOUT = 10.0  # seconds for each source to send a blob's header or footer
RESTORE_TIMEOUT = 15.0  # seconds to bring back one view of the previous run (manifest and tables)


@dataclass
class ViewState:
    view: View
    request: dict
    fetch_sources: list[str]
    image: object  # the ImageRef
    manifest: object  # the ImageManifest
    prefetch_state: str = "waiting"
    trace_chunks: int | None = None  # chunks of the image's trace the prefetch found (None: no trace)
    cancel: trio.CancelScope | None = None  # the prefetch's
    metadata_cancel: trio.CancelScope | None = None  # the metadata fetch's (dadi.node.view.View.fetch_metadata)
    metadata_state: str = "off"  # "fetching", then "done"; "off" without hints or with metadata_first off
    settled: trio.Event = field(default_factory=trio.Event)  # prefetch done or disabled
    path: Path | None = None  # the disk file the loop device attaches to (native or Python file system)
    loop: str | None = None  # the loop device `dadi mount` attached to `path` while this daemon ran
    page_cache: bool = False  # that loop device reads `path` through the page cache (see dadi.node.loopdev)


def _import_mount_path() -> None:
    """Import now what the first mount needs (the registry client, requests, the fetcher): the CLI keeps
    them lazy for short commands, but in the daemon their import from a cold page cache cost the first
    `dadi mount` ~60 ms of its ~0.3 s (measured with the node benchmark, 2026-11-24)."""
    import dadi.image.dadi_layers  # noqa: F401
    import dadi.image.transports  # noqa: F401
    import dadi.node.fetch  # noqa: F401
    import dadi.node.trace  # noqa: F401
    import dadi.registry.client  # noqa: F401


class Daemon:
    def __init__(self, root: Path, config: DaemonConfig | None = None):
        self.root = Path(root)
        self.config = config or DaemonConfig()
        self.fs_dir = self.root / "fs"
        self.native_dir = self.root / "native"
        self.native_socket = self.root / "native.sock"
        self.views_dir = self.root / "views"
        self.socket_path = self.root / "control.sock"
        # A daemon killed with SIGKILL leaves its FUSE mount behind, dead (ENOTCONN on any access).
        subprocess.run(["umount", "-l", str(self.fs_dir)], capture_output=True)
        for d in (self.root, self.fs_dir, self.views_dir):
            d.mkdir(parents=True, exist_ok=True)
        from dadi.node.chunkcache import ChunkCache

        self.cache = ChunkCache(self.root / "cache", quota=self.config.cache_quota)
        self.fs = ViewsFS()
        self.native = None  # dadi.node.nativeviews.NativeViews once run() mounted it
        self.limiter = trio.CapacityLimiter(8)
        self.memory = ChunkLRU()
        self.store_lock = threading.Lock()
        self.pacer = prefetch.Pacer(self.config.prefetch_bandwidth)
        self.gate = prefetch.OnDemandGate()
        self.metrics = None
        from dadi.p2p.peernode import PeerNode

        self.peers = PeerNode(self)  # serves peers once an address is known (config or dadi mount --p2p-listen)
        self.views: dict[str, ViewState] = {}
        self._fetchers: dict[str, object] = {}
        self._nursery: trio.Nursery | None = None
        self._restored = trio.Event()
        self._adding: set[str] = set()  # names of views being made (their images are loading)

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self) -> None:
        options = set(pyfuse3.default_options)
        options |= {"fsname=dadi", "allow_other"}
        if self.config.metrics:
            from dadi.node.metrics import start_metrics

            self.metrics = start_metrics(self, self.config.metrics)
            log.info("metrics at http://%s/metrics", self.config.metrics)
        _import_mount_path()
        pyfuse3.init(self.fs, str(self.fs_dir), options)
        try:
            self.native = self._start_native()
            trio.run(self._main)
        finally:
            if self.native is not None:  # (already closed after a signal; a no-op then)
                self.native.close()
            pyfuse3.close(unmount=True)

    def _start_native(self):
        """The native read path's file system, or None (disabled in the config, or not built)."""
        if not self.config.native_reads:
            return None
        server = load_native_server()
        if server is None:
            return None
        try:
            return NativeViews(self.native_dir, server)
        except OSError as e:
            log.warning("native read path unavailable, every view is served from Python: %s", e)
            return None

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(pyfuse3.main)
            nursery.start_soon(self._serve_control)
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            if self.native is not None:
                await nursery.start(serve_fallbacks, self.native_socket, self._view_or_none)
            if self.config.p2p_listen:
                await self.peers.ensure_serving(nursery, self.config.p2p_listen)
            for path in sorted(self.views_dir.glob("*/view.json")):  # views of a previous run
                try:
                    with trio.fail_after(RESTORE_TIMEOUT):
                        await self.add_view(json.loads(path.read_text()))
                except (Exception, trio.TooSlowError) as e:
                    log.warning("could not restore view %s: %s", path.parent.name, e)
            self._restored.set()
            log.info("dadi daemon ready under %s", self.root)

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: flushing views and stopping", signum)
                for state in self.views.values():
                    await state.view.flush()
                if self.native is not None:  # while this loop still answers its fallback reads
                    await trio.to_thread.run_sync(self.native.close)
                scope.cancel()
                return

    # -- control socket --------------------------------------------------------------------------

    async def _serve_control(self) -> None:
        if self.socket_path.exists():
            self.socket_path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        sock.listen(16)
        await trio.serve_listeners(self._handle, [trio.SocketListener(sock)])

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            buffer = b""
            while b"\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            try:
                request = json.loads(buffer.split(b"\n", 1)[0])
                reply = {"ok": True, **(await self._dispatch(request))}
            except DadiError as e:
                reply = {"ok": False, "error": str(e)}
            except Exception as e:  # the daemon must keep serving whatever one request did
                log.exception("control request failed")
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            await stream.send_all(json.dumps(reply).encode() + b"\n")

    async def _dispatch(self, request: dict) -> dict:
        op = request.get("op")
        if op == "ping":
            return {"pid": os.getpid()}
        # Everything else waits until the views of the previous run are back: a `dadi mount` of one of
        # them must find it, not make it a second time.
        await self._restored.wait()
        if op == "add_view":
            return await self.add_view(request)
        if op == "attach":
            return self.attach(request["name"], request.get("loop"), request.get("mountpoint"))
        if op == "remove_view":
            return await self.remove_view(request["name"], discard=bool(request.get("discard")))
        if op == "list":
            return {"views": [self._describe(name) for name in sorted(self.views)]}
        if op == "stats":
            return self.stats(request["name"])
        if op == "wait_prefetch":
            return await self.wait_prefetch(request["name"], float(request.get("timeout", 600)))
        if op == "configure":
            return self.configure(request)
        if op == "gc":
            return await self.gc(request.get("quota"))
        if op == "cache":
            return {"usage": self.cache.usage(), "quota": self.config.cache_quota, "blobs": self.cache.blobs()}
        raise DadiError(f"unknown control request {op!r}")

    # -- views -----------------------------------------------------------------------------------

    def _view_or_none(self, name: str) -> View | None:
        state = self.views.get(name)
        return state.view if state is not None else None

    def _view_dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise DadiError(f"bad view name {name!r}")
        return self.views_dir / name

    async def add_view(self, request: dict) -> dict:
        name = request["name"]
        if name in self.views or name in self._adding:
            raise DadiError(f"view {name!r} exists already (dadi umount it first)")
        self._adding.add(name)
        try:
            return await self._add_view(name, request)
        finally:
            self._adding.discard(name)

    async def _add_view(self, name: str, request: dict) -> dict:
        self._view_dir(name)  # a bad name is refused before any work
        if request.get("config"):
            self.configure(request["config"])
        if request.get("p2p_listen"):
            await self.peers.ensure_serving(self._nursery, request["p2p_listen"])
        image, manifest, layers, fetcher, sources = await trio.to_thread.run_sync(self._load_image, request)
        try:
            state = self._make_view(name, request, image, manifest, layers, fetcher, sources)
        except BaseException:
            for layer in layers:  # acquired by _load_image: nothing uses them now
                self.cache.release(layer.digest)
            raise
        if self.config.metadata_first and state.view.hints:
            # Beside the mount, not before it: the mount's and the container's first reads then wait
            # only for their own chunks, which are the first metadata on the wire or fetched by them.
            state.metadata_state = "fetching"
            self._nursery.start_soon(self._fetch_metadata, state)
        state.path = await self._serve_natively(state) or self.fs_dir / name
        return {"path": str(state.path), "disk_size": state.view.disk_size}

    async def _serve_natively(self, state: ViewState) -> Path | None:
        """The view's file on the native file system, or None when the Python one serves it: writable
        views and views recording a trace always are (see dadi.node.nativeviews)."""
        view = state.view
        if self.native is None or view.writable is not None or view.trace is not None:
            return None
        try:
            # In a thread: copying a big image's chunk tables and opening its cache files block.
            return await trio.to_thread.run_sync(self.native.add, view, view_inode(view.name),
                                                 self.native_socket)
        except (OSError, ValueError) as e:
            log.warning("view %s: served from Python, the native read path refused it: %s", view.name, e)
            return None

    def _make_view(self, name, request, image, manifest, layers, fetcher, sources) -> ViewState:
        view_dir = self._view_dir(name)
        writable = None
        if request.get("rw"):
            from dadi.node.writable import WritableLayer

            writable = WritableLayer(view_dir / "writable", layers[0].tables.disk_size,
                                     layers[0].tables.block_size)
        trace = None
        if request.get("record_trace"):
            from dadi.node.trace import TraceRecorder

            trace = TraceRecorder(Path(request["record_trace"]), [layer.digest for layer in layers],
                                  float(request.get("trace_seconds") or self.config.trace_seconds))
            self._nursery.start_soon(self._finish_trace, name, trace)
        view = View(name, layers, fetcher=fetcher, limiter=self.limiter, memory=self.memory,
                    writable=writable, io_timeout=float(request.get("io_timeout", 30)), gate=self.gate,
                    spawn=self._nursery.start_soon, trace=trace, store_lock=self.store_lock,
                    on_stored=self.peers.chunks_stored, hint_policy=self.config.hint_policy())
        state = ViewState(view, request, sources, image, manifest)
        self.views[name] = state
        self.fs.add(view)
        view_dir.mkdir(parents=True, exist_ok=True)
        record = {k: v for k, v in request.items() if k not in ("op", "record_trace", "config")}
        _atomic_json(view_dir / "view.json", record)
        if request.get("prefetch", True):
            self._nursery.start_soon(self._prefetch, state)
        else:
            state.prefetch_state = "disabled"
            state.settled.set()
        return state

    def _load_image(self, request: dict):
        """Manifest and verified tables only: no layer data is read here."""
        from dadi.image.dadi_layers import load_layer_tables, require_dadi_image
        from dadi.image.transports import RegistryOptions, open_source, parse_image_ref
        from dadi.node.fetch import Fetcher, LayoutChunkSource, RegistryChunkSource

        ref = parse_image_ref(request["image"])
        options = RegistryOptions(plain_http=bool(request.get("plain_http")), authfile=request.get("authfile"))
        source = open_source(ref, options)
        manifest = source.get_manifest()
        require_dadi_image(manifest, source.description)
        wanted = list(_wanted_layers(manifest, request.get("layers"), source.description))
        # One range request per layer, all at once: one after the other they cost a mount a registry round
        # trip per layer (~10 ms each from the node benchmark's registry; images have 5-15 layers).
        with ThreadPoolExecutor(max_workers=max(1, min(TABLE_REQUESTS, len(wanted)))) as pool:
            all_tables = list(pool.map(partial(load_layer_tables, source), wanted))
        layers = []
        try:
            for desc, tables in zip(wanted, all_tables, strict=True):
                self.cache.acquire(desc.digest)  # before opening: an eviction must never take it from under us
                try:
                    blob = self.cache.open_blob(desc.digest, desc.size, tables)
                except BaseException:
                    self.cache.release(desc.digest)
                    raise
                layers.append(LayerBlob(desc.digest, desc.size, tables, blob))
        except BaseException:
            for layer in layers:
                self.cache.release(layer.digest)
            raise
        supernodes = tuple(request.get("supernodes") or self.config.supernodes)
        if ref.transport == "oci":
            key = ("oci", str(Path(ref.path).resolve()), ())
        elif ref.transport == "docker":
            key = ("docker", f"{source.ref.host}/{source.ref.repository}", supernodes)
        else:
            raise DadiError(f"{ref}: only oci: and docker:// images can be mounted")
        if key not in self._fetchers:
            if ref.transport == "oci":
                chunk_sources = [LayoutChunkSource(Path(ref.path))]
            else:
                # A client of its own without retries: failover and backoff are the fetcher's job.
                chunk_sources = [RegistryChunkSource.connect(
                    source.ref.host, source.ref.repository, plain_http=options.plain_http,
                    authfile=options.authfile, timeout=10.0)]
                if supernodes:
                    chunk_sources.insert(0, _supernode_set(supernodes, source.ref, options.authfile,
                                                           lambda: self.peers.port))
            self._fetchers[key] = Fetcher(chunk_sources, limiter=self.limiter,
                                          on_request=self.metrics.observe_request if self.metrics else None)
        fetcher = self._fetchers[key]
        return ref, manifest, layers, fetcher, [s.name for s in fetcher.sources]

    def attach(self, name: str, loop: str | None, mountpoint: str | None) -> dict:
        state = self._state(name)
        state.request["loop"] = loop
        state.request["mountpoint"] = mountpoint
        _atomic_json(self._view_dir(name) / "view.json", {k: v for k, v in state.request.items() if k != "op"})
        state.loop = loop
        self._nursery.start_soon(self._read_through_page_cache, state)
        return {}

    async def _read_through_page_cache(self, state: ViewState) -> None:
        """Once every chunk of a natively served view is local and verified, turn its loop device's direct
        I/O off (dadi.node.loopdev says why). Never before: until then a read may wait for a source, and
        the loop driver retries a read of its file's page cache that came back short. A no-op for views
        served from Python, before `attach`, and after it was done."""
        view = state.view
        if (state.page_cache or state.loop is None or self.native is None or not self.native.serves(view.name)
                or not all(layer.cache.verified for layer in view.layers)):
            return
        if loopdev.backing_file(state.loop) != str(state.path):  # detached, or taken by someone else since
            return
        state.page_cache = True
        try:
            await trio.to_thread.run_sync(loopdev.set_direct_io, state.loop, False)
        except DadiError as e:
            state.page_cache = False
            log.warning("view %s: keeping direct I/O on %s: %s", view.name, state.loop, e)
            return
        log.info("view %s: every chunk is local; %s reads through the page cache now", view.name, state.loop)

    async def remove_view(self, name: str, discard: bool = False) -> dict:
        """Take the view away; `discard` also deletes its writable layer (a `dadi run` view's)."""
        state = self._state(name)
        for scope in (state.cancel, state.metadata_cancel):
            if scope is not None:
                scope.cancel()
        if state.view.trace is not None and not state.view.trace.written:
            await self._write_trace(name, state.view.trace)
        if self.native is not None:  # first: its reads in flight may be waiting on this loop
            await trio.to_thread.run_sync(self.native.remove, name)
        self.fs.remove(name)
        await state.view.close()
        del self.views[name]
        for layer in state.view.layers:
            self.cache.release(layer.digest)
        if self.cache.quota is not None:  # what this view used may now go
            await trio.to_thread.run_sync(self.cache.evict, self.cache.quota)
        (self._view_dir(name) / "view.json").unlink(missing_ok=True)
        if discard:
            await trio.to_thread.run_sync(shutil.rmtree, self._view_dir(name), True)
        return {}

    def _state(self, name: str) -> ViewState:
        state = self.views.get(name)
        if state is None:
            raise DadiError(f"no view named {name!r}")
        return state

    def _describe(self, name: str) -> dict:
        state = self.views[name]
        return {
            "name": name,
            "image": state.request.get("image"),
            "rw": bool(state.request.get("rw")),
            "path": str(state.path or self.fs_dir / name),
            "native": self.native is not None and self.native.serves(name),
            "loop": state.request.get("loop"),
            "page_cache": state.page_cache,
            "mountpoint": state.request.get("mountpoint"),
            "prefetch_state": state.prefetch_state,
        }

    # -- prefetch --------------------------------------------------------------------------------

    async def _fetch_metadata(self, state: ViewState) -> None:
        with trio.CancelScope() as state.metadata_cancel:
            started = trio.current_time()
            fetched = await state.view.fetch_metadata()
            state.metadata_state = "done"
            log.info("view %s: %d bytes of file system metadata fetched in %.3f s",
                     state.view.name, fetched, trio.current_time() - started)

    async def _prefetch(self, state: ViewState) -> None:
        view = state.view
        with trio.CancelScope() as scope:
            state.cancel = scope
            started = trio.current_time()
            trace = await self._find_trace(state)
            if trace is not None:
                state.prefetch_state = "running"
                state.trace_chunks = await prefetch.prefetch_trace(view, trace, self.pacer)
                log.info("view %s: %d chunks of the image's trace prefetched", view.name, state.trace_chunks)
            delay = float(state.request.get("prefetch_delay", self.config.prefetch_delay))
            await trio.sleep_until(started + delay)
            state.prefetch_state = "running"
            await prefetch.prefetch_layers(view, self.pacer, self.gate, self._read_metadata(view.fetcher))
            state.prefetch_state = "done"
            if self.native is not None:
                self.native.set_complete(view.name)
                await self._read_through_page_cache(state)
            state.settled.set()
            log.info("view %s: prefetch done, every layer is local and matches its digest", view.name)

    async def _find_trace(self, state: ViewState):
        from dadi.image.transports import RegistryOptions
        from dadi.node.trace import find_trace

        request = state.request
        options = RegistryOptions(plain_http=bool(request.get("plain_http")), authfile=request.get("authfile"))
        try:
            with trio.fail_after(METADATA_TIMEOUT * 2):
                return await trio.to_thread.run_sync(find_trace, state.image, state.manifest, options,
                                                     abandon_on_cancel=True)
        except Exception as e:  # a broken or unreachable trace costs the head start, not the mount
            log.warning("view %s: no trace used: %s", state.view.name, e)
            return None

    @staticmethod
    def _read_metadata(fetcher):
        """A function giving a blob's (header, footer) bytes from the first source that has them."""

        def read(layer):
            errors = []
            for source in fetcher.sources:
                try:
                    header = source.fetch_range(layer.digest, 0, HEADER_SIZE, METADATA_TIMEOUT)
                    footer = source.fetch_range(layer.digest, layer.size - FOOTER_SIZE, FOOTER_SIZE,
                                                METADATA_TIMEOUT)
                    return header, footer
                except Exception as e:
                    errors.append(f"{source.name}: {e}")
            raise DadiError("; ".join(errors) or "no sources")

        return read

    async def _finish_trace(self, name: str, trace) -> None:
        await trio.sleep(trace.seconds)
        if not trace.written:
            await self._write_trace(name, trace)

    async def _write_trace(self, name: str, trace) -> None:
        try:
            count = await trio.to_thread.run_sync(trace.write)
            log.info("view %s: trace of %d chunks written to %s", name, count, trace.path)
        except OSError as e:
            log.warning("view %s: could not write the trace %s: %s", name, trace.path, e)

    async def wait_prefetch(self, name: str, seconds: float) -> dict:
        state = self._state(name)
        with trio.move_on_after(seconds):
            await state.settled.wait()
        return self.stats(name)

    # -- stats -----------------------------------------------------------------------------------

    def stats(self, name: str) -> dict:
        state = self._state(name)
        view = state.view
        chunks_total = sum(len(layer.tables.chunks) for layer in view.layers)
        chunks_local = sum(layer.cache.present_count for layer in view.layers)
        bytes_total = sum(layer.size for layer in view.layers)
        bytes_local = sum(_local_bytes(layer) for layer in view.layers)
        fetch_stats = view.fetcher.stats
        s = view.stats
        reads, read_errors, native = s.reads, s.read_errors, None
        if self.native is not None and self.native.serves(name):
            # Every read of the disk reaches the native side first; the Python view saw only its fallbacks.
            n = self.native.stats(name)
            reads, read_errors = n["reads"], n["errors"]
            native = {"reads_local": n["reads"] - n["fallbacks"], "fallbacks": n["fallbacks"],
                      "chunks": n["chunks"]}
        return {
            "name": name,
            "image": state.request.get("image"),
            "bytes_total": bytes_total,
            "bytes_local": bytes_local,
            "bytes_on_demand": s.bytes_on_demand,
            "bytes_prefetched": s.bytes_prefetched,
            "bytes_read_ahead": s.bytes_read_ahead,
            "bytes_companions": s.bytes_companions,
            "bytes_metadata": s.bytes_metadata,
            "hints_ignored": s.hints_ignored,
            "metadata_state": state.metadata_state,
            "sources": dict(fetch_stats.bytes_by_source),  # of every view of this image source
            "chunks_total": chunks_total,
            "chunks_local": chunks_local,
            "prefetch_state": state.prefetch_state,
            "layers_verified": sum(1 for layer in view.layers if layer.cache.verified),
            "layers_total": len(view.layers),
            "trace_chunks": state.trace_chunks,
            "recording_trace": view.trace is not None and view.trace.recording,
            "reads": reads,
            "read_errors": read_errors,
            "native": native,
            "page_cache": state.page_cache,  # the loop device reads the view through the page cache
            "io_timeouts": s.io_timeouts,
            "corrupt_chunks": fetch_stats.corrupt_chunks + sum(layer.cache.corrupt for layer in view.layers),
            "peers": {**_peer_stats(view.fetcher), "served": self.peers.stats()},
            "writes": s.writes,
        }

    # -- settings and the cache ------------------------------------------------------------------

    def configure(self, settings: dict) -> dict:
        """Change cache_quota and prefetch_bandwidth of the running daemon (`dadi mount` passes them)."""
        unknown = set(settings) - {"cache_quota", "prefetch_bandwidth", "op"}
        if unknown:
            raise DadiError(f"cannot configure {', '.join(sorted(unknown))} on a running daemon")
        self.config = self.config.with_overrides(cache_quota=settings.get("cache_quota"),
                                                 prefetch_bandwidth=settings.get("prefetch_bandwidth"))
        self.cache.quota = self.config.cache_quota
        self.pacer.rate = self.config.prefetch_bandwidth
        return {"config": self.config.as_dict()}

    async def gc(self, quota: int | None) -> dict:
        """Remove cached blobs no view uses: down to `quota` bytes (least recently used first), or all."""
        before = self.cache.usage()
        if quota is None:
            removed = await trio.to_thread.run_sync(self.cache.gc)
        else:
            removed = await trio.to_thread.run_sync(self.cache.evict, int(quota))
        after = self.cache.usage()
        log.info("gc: removed %d blobs, %d bytes freed", len(removed), before - after)
        return {"removed": removed, "freed": before - after, "usage": after}


def _wanted_layers(manifest, digests: list[str] | None, where: str):
    """The manifest's layers, or with `digests` (add_view's "layers", bottom first; the containerd
    snapshotter's parent chain) only the bottom ones, which must be exactly those."""
    if digests is None:
        return manifest.layers
    have = [desc.digest for desc in manifest.layers[:len(digests)]]
    if not digests or have != list(digests):
        raise DadiError(f"{where}: the image's bottom layers are not {', '.join(digests) or 'given'} "
                        f"(its layers: {', '.join(d.digest for d in manifest.layers)})")
    return manifest.layers[:len(digests)]


def _supernode_set(urls, ref, authfile, peer_port=lambda: None):
    """Supernodes in front of the registry of `ref`, sent our credentials for that registry."""
    from dadi.p2p.client import authorization_for
    from dadi.p2p.sources import SupernodeSet

    return SupernodeSet(urls, ref.repository, authorization=authorization_for(ref.host, ref.repository, authfile),
                        peer_port=peer_port)


def _peer_stats(fetcher) -> dict:
    """What this view's image source got from peers (dadi.p2p.sources.PeerStats of its supernodes)."""
    stats = [s.peer_stats for s in fetcher.sources if hasattr(s, "peer_stats")]
    return {k: sum(getattr(s, k) for s in stats) for k in ("redirects", "received_bytes", "failures", "corrupt_chunks")}


def _local_bytes(layer: LayerBlob) -> int:
    """Bytes of the blob this node holds: its cached chunks, and the rest of the blob (header, tables,
    footer) once the cache has it, else the tables alone (every mount fetches them)."""
    chunks = layer.tables.chunks
    local = sum(c.length for i, c in enumerate(chunks) if layer.cache.has(i))
    data_end = chunks[-1].offset + chunks[-1].length if chunks else HEADER_SIZE
    if layer.cache.has_metadata:
        return local + layer.size - sum(c.length for c in chunks)
    return local + layer.size - FOOTER_SIZE - data_end


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True))
    os.replace(tmp, path)
