"""Deciding what folds where. The plan is a value: every decision is made here, nothing is changed.

Forward fold (the classic one):

    Before:  host -> v0 -> N1 -> v1 -> ... -> Nk -> vk      (N = BatchNorm / Scale / Bias)
    After:   host' -> vk                                     (host' computes N_k(...N_1(host)))

Conditions, checked for each N_j in turn (the chain stops at the first that fails):
  1. the host is a Convolution, Deconvolution or InnerProduct with one top and readable weights;
  2. v_{j-1} has exactly one reader, N_j, and is not a net output (nobody else sees the pre-fold value);
  3. N_j is a fixed per-channel affine map (BatchNorm with global statistics, Scale/Bias with one
     bottom, per channel on axis 1).
Every normalisation layer that is not folded gets a `Refusal` saying why.
"""

from dataclasses import dataclass

from .affine import ChannelAffine
from .caffe_io import Weights
from .graph import LayerNode, NetGraph
from .hosts import HOST_TYPES, Host, read_host
from .norms import NORM_TYPES, own_refusal, read_affine
from .reasons import Reason, Refusal


@dataclass(frozen=True)
class Fold:
    """Fold `chain` (layer names, in order) into `host`; the host then writes `top`."""

    host: Host
    chain: tuple[str, ...]
    affine: ChannelAffine
    top: str
    rule: str = "forward"


@dataclass(frozen=True)
class Kept:
    """A normalisation layer left in the net, and why."""

    layer: str
    type: str
    refusal: Refusal


@dataclass(frozen=True)
class FoldPlan:
    """All folds to apply and all normalisation layers left as they are."""

    folds: tuple[Fold, ...]
    kept: tuple[Kept, ...]

    @property
    def removed(self) -> set[str]:
        """Names of the layers the plan removes."""
        return {name for fold in self.folds for name in fold.chain}


def plan_folds(graph: NetGraph, weights: Weights) -> FoldPlan:
    """Find every forward fold in `graph`; explain every normalisation layer left over."""
    folds: list[Fold] = []
    refusals: dict[str, Refusal] = {}
    for node in graph.layers:
        if node.type in HOST_TYPES and _first_norm_reader(graph, node):
            fold = _forward_chain(graph, weights, node, refusals)
            if fold:
                folds.append(fold)
    folded = {name for fold in folds for name in fold.chain}
    kept = tuple(
        Kept(node.name, node.type, refusals.get(node.name) or _explain(graph, node))
        for node in graph.layers
        if node.type in NORM_TYPES and node.name not in folded
    )
    return FoldPlan(tuple(folds), kept)


def _first_norm_reader(graph: NetGraph, node: LayerNode) -> LayerNode | None:
    """The normalisation layer reading the host's output, if any does."""
    readers = [r for top in node.tops for r in graph.readers.get(top, [])]
    return next((r for r in readers if r.type in NORM_TYPES), None)


def _forward_chain(graph: NetGraph, weights: Weights, node: LayerNode, refusals: dict[str, Refusal]) -> Fold | None:
    """Grow the chain of normalisation layers after `node` as far as conditions 1-3 hold."""
    host = read_host(node.param, weights.layers.get(node.name))
    first = _first_norm_reader(graph, node)
    if isinstance(host, Refusal):
        refusals[first.name] = host
        return None
    version, chain, affine = node.tops[0], [], None
    while (reader := graph.sole_reader(version)) and reader.type in NORM_TYPES:
        step = read_affine(reader.param, weights.layers.get(reader.name), host.c_out, host.rank)
        if isinstance(step, Refusal):
            refusals[reader.name] = step
            break
        affine = step if affine is None else affine.then(step)
        chain.append(reader.name)
        version = reader.tops[0]
    if not chain:
        return None
    return Fold(host, tuple(chain), affine, version.name)


def _explain(graph: NetGraph, node: LayerNode) -> Refusal:
    """Why a normalisation layer that no chain reached cannot fold forward."""
    own = own_refusal(node.param)
    if own:
        return own
    version = node.bottoms[0]
    producer = graph.producer(version)
    if producer is None or producer.type == "Input":
        return Refusal(Reason.NET_INPUT, f"'{version.name}'")
    others = [r.name for r in graph.readers[version] if r is not node]
    if others:
        return Refusal(Reason.SHARED_INPUT, f"'{version.name}' is also read by " + ", ".join(f"'{n}'" for n in others))
    if producer.type in NORM_TYPES:
        return Refusal(Reason.BEHIND_KEPT, f"'{producer.name}'")
    host = _host_upstream(graph, producer)
    if host:
        return Refusal(Reason.NONLINEAR_BETWEEN, f"'{producer.name}' ({producer.type}) after '{host.name}'")
    return Refusal(Reason.NO_HOST, f"its input comes from '{producer.name}' ({producer.type})")


def _host_upstream(graph: NetGraph, node: LayerNode) -> LayerNode | None:
    """The host found by walking up single-input layers from `node`, if one is there."""
    seen = 0
    while node is not None and len(node.bottoms) == 1 and seen < len(graph.layers):
        node = graph.producer(node.bottoms[0])
        seen += 1
        if node is not None and node.type in HOST_TYPES:
            return node
    return None
