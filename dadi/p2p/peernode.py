"""The node daemon's P2P side (`dadi mount --p2p-listen ADDR`, `p2p_listen` in daemon.toml): the peer
server (peer.py) and the announcer (announce.py), wired to the daemon's views.

The daemon makes one PeerNode and asks it to serve once an address is known (at start from the config,
or from the first `dadi mount --p2p-listen`). What it serves and announces: the blobs of the mounted
views whose images go through supernodes, to those supernodes. `port` is what the node's SupernodeSets
send as X-Dadi-Peer-Port, so a supernode never redirects a node to itself.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from dadi.errors import DadiError
from dadi.p2p import peer
from dadi.p2p.announce import Announcer

log = logging.getLogger(__name__)


class PeerNode:
    def __init__(self, daemon: Any):
        self.daemon = daemon  # reads daemon.views (ViewState: view.layers, request) and daemon.config
        self.listen: str | None = None
        self.port: int | None = None
        self.app: peer.PeerApp | None = None
        self.announcer: Announcer | None = None

    def find_blob(self, digest: str) -> Any:
        for state in list(self.daemon.views.values()):
            for layer in state.view.layers:
                if layer.digest == digest:
                    return layer
        return None

    def blobs_by_supernode(self) -> dict[str, list[Any]]:
        out: dict[str, dict[str, Any]] = {}
        for state in list(self.daemon.views.values()):
            urls = state.request.get("supernodes") or self.daemon.config.supernodes
            if not str(state.request.get("image", "")).startswith("docker://"):
                continue
            for url in urls:
                for layer in state.view.layers:
                    out.setdefault(url.rstrip("/"), {})[layer.digest] = layer
        return {url: list(layers.values()) for url, layers in out.items()}

    async def ensure_serving(self, nursery: trio.Nursery, listen: str) -> None:
        """Serve peers on `listen` (HOST:PORT) from now on; an error if already serving elsewhere."""
        if self.listen is not None:
            if listen != self.listen:
                raise DadiError(f"this daemon serves peers on {self.listen} already, not {listen} "
                                "(stop it to change the address)")
            return
        if ":" not in listen:
            raise DadiError(f"p2p listen address {listen!r}: HOST:PORT expected, e.g. 0.0.0.0:8901")
        self.app = peer.PeerApp(self.find_blob, self._keys)
        binds = await nursery.start(self._serve, listen)
        self.listen = listen
        self.port = int(binds[0].rsplit(":", 1)[1])
        self.announcer = Announcer(self.port, self.blobs_by_supernode)
        nursery.start_soon(self._announce)
        log.info("serving verified chunks to peers on %s", " ".join(binds))

    def chunks_stored(self, digest: str, indexes: list[int]) -> None:
        """The views' on_stored hook: chunks reached the cache, so pieces may be complete (announce them)."""
        if self.announcer is not None:
            self.announcer.chunks_arrived(digest, indexes)

    def _keys(self) -> list[bytes]:
        return self.announcer.keys() if self.announcer is not None else []

    async def _serve(self, listen: str, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await peer.serve(self.app, listen, task_status=task_status)
        except OSError as e:
            raise DadiError(f"cannot serve peers on {listen}: {e}") from e

    async def _announce(self) -> None:
        try:
            await self.announcer.run()
        finally:
            await self.announcer.leave()

    def stats(self) -> dict:
        if self.app is None:
            return {"listen": None}
        return {"listen": self.listen, "port": self.port, "uploads_in_flight": self.app.in_flight,
                **self.app.stats.__dict__, "announces": self.announcer.stats.announces,
                "announce_failures": self.announcer.stats.failures, "pieces_announced": self.announcer.stats.pieces}
