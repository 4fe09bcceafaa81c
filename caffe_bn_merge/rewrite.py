"""Applying a FoldPlan: new host weights, folded layers removed, tops rewired. Nothing is decided here."""

import numpy as np

from . import proto
from .caffe_io import LayerEdit
from .fold_math import fold_forward
from .graph import NetGraph, build_graph
from .hosts import host_param
from .plan import Fold, FoldPlan


def apply_plan(net: object, graph: NetGraph, plan: FoldPlan) -> tuple[object, dict[str, LayerEdit]]:
    """The merged NetParameter and the caffemodel edits; `net` itself is left unchanged."""
    merged = proto.NetParameter()
    merged.CopyFrom(net)
    index_of = {node.name: node.index for node in graph.layers}
    edits: dict[str, LayerEdit] = {}
    for fold in plan.folds:
        edit = _host_edit(fold)
        layer = merged.layer[index_of[fold.host.name]]
        edit.update(layer)
        layer.top[0] = fold.top
        edits[fold.host.name] = edit
    removed = {index_of[name] for name in plan.removed}
    kept = [layer for i, layer in enumerate(merged.layer) if i not in removed]
    del merged.layer[:]
    merged.layer.extend(kept)
    build_graph(merged)  # the result must still be a well-formed net
    return merged, edits


def _host_edit(fold: Fold) -> LayerEdit:
    """The host's folded blobs, cast once to their stored dtype, in their stored shapes."""
    host = fold.host
    weights, bias = fold_forward(host.weights, host.bias, fold.affine, host.layout, host.groups)
    dtype = host.weights.dtype
    bias_shape = host.bias.shape if host.bias is not None else (host.c_out,)
    return LayerEdit((weights.astype(dtype), np.asarray(bias, dtype).reshape(bias_shape)), _take_bias)


def _take_bias(layer: object) -> None:
    """Give a host its bias and its own (untied) weights."""
    host_param(layer).bias_term = True
    for spec in layer.param:
        spec.ClearField("name")
