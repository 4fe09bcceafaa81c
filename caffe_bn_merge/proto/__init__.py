"""Caffe message classes, built at import from our compiled schema (`caffe.desc`, made from
`caffe.proto` by `scripts/build_schema.py`). Loading a descriptor set instead of generated `_pb2`
code keeps us independent of the protobuf runtime's generated-code version checks."""

from importlib.resources import files

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


def _schema() -> object:
    """Our schema's FileDescriptor, in a pool of its own."""
    raw = files(__package__).joinpath("caffe.desc").read_bytes()
    file_set = descriptor_pb2.FileDescriptorSet.FromString(raw)
    pool = descriptor_pool.DescriptorPool()
    for file_proto in file_set.file:
        pool.Add(file_proto)
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
