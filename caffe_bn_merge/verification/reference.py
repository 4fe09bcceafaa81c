"""The reference engine: a float64 numpy forward pass of a Caffe net at the TEST phase.

`run_reference` is a drop-in `verification.Runner` (like `run_opencv`): it evaluates only the layers
the requested (layer, top) pairs depend on, each with the function `ref_layers.LAYERS` holds for its
type. A type is looked up in `register_layer` calls first (they may replace a built-in function),
then in the built-in table, then in the `caffe_bn_merge.layers` entry-point group (name = layer
type, value = the forward function; loaded once, at the first type the built-in table lacks).

A plug-in file (`load_plugin`) is a Python file that defines a dict `LAYERS = {"Type": forward}`:

    def forward(layer, inputs, blobs):  # LayerParameter, bottom arrays, stored blobs (float64)
        return [inputs[0] * 2]  # one array per top; never modify the inputs

The net is parsed with our schema extended by the fork fields it lacks (`upsample_param`,
`interp_param`, `shuffle_channel_param`), so fork layers read their parameters by name.
"""

import importlib.metadata
import importlib.util
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from ..errors import MergeError, VerifyError
from ..graph import NET_INPUT, BlobVersion, LayerNode, NetGraph, build_graph
from ..io import proto
from ..io.prototxt import Schema
from ..io.read import read_net_text, read_weights
from .ref_layers import LAYERS, Forward

ENTRY_POINT_GROUP = "caffe_bn_merge.layers"
_registered: dict[str, Forward] = {}
_entry_points: dict[str, Forward] | None = None

# Fork messages our schema lacks: (message, [(field, number, type, default)]); numbers are ours only.
_INT, _BOOL = descriptor_pb2.FieldDescriptorProto.TYPE_UINT32, descriptor_pb2.FieldDescriptorProto.TYPE_BOOL
_SINT = descriptor_pb2.FieldDescriptorProto.TYPE_INT32
_FORK_MESSAGES = {
    "UpsampleParameter": [  # YOLO ports (scale) and caffe-segnet (scale_h/w, pad_out_h/w, upsample_h/w)
        ("scale", 1, _INT, "2"),
        ("scale_h", 2, _INT, None),
        ("scale_w", 3, _INT, None),
        ("pad_out_h", 4, _BOOL, "false"),
        ("pad_out_w", 5, _BOOL, "false"),
        ("upsample_h", 6, _INT, None),
        ("upsample_w", 7, _INT, None),
    ],
    "InterpParameter": [  # PSPNet / DeepLab
        ("height", 1, _SINT, "0"),
        ("width", 2, _SINT, "0"),
        ("zoom_factor", 3, _SINT, "1"),
        ("shrink_factor", 4, _SINT, "1"),
        ("pad_beg", 5, _SINT, "0"),
        ("pad_end", 6, _SINT, "0"),
    ],
    "ShuffleChannelParameter": [("group", 1, _INT, "1")],  # ShuffleNet ports
}
_FORK_LAYER_FIELDS = [("upsample_param", 9001), ("interp_param", 9002), ("shuffle_channel_param", 9003)]


def register_layer(type_name: str, forward: Forward) -> None:
    """Make `forward(layer, inputs, blobs) -> outputs` compute layers of `type_name` (it wins over
    the built-in table and the entry points)."""
    _registered[type_name] = forward


def load_plugin(path: Path) -> list[str]:
    """Run the plug-in file `path` and register its `LAYERS` dict; returns the types it adds."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"caffe_bn_merge_plugin_{path.stem}", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise VerifyError(f"{path}: no such layer plug-in file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the plug-in's own failure, reported on one line
        raise VerifyError(f"{path}: the layer plug-in failed to load: {type(err).__name__}: {err}") from err
    layers = getattr(module, "LAYERS", None)
    if not isinstance(layers, dict) or not all(isinstance(k, str) and callable(v) for k, v in layers.items()):
        raise VerifyError(f"{path}: a layer plug-in must define LAYERS = {{'Type': forward, ...}}")
    for type_name, forward in layers.items():
        register_layer(type_name, forward)
    return list(layers)


def _from_entry_points() -> dict[str, Forward]:
    global _entry_points
    if _entry_points is None:
        _entry_points = {}
        for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                _entry_points[point.name] = point.load()
            except Exception as err:  # a broken installed plug-in
                raise VerifyError(f"entry point {point.name} = {point.value} ({ENTRY_POINT_GROUP}): {err}") from err
    return _entry_points


def forward_for(node: LayerNode) -> Forward:
    """The function computing `node`'s type, or a VerifyError saying how to add one."""
    type_name = node.type
    found = _registered.get(type_name) or LAYERS.get(type_name) or _from_entry_points().get(type_name)
    if found is None:
        raise VerifyError(
            f"the reference engine has no layer type '{type_name}' (layer '{node.name}'); add one with "
            f"--layer-plugin FILE.py defining forward(layer, inputs, blobs) in LAYERS = {{'{type_name}': forward}}"
        )
    return found


class _ForkSchema(Schema):
    """Our schema plus fork fields under numbers ours leaves free: the binary form carries them into
    our NetParameter as unknown fields, and back into `layer_class` when a layer runs."""

    def parse(self, text: str, strict: bool) -> tuple[object, set[str]]:
        net = self.net_class()
        text_format.Parse(text, net, allow_unknown_field=not strict)
        return proto.NetParameter.FromString(net.SerializeToString()), set()


@cache
def fork_schema() -> Schema:
    """Our schema plus the fork fields the reference engine reads (text parse needs their names)."""
    file = descriptor_pb2.FileDescriptorProto()
    proto.LayerParameter.DESCRIPTOR.file.CopyToProto(file)
    file.name = "caffe_bn_merge_fork.proto"
    known = {m.name for m in file.message_type}
    for name, fields in _FORK_MESSAGES.items():
        if name in known:
            continue
        message = file.message_type.add(name=name)
        for field_name, number, kind, default in fields:
            field = message.field.add(name=field_name, number=number, type=kind, label=1)
            if default is not None:
                field.default_value = default
    messages = {m.name: m for m in file.message_type}
    layer_fields = {f.name for f in messages["LayerParameter"].field}
    for field_name, number in _FORK_LAYER_FIELDS:
        if field_name in layer_fields:
            continue
        type_name = "".join(part.title() for part in field_name.split("_")[:-1]) + "Parameter"
        messages["LayerParameter"].field.add(
            name=field_name,
            number=number,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
            label=1,
            type_name=f".caffe.{type_name}",
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    net, layer = (pool.FindMessageTypeByName(f"caffe.{n}") for n in ("NetParameter", "LayerParameter"))
    return _ForkSchema(message_factory.GetMessageClass(net), message_factory.GetMessageClass(layer))


def run_reference(
    model: Path, weights: Path, inputs: dict[str, np.ndarray], outputs: list[tuple[str, str]]
) -> list[np.ndarray]:
    """Values of `outputs` ((layer, top) pairs; an in-place top as that layer wrote it) for `inputs`,
    computed in float64 by the reference engine."""
    schema = fork_schema()
    net = read_net_text(Path(model), schema).net
    graph = build_graph(net)
    wanted = [_version(graph, layer, top) for layer, top in outputs]
    needed = _needed(graph, wanted)
    stored = read_weights(Path(weights)).layers
    values = _net_inputs(graph, inputs)
    readers = Counter(v for node in needed for v in node.bottoms) + Counter(wanted)
    for node in needed:
        ins = [values[v] for v in node.bottoms]
        outs = _run(node, ins, stored, inputs, schema.layer_class)
        for version, value in zip(node.tops, outs, strict=True):
            values[version] = value
        for version in node.bottoms:
            readers[version] -= 1
            if readers[version] == 0:
                del values[version]
    return [np.array(values[v], np.float64) for v in wanted]


def _version(graph: NetGraph, layer: str, top: str) -> BlobVersion:
    for node in graph.layers:
        if node.name == layer:
            if top not in node.param.top:
                raise VerifyError(f"layer '{layer}' does not write '{top}' (tops: {', '.join(node.param.top)})")
            return BlobVersion(top, node.index)
    raise VerifyError(f"no layer '{layer}' in the TEST-phase net")


def _needed(graph: NetGraph, wanted: list[BlobVersion]) -> list[LayerNode]:
    """The layers the wanted blob versions depend on, in net order."""
    keep: set[int] = set()
    stack = [v.producer for v in wanted]
    while stack:
        index = stack.pop()
        if index == NET_INPUT or index in keep:
            continue
        keep.add(index)
        stack.extend(v.producer for v in graph.by_index[index].bottoms)
    return [node for node in graph.layers if node.index in keep]


def _net_inputs(graph: NetGraph, inputs: dict[str, np.ndarray]) -> dict[BlobVersion, np.ndarray]:
    """Legacy `input:` blobs (Input layers are run as layers)."""
    return {v: _given(inputs, v.name) for v in graph.inputs if v.name in inputs}


def _given(inputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in inputs:
        raise VerifyError(f"no value given for the net input '{name}' (given: {', '.join(inputs) or 'none'})")
    return np.asarray(inputs[name], np.float64)


def _run(
    node: LayerNode, ins: list[np.ndarray], stored: dict, inputs: dict[str, np.ndarray], layer_class: Callable
) -> list[np.ndarray]:
    """One layer's tops."""
    if node.type == "Input":
        return [_given(inputs, top) for top in node.param.top]
    forward = forward_for(node)
    layer = layer_class.FromString(node.param.SerializeToString())
    blobs = [np.asarray(b, np.float64) for b in stored[node.name].blobs] if node.name in stored else []
    try:
        outs = list(forward(layer, ins, blobs))
    except MergeError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, ZeroDivisionError) as err:
        raise VerifyError(f"the reference engine cannot run layer '{node.name}' ({node.type}): {err}") from err
    if len(outs) != len(node.tops):
        raise VerifyError(f"layer '{node.name}' ({node.type}) gave {len(outs)} output(s) for {len(node.tops)} top(s)")
    return [np.asarray(out, np.float64) for out in outs]
