"""The net as a graph of blob versions.

Caffe resolves blob names in layer order and an in-place layer (top == bottom) writes a new
version of its blob. `NetGraph` names every version by (blob name, producing layer), so "who reads
this conv's output" has one exact answer even when BatchNorm and Scale run in place.
Layers excluded from the TEST phase (train-only layers) are not part of the graph. Layer names
may repeat (Caffe allows it, and converters do it): layers sharing a name are listed in
`duplicated`, since Caffe gives trained weights by name.
"""

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from .errors import InputError
from .io import proto

NET_INPUT = -1  # producer index of a net input blob


@dataclass(frozen=True)
class BlobVersion:
    """One value of a named blob: the one written by layer `producer` (NET_INPUT for net inputs)."""

    name: str
    producer: int


@dataclass(eq=False)
class LayerNode:
    """A layer taking part in the TEST-phase net, with the blob versions it reads and writes."""

    index: int
    param: object  # caffe LayerParameter, shared with the NetParameter (edits go through)
    bottoms: list[BlobVersion]
    tops: list[BlobVersion]

    @property
    def name(self) -> str:
        return self.param.name

    @property
    def type(self) -> str:
        return self.param.type


@dataclass
class NetGraph:
    """Producers and readers of every blob version of a net."""

    layers: list[LayerNode]
    readers: dict[BlobVersion, list[LayerNode]] = field(default_factory=lambda: defaultdict(list))
    inputs: list[BlobVersion] = field(default_factory=list)
    outputs: list[BlobVersion] = field(default_factory=list)
    pinned: set[str] = field(default_factory=set)  # names read by layers outside the TEST net
    duplicated: frozenset[str] = frozenset()  # layer names several layers share (any phase)
    _by_index: dict[int, LayerNode] = field(default_factory=dict, repr=False)
    _writers: dict[str, list[int]] | None = field(default=None, repr=False)

    def producer(self, version: BlobVersion) -> LayerNode | None:
        """The layer that wrote `version`, or None for a net input."""
        return self.by_index.get(version.producer)

    @property
    def by_index(self) -> dict[int, LayerNode]:
        """Layers by their index in the NetParameter."""
        if len(self._by_index) != len(self.layers):
            self._by_index = {node.index: node for node in self.layers}
        return self._by_index

    def writers(self, blob: str) -> list[int]:
        """Indices of the layers writing a blob named `blob`, in net order."""
        if self._writers is None:
            self._writers = defaultdict(list)
            for node in self.layers:
                for top in node.tops:
                    self._writers[top.name].append(node.index)
        return self._writers.get(blob, [])

    def sole_reader(self, version: BlobVersion) -> LayerNode | None:
        """The only layer reading `version`, if exactly one does, it is not a net output and no
        layer outside the TEST net reads its name."""
        readers = self.readers.get(version, [])
        if len(readers) != 1 or version in self.outputs or version.name in self.pinned:
            return None
        return readers[0]


def build_graph(net: object) -> NetGraph:
    """Resolve every bottom of the TEST-phase layers of `net` (under the net's own `state`: its
    level and stages) to the version it reads. Blob names that layers of other phases read are
    `pinned`: no rule may make them disappear or change who writes them."""
    current: dict[str, BlobVersion] = {}
    graph = NetGraph(layers=[])
    for name in net.input:
        current[name] = BlobVersion(name, NET_INPUT)
        graph.inputs.append(current[name])
    consumed: set[BlobVersion] = set()
    left_out: set[str] = set()
    state = inference_state(net)
    for index, layer in enumerate(net.layer):
        if not included(layer, state):
            left_out.update(layer.top)
            graph.pinned.update(layer.bottom)
            continue
        bottoms = [_resolve(current, blob, layer, left_out) for blob in layer.bottom]
        node = LayerNode(index, layer, bottoms, [BlobVersion(top, index) for top in layer.top])
        _check_single_producer(node, current)
        for version in bottoms:
            graph.readers[version].append(node)
            consumed.add(version)
        for version in node.tops:
            current[version.name] = version
        graph.layers.append(node)
    graph.outputs = [v for v in current.values() if v not in consumed and v.producer != NET_INPUT]
    graph.duplicated = frozenset(name for name, n in Counter(layer.name for layer in net.layer).items() if n > 1)
    return graph


def _check_single_producer(node: LayerNode, current: dict[str, BlobVersion]) -> None:
    """Caffe's rule: a blob name is written anew only in place (top i == bottom i)."""
    for i, top in enumerate(node.param.top):
        in_place = i < len(node.param.bottom) and node.param.bottom[i] == top
        if top in current and not in_place:
            raise InputError(
                f"layer '{node.name}' writes blob '{top}', which another layer already produced; Caffe "
                "allows that only in place (top = bottom): rename the top"
            )


def _resolve(current: dict[str, BlobVersion], blob: str, layer: object, train_only: set[str]) -> BlobVersion:
    if blob in current:
        return current[blob]
    if blob in train_only:
        raise InputError(
            f"layer '{layer.name}' reads blob '{blob}', which only TRAIN-phase layers produce: "
            "this is a train prototxt; pass the deploy (or train_val / test) prototxt"
        )
    raise InputError(f"layer '{layer.name}' reads blob '{blob}' before any layer produces it; fix the prototxt")


def inference_state(net: object) -> object:
    """The state a deploy runs in: phase TEST, with the level and stages the net itself declares."""
    return proto.NetState(phase=proto.TEST, level=net.state.level, stage=net.state.stage)


def included(layer: object, state: object) -> bool:
    """Caffe's include/exclude rules for `state`."""
    if layer.include:
        return any(_meets(rule, state) for rule in layer.include)
    return not any(_meets(rule, state) for rule in layer.exclude)


def _meets(rule: object, state: object) -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if not set(rule.stage) <= set(state.stage):
        return False
    return not set(rule.not_stage) & set(state.stage)


def input_shapes(net: object) -> dict[str, tuple[int, ...]]:
    """Shapes of the net's inputs, from `input_shape`, `input_dim` or Input layers (`()` for an
    Input layer that declares none)."""
    shapes: dict[str, tuple[int, ...]] = {}
    state = inference_state(net)
    for i, name in enumerate(net.input):
        if i < len(net.input_shape):
            shapes[name] = tuple(net.input_shape[i].dim)
        elif net.input_dim:
            shapes[name] = tuple(net.input_dim[4 * i : 4 * i + 4])
    for layer in net.layer:
        if layer.type == "Input" and included(layer, state):
            declared = layer.input_param.shape
            for i, top in enumerate(layer.top):
                shapes[top] = tuple(declared[min(i, len(declared) - 1)].dim) if declared else ()
    return shapes
