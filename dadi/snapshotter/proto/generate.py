"""Generate the Python modules (*_pb2.py, *_pb2_grpc.py) from the .proto files beside this file.

    python -m dadi.snapshotter.proto.generate           # rewrite them
    python -m dadi.snapshotter.proto.generate --check   # exit 1 when they differ from the .proto files

The generated modules are committed, so installing dadi needs no protoc; grpcio-tools (a test extra)
is only needed to regenerate them, and tests/test_snapshotter.py checks they are up to date.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
PROTOS = ("mount", "descriptor", "snapshots", "images", "content", "leases")


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto into out_dir/dadi/snapshotter/proto/; the generated files' paths."""
    import importlib.resources

    from grpc_tools import protoc

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    args = ["protoc", f"-I{REPO}", f"-I{include}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
    args += [str(HERE / f"{name}.proto") for name in PROTOS]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "dadi" / "snapshotter" / "proto").glob("*_pb2*.py"))


def main(argv: list[str]) -> int:
    check = "--check" in argv
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for path in generate(Path(tmp)):
            target = HERE / path.name
            text = path.read_text()
            if not target.exists() or target.read_text() != text:
                stale.append(target.name)
                if not check:
                    target.write_text(text)
    if check and stale:
        print(f"out of date: {', '.join(stale)} (python -m dadi.snapshotter.proto.generate)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
