"""Generate the gRPC/protobuf Python modules from proto/ into services/rpc (checked in).

protoc writes absolute imports (`from specwire.v1 import target_pb2`); they are rewritten to
`services.rpc.specwire.v1` so the stubs import without touching sys.path.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
OUT_DIR = Path(__file__).resolve().parent
GENERATED_GLOB = "specwire/v1/*_pb2*.py*"


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Run protoc on every proto file; return the generated files."""
    from grpc_tools import protoc  # dev dependency, only needed to regenerate

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    files = sorted(out_dir.glob(GENERATED_GLOB))
    for path in files:
        text = re.sub(
            r"^from specwire\.v1 import", "from services.rpc.specwire.v1 import", path.read_text(), flags=re.M
        )
        path.write_text(text)
    for package in (out_dir / "specwire", out_dir / "specwire" / "v1"):
        (package / "__init__.py").touch()
    return files


if __name__ == "__main__":
    for generated in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(generated)
