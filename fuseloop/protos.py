"""Generates the Python gRPC stubs in `fuseloop/v1/` from `proto/` with the pinned grpcio-tools.

The stubs are committed so that a plain `pip install` works; `tests/test_protos.py`
fails when they drift from the `.proto` files or from the installed protoc.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("fuseloop/v1/*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc into `out_dir` (which then holds `fuseloop/v1/*_pb2*.py`) and returns the files."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_DIR)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_dir / "fuseloop" / "v1").glob("*_pb2*.py*"))


def main() -> None:
    files = generate(ROOT)
    (ROOT / "fuseloop" / "v1" / "__init__.py").touch()
    print("\n".join(str(f.relative_to(ROOT)) for f in files))


if __name__ == "__main__":
    sys.exit(main())
