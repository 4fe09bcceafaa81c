"""The whole job: load -> graph -> plan -> rewrite (rule by rule) -> write, as one library call."""

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import caffe_io
from .errors import MismatchError, OutputError
from .graph import NetGraph, build_graph, included, inference_state
from .hosts import DEFAULT_CONV_LIKE, is_host_type, read_host
from .norms import NORM_TYPES
from .plan import IDENTITY_TYPES, RULES, Action, Context, Rule
from .reasons import Refusal
from .rewrite import Rewrite
from .user_schema import compile_schema

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeOptions:
    """Which rules run besides the classic forward fold, and how to read forks' nets."""

    identity: bool = True  # remove Dropout, Split and exact identities
    backward: bool = True  # fold a chain into the layer reading it
    standalone: bool = True  # merge a chain that folds nowhere into one Scale
    bn_flavour: str = "auto"  # BatchNorm layout: auto or one of bn_variants.VARIANTS
    conv_like: tuple[str, ...] = DEFAULT_CONV_LIKE  # layer types that are Convolutions under another name
    caffe_proto: Path | None = None  # the fork's caffe.proto, to read its prototxt fields by name

    def rules(self) -> list[Rule]:
        wanted = {Rule.IDENTITY: self.identity, Rule.FORWARD: True, Rule.BACKWARD: self.backward}
        wanted[Rule.STANDALONE] = self.standalone
        return [rule for rule, on in wanted.items() if on]


@dataclass(frozen=True)
class Kept:
    """A BatchNorm / Scale / Bias / Power (or identity) layer left as it was, and why."""

    layer: str
    type: str
    refusals: tuple[Refusal, ...]

    @property
    def refusal(self) -> Refusal:
        """The main reason: the first rule's."""
        return self.refusals[0]

    def __str__(self) -> str:
        return "; ".join(str(r) for r in self.refusals)


@dataclass(frozen=True)
class FoldPlan:
    """Every action applied, in order, every candidate layer left as it was, and for every layer
    any rule refused, its reasons (a collapsed chain keeps the reasons it could not fold)."""

    actions: tuple[Action, ...]
    kept: tuple[Kept, ...]
    reasons: dict[str, tuple[Refusal, ...]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)  # every layer of the input net, in order

    @property
    def removed(self) -> set[str]:
        """Names of the layers taken out of the net."""
        return {name for action in self.actions for name in action.removed}

    def by_rule(self, rule: Rule) -> list[Action]:
        return [a for a in self.actions if a.rule is rule]


@dataclass(frozen=True)
class MergeResult:
    """What a merge did: the plan it applied, layer counts by type, and where it wrote."""

    plan: FoldPlan
    layers_before: Counter[str]
    layers_after: Counter[str]
    output_model: Path | None
    output_weights: Path | None


def default_outputs(model: Path, weights: Path) -> tuple[Path, Path]:
    """`<stem>_merged<suffix>` next to each input."""
    return (
        model.with_name(f"{model.stem}_merged{model.suffix}"),
        weights.with_name(f"{weights.stem}_merged{weights.suffix}"),
    )


def merge(
    model: Path,
    weights: Path,
    output_model: Path | None = None,
    output_weights: Path | None = None,
    options: MergeOptions = MergeOptions(),  # frozen, so one shared default is safe
    *,
    write: bool = True,
    overwrite: bool = False,
    on_step: Callable[[str], None] = lambda step: None,
) -> MergeResult:
    """Fold the BatchNorm/Scale layers of `model` + `weights`; write the merged pair unless `write`
    is False, replacing existing output files only when `overwrite`. `on_step` hears the name of
    each step as it starts (for progress displays)."""
    model, weights = Path(model), Path(weights)
    defaults = default_outputs(model, weights)
    output_model = Path(output_model or defaults[0])
    output_weights = Path(output_weights or defaults[1])
    on_step("reading")
    schema = compile_schema(options.caffe_proto) if options.caffe_proto else None
    net_text = caffe_io.read_net_text(model, schema)
    net = net_text.net
    stored = caffe_io.read_weights(weights)
    if write:
        _check_outputs((model, weights), (output_model, output_weights), overwrite)
    graph = build_graph(net)
    _check_pairing(graph, stored, model, weights, options.conv_like)
    _log_input(net_text)
    on_step("folding")
    rewrite, plan = _run_rules(net, graph, stored, options, net_text.frozen)
    for action in plan.actions:
        log.info("%s: %s%s", action.rule, " + ".join(action.layers), f" -> {action.target}" if action.target else "")
    for kept in plan.kept:
        log.info("kept %s '%s': %s", kept.type, kept.layer, kept)
    if write:
        on_step("writing")
        dropped = plan.removed & set(stored.layers)
        _write(net_text, rewrite, stored, dropped, output_model, output_weights)
    return MergeResult(
        plan,
        Counter(layer.type for layer in net.layer),
        Counter(layer.type for layer in rewrite.net.layer),
        output_model if write else None,
        output_weights if write else None,
    )


def _log_input(net_text: object) -> None:
    if net_text.blocks is None:
        log.warning("the prototxt is written anew (V1 `layers` upgraded, or its layout was not followed)")
    if net_text.frozen:
        names = ", ".join(sorted(net_text.frozen)[:3])
        log.warning(
            "%d layer(s) use fields our schema does not know (%s ...): kept exactly as written; "
            "--caffe-proto with the fork's caffe.proto lets them fold",
            len(net_text.frozen),
            names,
        )
    state = inference_state(net_text.net)
    other = sum(1 for layer in net_text.net.layer if not included(layer, state))
    if other:
        log.warning("%d layer(s) outside the TEST phase kept as they are; folding follows the TEST phase", other)


def _run_rules(
    net: object, graph: NetGraph, stored: caffe_io.Weights, options: MergeOptions, frozen: frozenset[str]
) -> tuple[Rewrite, FoldPlan]:
    """Each rule plans on the net as the rules before it left it (`graph` is the input net's);
    identity repeats until done."""
    rewrite = Rewrite(net, dict(stored.layers))
    actions: list[Action] = []
    refusals: dict[str, list[Refusal]] = {}
    for rule in options.rules():
        while True:
            ctx = Context(rewrite.layers, options.bn_flavour, frozenset(options.conv_like), frozen)
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


def _check_outputs(inputs: tuple[Path, Path], outputs: tuple[Path, Path], overwrite: bool) -> None:
    resolved = {p.resolve() for p in inputs}
    for out in outputs:
        if out.resolve() in resolved:
            raise OutputError(f"{out}: output path equals an input path; choose another output name")
        if not out.parent.is_dir():
            raise OutputError(f"{out}: folder {out.parent} does not exist")
        if out.exists() and not overwrite:
            raise OutputError(f"{out}: exists already; add --force to replace it")
    if outputs[0].resolve() == outputs[1].resolve():
        raise OutputError(f"{outputs[0]}: the output model and weights paths are the same")


def _check_pairing(
    graph: NetGraph, stored: caffe_io.Weights, model: Path, weights: Path, conv_like: tuple[str, ...]
) -> None:
    """Refuse a caffemodel that does not hold this prototxt's weights: host blobs that do not fit,
    missing statistics, or no weighted layer in common at all; say so when it looks merged."""
    hosts = [n for n in graph.layers if is_host_type(n.type, conv_like)]
    norms = [n for n in graph.layers if n.type in NORM_TYPES and n.type != "Power" and len(n.bottoms) == 1]
    missing_hosts = [n.name for n in hosts if n.name not in stored.layers]
    missing_norms = [n.name for n in norms if n.name not in stored.layers]
    if missing_norms and hosts and not missing_hosts:
        raise MismatchError(
            f"{weights} has no BatchNorm/Scale weights for {len(missing_norms)} layers of {model} "
            f"('{missing_norms[0]}', ...): it looks already merged; use it with its merged prototxt"
        )
    missing = missing_norms + (missing_hosts if len(missing_hosts) == len(hosts) else [])
    if missing:
        listed = ", ".join(f"'{name}'" for name in missing[:3])
        raise MismatchError(
            f"{weights} has no weights for {len(missing)} of the {len(hosts) + len(norms)} weighted layers "
            f"of {model} ({listed}{', ...' if len(missing) > 3 else ''}); are they from the same net?"
        )
    for node in hosts:
        if node.name in stored.layers:
            read_host(node.param, stored.layers[node.name])  # raises on blob count or shape mismatch


def _write(
    net_text: object, rewrite: Rewrite, stored: caffe_io.Weights, removed: set[str], model: Path, weights: Path
) -> None:
    """Write the caffemodel, then the prototxt; never leave one without the other."""
    caffe_io.write_weights(stored, rewrite.edits, removed, weights)
    try:
        caffe_io.write_net_text(net_text, rewrite.net, rewrite.origin, model)
    except BaseException:
        weights.unlink(missing_ok=True)
        raise
