"""`dadi snapshotter`: the gRPC server on a unix socket, its start and its stop.

Start: the store is opened, leftovers of a crash are cleaned (Cleanup), a stale socket file is
replaced, and the socket is made 0600. SIGTERM/SIGINT stop it, giving calls in flight 5 s. Nothing a
running container uses belongs to this process (views and loop devices are the node daemon's and the
kernel's), so stopping or killing it leaves containers running; the next start serves them from the store.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc

from dadi.errors import DadiError
from dadi.snapshotter.config import SnapshotterConfig
from dadi.snapshotter.proto import snapshots_pb2_grpc
from dadi.snapshotter.service import SnapshotsService
from dadi.snapshotter.snapshots import DadiSnapshotter

log = logging.getLogger(__name__)

GRACE = 5.0  # seconds calls in flight get at shutdown


def serve(root: Path, address: Path, config: SnapshotterConfig) -> None:
    address = Path(address).resolve()
    snapshotter = DadiSnapshotter(root, config)
    try:
        snapshotter.cleanup()
    except DadiError as e:  # e.g. a node daemon that does not answer: serving matters more
        log.warning("cleanup at start failed: %s", e)
    address.parent.mkdir(parents=True, exist_ok=True)
    if address.exists() or address.is_symlink():
        address.unlink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="snapshots"))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter), server)
    if server.add_insecure_port(f"unix://{address}") == 0:
        raise DadiError(f"cannot listen on {address}")
    server.start()
    os.chmod(address, 0o600)
    log.info("dadi snapshotter serving on %s (root %s, rw_mode %s, node daemon root %s)",
             address, snapshotter.root, config.rw_mode, config.node_root)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    log.info("stopping")
    server.stop(GRACE).wait()
    snapshotter.close()
    address.unlink(missing_ok=True)
