"""Regenerate caffe_bn_merge/io/proto/caffe.desc from caffe_bn_merge/io/proto/caffe.proto.

The package builds its Caffe message classes from this compiled FileDescriptorSet, so
rerun this script after every edit of caffe.proto. It runs grpc_tools' bundled protoc
in-process with the same arguments as this command, run from the repository root:

    python -m grpc_tools.protoc --proto_path=caffe_bn_merge/io/proto
        --descriptor_set_out=caffe_bn_merge/io/proto/caffe.desc caffe.proto

Needs grpcio-tools (pip install 'grpcio-tools>=1.60,<2'), a build tool only.
With --check it compiles to a temporary file and exits 1 if caffe.desc is stale.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent.parent / "caffe_bn_merge" / "io" / "proto"
PROTO_NAME = "caffe.proto"
DESC_PATH = PROTO_DIR / "caffe.desc"


def compile_schema(out_path: Path) -> None:
    """Compile caffe.proto to a FileDescriptorSet at ``out_path``; exit on failure."""
    try:
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError:
        sys.exit("build_schema: grpcio-tools is missing; run: pip install 'grpcio-tools>=1.60,<2'")
    args = [
        "protoc",
        f"--proto_path={PROTO_DIR}",
        f"--descriptor_set_out={out_path}",
        PROTO_NAME,
    ]
    status: int = protoc.main(args)
    if status != 0:
        sys.exit(f"build_schema: protoc failed (status {status}) on {PROTO_NAME}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if caffe.desc differs from a fresh compile",
    )
    opts = parser.parse_args(argv)
    if not opts.check:
        compile_schema(DESC_PATH)
        print(f"wrote {DESC_PATH}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "caffe.desc"
        compile_schema(fresh)
        if DESC_PATH.is_file() and fresh.read_bytes() == DESC_PATH.read_bytes():
            print(f"{DESC_PATH} is up to date")
            return 0
    print(f"{DESC_PATH} is stale: run python scripts/build_schema.py", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
