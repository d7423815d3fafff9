"""Generate api_pb2.py and api_pb2_grpc.py from api.proto (our subset of k8s.io/cri-api's runtime.v1).

    python -m dadi.cri.proto.generate           # rewrite them
    python -m dadi.cri.proto.generate --check   # exit 1 when they differ from api.proto

The generated modules are committed (installing dadi needs no protoc); grpcio-tools, a test extra, only
regenerates them, and tests/test_cri.py checks that they are current.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def main(argv: list[str]) -> int:
    from grpc_tools import protoc

    check = "--check" in argv
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{REPO}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", str(HERE / "api.proto")]
        if protoc.main(args) != 0:
            print("protoc failed", file=sys.stderr)
            return 1
        stale = []
        for made in sorted((Path(tmp) / "dadi" / "cri" / "proto").glob("*_pb2*.py")):
            target = HERE / made.name
            if not target.exists() or target.read_text() != made.read_text():
                stale.append(made.name)
                if not check:
                    target.write_text(made.read_text())
    if check and stale:
        print(f"out of date: {', '.join(stale)} (python -m dadi.cri.proto.generate)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
