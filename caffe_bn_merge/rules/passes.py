"""The rules run in order, each planning on the net as the rules before it left it, and each
plan applied at once (`Rewrite`): the one place that sequences planning and rewriting."""

from collections.abc import Sequence

import numpy as np

from ..graph import NetGraph
from ..io.read import Weights
from ..net import FoldedChain, FoldedHost
from . import bn_variants
from .norms import NORM_TYPES
from .plan import IDENTITY_TYPES, RULES, Action, Context, FoldPlan, Kept, Rule
from .reasons import Refusal
from .replay import Round, record_round
from .rewrite import Rewrite


def run_rules(
    net: object,
    graph: NetGraph,
    stored: Weights,
    rules: Sequence[Rule],
    flavour: str,
    conv_like: frozenset[str],
    frozen: frozenset[str],
    assume_global_stats: bool = False,
    rounds: list[Round] | None = None,
) -> tuple[Rewrite, FoldPlan]:
    """Each rule plans on the net as the rules before it left it (`graph` is the input net's);
    identity repeats until done. `assume_global_stats`: see `Context`. Given a list, `rounds`
    receives each round's questions and actions (for a `replay.Recording`)."""
    rewrite = Rewrite(net, dict(stored.layers))
    actions: list[Action] = []
    refusals: dict[str, list[Refusal]] = {}
    for rule in rules:
        while True:
            asked = {} if rounds is not None else None
            ctx = Context(rewrite.layers, flavour, conv_like, frozen, graph.duplicated, assume_global_stats, asked)
            result = RULES[rule](graph, ctx)
            if rounds is not None:
                rounds.append(record_round(rule, ctx, result.actions))
            for name, refusal in result.refusals.items():
                refusals.setdefault(name, []).append(refusal)
            graph = rewrite.apply(graph, result.actions)
            actions += result.actions
            if rule is not Rule.IDENTITY or not result.actions:
                break
    changed = {a.target for a in actions if a.rule is Rule.STANDALONE} | {n for a in actions for n in a.removed}
    kept = tuple(
        Kept(node.name, node.type, _distinct(refusals[node.name]))
        for node in graph.layers
        if node.name not in changed and node.name in refusals and node.type in (*NORM_TYPES, *IDENTITY_TYPES)
    )
    reasons = {name: _distinct(found) for name, found in refusals.items()}
    return rewrite, FoldPlan(tuple(actions), kept, reasons, {layer.name: layer.type for layer in net.layer})


def _distinct(refusals: list[Refusal]) -> tuple[Refusal, ...]:
    return tuple(dict.fromkeys(refusals))


def folded_hosts(plan: FoldPlan, rewrite: Rewrite, net: object, flavour: str) -> tuple[FoldedHost, ...]:
    """Each host that took folds, as stored and as folded (nothing is computed here: the folded
    weights are made when read), with the chains it took and their BatchNorms' `var + eps`."""
    params = {layer.name: layer for layer in net.layer}
    hosts: dict[str, FoldedHost] = {}
    for action in plan.actions:
        if action.host is None:
            continue
        norms = [name for name in action.layers if plan.types[name] in ("BatchNorm", "BN")]
        found = {name: _variance_eps(params[name], rewrite.layers[name].blobs, flavour) for name in norms}
        variance_eps = {name: value for name, value in found.items() if value is not None}
        chain = FoldedChain(action.layers, str(action.rule), action.affine.scale, variance_eps)
        host, earlier = action.host, hosts.get(action.target)
        original = earlier.original if earlier else host.weights  # a second fold sees the first's weights
        chains = (*earlier.chains, chain) if earlier else (chain,)
        folded = rewrite.layers[host.name]
        hosts[host.name] = FoldedHost(host.name, host.layout, host.groups, host.c_out, original, folded, chains)
    return tuple(hosts.values())


def _variance_eps(layer: object, blobs: list[np.ndarray], flavour: str) -> np.ndarray | None:
    variant = bn_variants.detect(layer, blobs, flavour)  # detected before, when the chain was read
    return bn_variants.variance_eps(variant, layer, blobs)
