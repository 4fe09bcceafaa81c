"""The rules run in order, each planning on the net as the rules before it left it, and each
plan applied at once (`Rewrite`): the one place that sequences planning and rewriting."""

from collections.abc import Sequence

from ..graph import NetGraph
from ..io.read import Weights
from .norms import NORM_TYPES
from .plan import IDENTITY_TYPES, RULES, Action, Context, FoldPlan, Kept, Rule
from .reasons import Refusal
from .rewrite import Rewrite


def run_rules(
    net: object,
    graph: NetGraph,
    stored: Weights,
    rules: Sequence[Rule],
    flavour: str,
    conv_like: frozenset[str],
    frozen: frozenset[str],
) -> tuple[Rewrite, FoldPlan]:
    """Each rule plans on the net as the rules before it left it (`graph` is the input net's);
    identity repeats until done."""
    rewrite = Rewrite(net, dict(stored.layers))
    actions: list[Action] = []
    refusals: dict[str, list[Refusal]] = {}
    for rule in rules:
        while True:
            ctx = Context(rewrite.layers, flavour, conv_like, frozen, graph.duplicated)
            result = RULES[rule](graph, ctx)
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
