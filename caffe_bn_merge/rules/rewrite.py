"""Applying a rule's actions: new blobs, rewired bottoms and tops, removed layers. Nothing is
decided here; every change was planned (`plan`)."""

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from ..graph import NetGraph, build_graph
from ..io import proto
from ..maths.fold_math import ScaledRows, fold_backward, fold_forward_lazy
from ..net import FoldedLayer, LayerEdit, WeightLayer
from .hosts import Host, host_param
from .plan import Action, Rule


@dataclass
class Rewrite:
    """The net as rewritten so far, and the caffemodel edits that go with it."""

    net: object
    layers: dict[str, WeightLayer]  # the caffemodel's layers as they are after the edits
    edits: dict[str, LayerEdit] = field(default_factory=dict)
    origin: list[int] = field(default_factory=list)  # for each layer now, its index in the input net

    def __post_init__(self) -> None:
        self.origin = self.origin or list(range(len(self.net.layer)))

    def apply(self, graph: NetGraph, actions: list[Action]) -> NetGraph:
        """Apply `actions`, all planned on `graph` (the graph of `self.net`); return the graph of
        the new net, which also checks that it is well formed."""
        if not actions:
            return graph
        self.edit_weights(actions)
        net = proto.NetParameter()
        net.CopyFrom(self.net)
        index_of = {node.name: node.index for node in graph.layers}
        for action in actions:
            if action.rule in _PARAM_EDITS:
                _PARAM_EDITS[action.rule](net.layer[index_of[action.target]])
            for rewire in action.bottoms:
                net.layer[rewire.layer].bottom[rewire.slot] = rewire.blob
            for rewire in action.tops:
                net.layer[rewire.layer].top[rewire.slot] = rewire.blob
        gone = {index_of[name] for action in actions for name in action.removed}
        kept = [layer for i, layer in enumerate(net.layer) if i not in gone]
        del net.layer[:]
        net.layer.extend(kept)
        self.origin = [origin for i, origin in enumerate(self.origin) if i not in gone]
        new_graph = build_graph(net)  # every stage must leave a well-formed net
        self.net = net
        return new_graph

    def edit_weights(self, actions: list[Action]) -> None:
        """Record the new blobs of `actions` (planned on the layers as they are now), in order: the
        caffemodel's half of `apply`, all a replayed plan needs (`replay`)."""
        for action in actions:
            if action.rule in _WEIGHT_EDITS:
                _WEIGHT_EDITS[action.rule](self, action)

    def edit(
        self, name: str, make_blobs: Callable[[], tuple[np.ndarray, ...]], update: Callable[[object], None]
    ) -> None:
        """Record how to make layer `name`'s new blobs and its parameter change (composed with
        earlier ones). The blobs are made once, when first written or read by a later rule (folded
        rows stay lazy `ScaledRows`: what is kept is views of the stored weights and the scales)."""
        make_blobs = cache(make_blobs)
        earlier = self.edits.get(name)
        if earlier is not None:
            update = _compose(earlier.update, update)
        self.edits[name] = LayerEdit(make_blobs, update)
        self.layers[name] = FoldedLayer(name, make_blobs)


def _compose(first: Callable[[object], None], second: Callable[[object], None]) -> Callable[[object], None]:
    def both(layer: object) -> None:
        first(layer)
        second(layer)

    return both


def _fold_host(rewrite: Rewrite, action: Action) -> None:
    host, affine = action.host, action.affine

    def fold() -> tuple[np.ndarray | ScaledRows, np.ndarray]:
        args = (host.weights, host.bias, affine, host.layout, host.groups)
        if action.rule is Rule.FORWARD:
            return _cast(host, *fold_forward_lazy(*args, _dtype(host)))
        return _cast(host, *fold_backward(*args, host.c_out))

    rewrite.edit(host.name, fold, _take_bias)


def _dtype(host: Host) -> np.dtype:
    """The dtype folded blobs are stored in: the host's, but float32 for float16 hosts (rounding
    folded values to float16 again would add far more than float32 noise)."""
    return np.dtype(np.float32) if host.weights.dtype == np.float16 else host.weights.dtype


def _cast(host: Host, weights: np.ndarray | ScaledRows, bias: np.ndarray) -> tuple[np.ndarray | ScaledRows, np.ndarray]:
    """Cast once to the stored dtype (no copy when already there, and `ScaledRows` are made in
    it), in the stored shapes."""
    dtype = _dtype(host)
    bias_shape = host.bias.shape if host.bias is not None else (host.c_out,)
    if isinstance(weights, np.ndarray):
        weights = weights.astype(dtype, copy=False)
    return weights, np.asarray(bias, dtype).reshape(bias_shape)


def _take_bias(layer: object) -> None:
    """Give a host its bias and its own (untied) weights."""
    host_param(layer).bias_term = True
    for spec in layer.param:
        spec.ClearField("name")


def _make_scale(rewrite: Rewrite, action: Action) -> None:
    first = action.layers[0]
    stored = [b for name in action.layers if name in rewrite.layers for b in rewrite.layers[name].blobs]
    dtype = stored[0].dtype if stored and stored[0].dtype != np.float16 else np.dtype(np.float32)
    blobs = (action.affine.scale.astype(dtype), action.affine.shift.astype(dtype))
    rewrite.edit(first, lambda: blobs, _become_scale)


def _become_scale(layer: object) -> None:
    """Turn a BatchNorm / Scale / Bias / Power layer into a per-channel Scale with bias."""
    layer.type = "Scale"
    for name in ("batch_norm_param", "bn_param", "bias_param", "power_param", "scale_param"):
        layer.ClearField(name)
    layer.scale_param.bias_term = True
    del layer.param[:]


# What each rule changes in the caffemodel (the blobs, and the layer parameters of its copy of the
# layer) and in the net (the same parameter change); identity removals only rewire and remove.
_WEIGHT_EDITS = {Rule.FORWARD: _fold_host, Rule.BACKWARD: _fold_host, Rule.STANDALONE: _make_scale}
_PARAM_EDITS = {Rule.FORWARD: _take_bias, Rule.BACKWARD: _take_bias, Rule.STANDALONE: _become_scale}
