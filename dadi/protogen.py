"""Regenerates the committed gRPC modules (*_pb2.py, *_pb2_grpc.py) of a proto package from its .proto
files: dadi/snapshotter/proto (containerd's API) and dadi/cri/proto (CRI) each call this from their
`generate` module.

The generated modules are committed, so installing dadi needs no protoc; grpcio-tools (a test extra) is
only needed to regenerate them, and the tests run `--check` so that they never drift from the .proto files.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _compile(proto_dir: Path, protos: list[str], out_dir: Path) -> list[Path]:
    """Compile `protos` (names without .proto) of proto_dir into out_dir; the generated files."""
    import importlib.resources

    from grpc_tools import protoc

    include = str(importlib.resources.files("grpc_tools") / "_proto")  # google/protobuf/*.proto
    args = ["protoc", f"-I{REPO}", f"-I{include}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
    args += [str(proto_dir / f"{name}.proto") for name in protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / proto_dir.relative_to(REPO)).glob("*_pb2*.py"))


def regenerate(proto_dir: Path, protos: list[str], argv: list[str]) -> int:
    """Rewrite the stale generated modules of proto_dir; with "--check" in argv only name them (exit 1)."""
    check = "--check" in argv
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for made in _compile(proto_dir, protos, Path(tmp)):
            target = proto_dir / made.name
            text = made.read_text()
            if not target.exists() or target.read_text() != text:
                stale.append(target.name)
                if not check:
                    target.write_text(text)
    if check and stale:
        module = ".".join(proto_dir.relative_to(REPO).parts)
        print(f"out of date: {', '.join(stale)} (python -m {module}.generate)", file=sys.stderr)
        return 1
    return 0
