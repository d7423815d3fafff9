"""Media types and annotation keys of OCI, Docker schema2 and dadi images."""

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"

DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

# Named under "application/vnd.oci.image.layer.", not a vendor tree of its own: containerd (images.IsLayerType)
# treats only that prefix and Docker's rootfs types as layers. Anything else is fetched in full as a plain
# child of the manifest and never reaches the unpacker, so CRI PullImage would download every dadi blob
# and hand the snapshotter no layer labels. As a layer, its annotations reach the snapshotter, which
# answers AlreadyExists (nothing is downloaded). No "+suffix" on "v1.tar": containerd would take
# "v1.tar+anything" for an uncompressed tar; this name makes a snapshotter that does not know dadi fail
# with "no processor for media-type" instead.
DADI_LAYER = "application/vnd.oci.image.layer.v1.dadi"

INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)

# Source layer media types -> the compression of their bytes ("auto": sniff the magic number).
LAYER_COMPRESSION = {
    OCI_LAYER_TAR: "none",
    OCI_LAYER_NONDIST_TAR: "none",
    DOCKER_LAYER_TAR: "none",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_NONDIST_GZIP: "gzip",
    DOCKER_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
}

# containerd copies annotations with this prefix into snapshot labels, so the snapshotter sees them.
ANNOTATION_PREFIX = "containerd.io/snapshot/dadi/"
ANN_TABLES_DIGEST = ANNOTATION_PREFIX + "tables.digest"
ANN_TABLES_SIZE = ANNOTATION_PREFIX + "tables.size"
ANN_SOURCE_DIFF_ID = ANNOTATION_PREFIX + "source.diffid"
ANN_CHAIN_ID = ANNOTATION_PREFIX + "chainid"
ANN_DISK_SIZE = ANNOTATION_PREFIX + "disk.size"
ANN_FORMAT_VERSION = ANNOTATION_PREFIX + "format.version"
# On the manifest: marks a dadi image and says which converter made it.
ANN_IMAGE = "io.dadi.image.version"
OCI_REF_NAME = "org.opencontainers.image.ref.name"
