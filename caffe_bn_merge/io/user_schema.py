"""`--caffe-proto`: a fork's own caffe.proto, compiled at run time with grpcio-tools (the optional
`schema` extra), so its prototxt fields are read and written by name."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from ..errors import InputError
from .prototxt import Schema
from .read import read_regular

MAX_SCHEMA_BYTES = 16 << 20  # BVLC's caffe.proto is 70 KB


def compile_schema(path: Path) -> Schema:
    """Compile `path` (package `caffe`) and return its NetParameter / LayerParameter classes."""
    try:
        from grpc_tools import protoc
    except ImportError as err:
        raise InputError("--caffe-proto needs grpcio-tools: pip install 'caffe-bn-merge[schema]'") from err
    path = Path(path)
    read_regular(path, "--caffe-proto", MAX_SCHEMA_BYTES, "a smaller caffe.proto")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "schema.desc"
        args = ["protoc", f"--proto_path={path.parent.resolve()}", f"--descriptor_set_out={out}", path.name]
        status, messages = _quietly(lambda: protoc.main(args), Path(tmp) / "protoc.log")
        if status != 0 or not out.is_file():
            first = next((line for line in messages.splitlines() if line.strip()), "no message")
            raise InputError(f"{path}: protoc cannot compile it: {first}")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file_proto in files.file:
        pool.Add(file_proto)
    try:
        net, layer = (pool.FindMessageTypeByName(f"caffe.{n}") for n in ("NetParameter", "LayerParameter"))
    except KeyError as err:
        raise InputError(f"{path}: no caffe.NetParameter / caffe.LayerParameter in it; is it a caffe.proto?") from err
    return Schema(message_factory.GetMessageClass(net), message_factory.GetMessageClass(layer))


def _quietly(run: Callable[[], int], log: Path) -> tuple[int, str]:
    """Run `run` with file descriptor 2 (where protoc, in C++, writes) sent to `log`."""
    saved = os.dup(2)
    try:
        with log.open("wb") as handle:
            os.dup2(handle.fileno(), 2)
            status = run()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return status, log.read_text(errors="replace")
