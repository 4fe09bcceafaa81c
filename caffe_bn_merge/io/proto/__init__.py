"""Caffe message classes, built at import from our compiled schema (`caffe.desc`, made from
`caffe.proto` by `scripts/build_schema.py`). Loading a descriptor set instead of generated `_pb2`
code keeps us independent of the protobuf runtime's generated-code version checks."""

import pkgutil

from google.protobuf import descriptor_pool, message_factory

from ..wire import iter_fields


def _schema() -> object:
    """Our schema's FileDescriptor, in a pool of its own."""
    raw = pkgutil.get_data(__name__, "caffe.desc")  # through the loader: works from a zip too
    pool = descriptor_pool.DescriptorPool()
    for item in iter_fields(memoryview(raw)):  # a FileDescriptorSet: field 1 holds each file
        if item.number == 1:
            pool.AddSerializedFile(raw[item.value_start : item.end])
    return pool.FindFileByName("caffe.proto")


_SCHEMA = _schema()
_CLASSES = {name: message_factory.GetMessageClass(d) for name, d in _SCHEMA.message_types_by_name.items()}
TRAIN = _SCHEMA.enum_types_by_name["Phase"].values_by_name["TRAIN"].number
TEST = _SCHEMA.enum_types_by_name["Phase"].values_by_name["TEST"].number
NetParameter = _CLASSES["NetParameter"]
LayerParameter = _CLASSES["LayerParameter"]
V1LayerParameter = _CLASSES["V1LayerParameter"]
BlobProto = _CLASSES["BlobProto"]
NetState = _CLASSES["NetState"]
SolverParameter = _CLASSES["SolverParameter"]
PoolingParameter = _CLASSES["PoolingParameter"]
