"""The node daemon: one per root directory. Owns the FUSE file system of views, the chunk cache, fetching
and prefetch, and answers `dadi mount/umount/ls/stats` on a unix control socket in the root.

Layout of the root (default /var/lib/dadi):
    control.sock         JSON-lines control socket (one request, one reply per connection)
    fs/                  the FUSE mount: one file per view, the view's disk
    cache/               the chunk cache (dadi.node.chunkcache)
    views/NAME/view.json what the view is (image, options) and where it is attached (loop, mountpoint)
    views/NAME/writable/ the view's private writable layer (with --rw), kept across umount/mount
    daemon.log           the daemon's log when `dadi mount` started it
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from dadi.errors import DadiError
from dadi.node.fusefs import ViewsFS
from dadi.node.view import ChunkLRU, LayerBlob, View

log = logging.getLogger(__name__)

PREFETCH_DELAY = 2.0  # seconds after mount before background prefetch starts
PREFETCH_BATCH = 32  # chunks per prefetch request


@dataclass
class ViewState:
    view: View
    request: dict
    fetch_sources: list[str]
    prefetch_state: str = "waiting"
    cancel: trio.CancelScope | None = None
    settled: trio.Event = field(default_factory=trio.Event)  # prefetch done or disabled


class Daemon:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.fs_dir = self.root / "fs"
        self.views_dir = self.root / "views"
        self.socket_path = self.root / "control.sock"
        for d in (self.root, self.fs_dir, self.views_dir):
            d.mkdir(parents=True, exist_ok=True)
        from dadi.node.chunkcache import ChunkCache

        self.cache = ChunkCache(self.root / "cache")
        self.fs = ViewsFS()
        self.limiter = trio.CapacityLimiter(8)
        self.memory = ChunkLRU()
        self.views: dict[str, ViewState] = {}
        self._fetchers: dict[str, object] = {}
        self._nursery: trio.Nursery | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self) -> None:
        subprocess.run(["umount", "-l", str(self.fs_dir)], capture_output=True)  # a dead daemon's mount
        options = set(pyfuse3.default_options)
        options |= {"fsname=dadi", "allow_other"}
        pyfuse3.init(self.fs, str(self.fs_dir), options)
        try:
            trio.run(self._main)
        finally:
            pyfuse3.close(unmount=True)

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(pyfuse3.main)
            nursery.start_soon(self._serve_control)
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            for path in sorted(self.views_dir.glob("*/view.json")):  # views of a previous run
                try:
                    await self.add_view(json.loads(path.read_text()))
                except Exception as e:
                    log.warning("could not restore view %s: %s", path.parent.name, e)
            log.info("dadi daemon ready under %s", self.root)

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: flushing views and stopping", signum)
                for state in self.views.values():
                    await state.view.flush()
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
        if op == "add_view":
            return await self.add_view(request)
        if op == "attach":
            return self.attach(request["name"], request.get("loop"), request.get("mountpoint"))
        if op == "remove_view":
            return await self.remove_view(request["name"])
        if op == "list":
            return {"views": [self._describe(name) for name in sorted(self.views)]}
        if op == "stats":
            return self.stats(request["name"])
        if op == "wait_prefetch":
            return await self.wait_prefetch(request["name"], float(request.get("timeout", 600)))
        raise DadiError(f"unknown control request {op!r}")

    # -- views -----------------------------------------------------------------------------------

    def _view_dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise DadiError(f"bad view name {name!r}")
        return self.views_dir / name

    async def add_view(self, request: dict) -> dict:
        name = request["name"]
        if name in self.views:
            raise DadiError(f"view {name!r} exists already (dadi umount it first)")
        view_dir = self._view_dir(name)
        layers, fetcher, sources = await trio.to_thread.run_sync(self._load_image, request)
        writable = None
        if request.get("rw"):
            from dadi.node.writable import WritableLayer

            writable = WritableLayer(view_dir / "writable", layers[0].tables.disk_size,
                                     layers[0].tables.block_size)
        view = View(name, layers, fetcher=fetcher, limiter=self.limiter, memory=self.memory,
                    writable=writable, io_timeout=float(request.get("io_timeout", 30)))
        state = ViewState(view, request, sources)
        self.views[name] = state
        self.fs.add(view)
        view_dir.mkdir(parents=True, exist_ok=True)
        record = {k: v for k, v in request.items() if k not in ("op",)}
        _atomic_json(view_dir / "view.json", record)
        if request.get("prefetch", True):
            self._nursery.start_soon(self._prefetch, state)
        else:
            state.prefetch_state = "disabled"
            state.settled.set()
        return {"path": str(self.fs_dir / name), "disk_size": view.disk_size}

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
        layers = []
        for desc in manifest.layers:
            tables = load_layer_tables(source, desc)
            self.cache.acquire(desc.digest)  # before opening: an eviction must never take it from under us
            layers.append(LayerBlob(desc.digest, desc.size, tables, self.cache.open_blob(desc.digest, desc.size, tables)))
        key = f"{ref.transport}:{ref.path}"
        if key not in self._fetchers:
            if ref.transport == "oci":
                chunk_sources = [LayoutChunkSource(Path(ref.path))]
            elif ref.transport == "docker":
                # A client of its own without retries: failover and backoff are the fetcher's job.
                chunk_sources = [RegistryChunkSource.connect(
                    source.ref.host, source.ref.repository, plain_http=options.plain_http,
                    authfile=options.authfile, timeout=10.0)]
            else:
                raise DadiError(f"{ref}: only oci: and docker:// images can be mounted")
            self._fetchers[key] = Fetcher(chunk_sources, limiter=self.limiter)
        fetcher = self._fetchers[key]
        return layers, fetcher, [s.name for s in fetcher.sources]

    def attach(self, name: str, loop: str | None, mountpoint: str | None) -> dict:
        state = self._state(name)
        state.request["loop"] = loop
        state.request["mountpoint"] = mountpoint
        _atomic_json(self._view_dir(name) / "view.json", {k: v for k, v in state.request.items() if k != "op"})
        return {}

    async def remove_view(self, name: str) -> dict:
        state = self._state(name)
        if state.cancel is not None:
            state.cancel.cancel()
        self.fs.remove(name)
        await state.view.close()
        del self.views[name]
        for layer in state.view.layers:
            self.cache.release(layer.digest)
        (self._view_dir(name) / "view.json").unlink(missing_ok=True)
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
            "path": str(self.fs_dir / name),
            "loop": state.request.get("loop"),
            "mountpoint": state.request.get("mountpoint"),
            "prefetch_state": state.prefetch_state,
        }

    # -- prefetch --------------------------------------------------------------------------------

    async def _prefetch(self, state: ViewState) -> None:
        view = state.view
        with trio.CancelScope() as scope:
            state.cancel = scope
            await trio.sleep(float(state.request.get("prefetch_delay", PREFETCH_DELAY)))
            state.prefetch_state = "running"
            for layer in view.layers:
                missing = await trio.to_thread.run_sync(layer.cache.missing, range(len(layer.tables.chunks)))
                for start in range(0, len(missing), PREFETCH_BATCH):
                    batch = missing[start:start + PREFETCH_BATCH]
                    while True:
                        try:
                            await view.chunks(layer, batch, trio.current_time() + 60, purpose="prefetch")
                            break
                        except Exception as e:  # the network is down: try again later, reads go on
                            log.warning("view %s: prefetch of %s paused: %s", view.name, layer.digest, e)
                            await trio.sleep(5)
                await trio.to_thread.run_sync(layer.cache.flush)
            state.prefetch_state = "done"
            state.settled.set()
            log.info("view %s: prefetch done, every chunk is local", view.name)

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
        bytes_local = sum(
            sum(c.length for i, c in enumerate(layer.tables.chunks) if layer.cache.has(i)) for layer in view.layers
        )
        fetch_stats = getattr(view.fetcher, "stats", None)
        sources = dict(getattr(fetch_stats, "bytes_by_source", {}) or {})
        s = view.stats
        return {
            "name": name,
            "image": state.request.get("image"),
            "bytes_total": bytes_total,
            "bytes_local": bytes_local,
            "bytes_on_demand": s.bytes_on_demand,
            "bytes_prefetched": s.bytes_prefetched,
            "sources": sources,
            "chunks_total": chunks_total,
            "chunks_local": chunks_local,
            "prefetch_state": state.prefetch_state,
            "reads": s.reads,
            "read_errors": s.read_errors,
            "io_timeouts": s.io_timeouts,
            "writes": s.writes,
        }


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True))
    os.replace(tmp, path)
