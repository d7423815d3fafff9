"""Regenerate this package's gRPC modules from its .proto files (dadi.protogen says how and why).

    python -m dadi.snapshotter.proto.generate           # rewrite them
    python -m dadi.snapshotter.proto.generate --check   # exit 1 when they differ from the .proto files
"""

import sys
from pathlib import Path

from dadi.protogen import regenerate

PROTOS = ["mount", "descriptor", "snapshots", "images", "content", "leases"]

if __name__ == "__main__":
    sys.exit(regenerate(Path(__file__).resolve().parent, PROTOS, sys.argv[1:]))
