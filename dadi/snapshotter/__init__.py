"""containerd integration: `dadi snapshotter` (a proxy snapshotter serving containerd's snapshots API
over gRPC on a unix socket) and `dadi pull` (a dadi image into containerd without its layers).

Modules: labels (which Prepare calls are dadi layers), store (sqlite metadata), snapshots (the logic),
views (node-daemon views on loop devices), filters (List filters), service + server (gRPC), config
(settings), containerd + pull (`dadi pull`), proto/ (containerd's API subset, generated code committed;
regenerate with `python -m dadi.snapshotter.proto.generate`).

Reference for operators
-----------------------
containerd's /etc/containerd/config.toml (version 2)::

    [proxy_plugins.dadi]
      type = "snapshot"
      address = "/run/dadi/snapshotter.sock"

    # for Kubernetes (CRI): pull through the snapshotter, with the layer annotations as labels
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "dadi"
      disable_snapshot_annotations = false

The snapshotter::

    dadi snapshotter [--root /var/lib/dadi-snapshotter] [--address /run/dadi/snapshotter.sock]
                     [--config FILE] [--plain-http] [--rw-mode dev|overlayfs] [--daemon-root DIR] [-v]

Its settings file (TOML; every key optional, unknown keys are errors; options override it)::

    rw_mode = "dev"               # "dev" (default): per-container writable dadi view on a loop device,
                                  #   mounted ext4 by containerd; "overlayfs": read-only view mounted
                                  #   ext4 under ROOT/snapshots/ID/lower + overlay upper/work there
    daemon_root = "/var/lib/dadi" # node daemon root; started there if none runs ($DADI_ROOT)
    plain_http = false            # plain HTTP to the images' registries
    authfile = "/root/.docker/config.json"
    prefetch = true               # background prefetch of the whole image once a container runs
    io_timeout = 30.0             # seconds before an unservable read fails with EIO

Under ROOT: metadata.db (sqlite: snapshots per containerd namespace, parents, kinds, labels, times,
remote layer records, attached views/loop devices), snapshots/ID/{fs,work,lower}. Daemon views are named
`ctd-<8 hex of ROOT>-<snapshot id>` (`dadi ls --root DAEMON_ROOT` shows them).

Labels a Prepare may carry (containerd passes the layer's `containerd.io/snapshot/` annotations):
`containerd.io/snapshot.ref` (chain id to commit) + `containerd.io/snapshot/dadi/tables.digest` (marks a
dadi layer) + the image: `containerd.io/snapshot/dadi/image-ref` (docker://HOST/REPO@sha256:MANIFEST)
and `containerd.io/snapshot/dadi/layer.digest` (what `dadi pull` sets), or CRI's
`containerd.io/snapshot/cri.image-ref`, `.../cri.manifest-digest`, `.../cri.layer-digest`.

`dadi pull --containerd SOCK [--namespace NS] [--snapshotter dadi] [--plain-http] [--authfile F] [--json]
IMAGE`: see dadi/snapshotter/pull.py; afterwards `ctr -a SOCK run --snapshotter dadi HOST/REPO:TAG ID CMD`.
"""
