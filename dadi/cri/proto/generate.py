"""Regenerate api_pb2.py and api_pb2_grpc.py from api.proto, our subset of k8s.io/cri-api's runtime.v1
(dadi.protogen says how and why).

    python -m dadi.cri.proto.generate           # rewrite them
    python -m dadi.cri.proto.generate --check   # exit 1 when they differ from api.proto
"""

import sys
from pathlib import Path

from dadi.protogen import regenerate

if __name__ == "__main__":
    sys.exit(regenerate(Path(__file__).resolve().parent, ["api"], sys.argv[1:]))
