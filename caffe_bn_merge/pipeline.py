"""The whole job as one library call, `merge`: read (`io.read`) -> graph -> rules (`rules.passes`)
-> emit (`io.emit`)."""

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .defaults import MAX_PROTOTXT_MB
from .errors import MismatchError
from .graph import NetGraph, build_graph, included, inference_state
from .io import emit, read
from .io.user_schema import compile_schema
from .rules.hosts import DEFAULT_CONV_LIKE, is_host_type, read_host
from .rules.norms import NORM_TYPES, negative_variance
from .rules.passes import run_rules
from .rules.plan import FoldPlan, Rule
from .rules.rewrite import Rewrite

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
    max_prototxt_mb: int = MAX_PROTOTXT_MB  # a larger prototxt is refused

    def rules(self) -> list[Rule]:
        wanted = {Rule.IDENTITY: self.identity, Rule.FORWARD: True, Rule.BACKWARD: self.backward}
        wanted[Rule.STANDALONE] = self.standalone
        return [rule for rule, on in wanted.items() if on]


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
    net_text = read.read_net_text(model, schema, options.max_prototxt_mb)
    net = net_text.net
    with read.read_weights(weights) as stored:  # the caffemodel stays as read until the block ends
        if write:
            emit.check_outputs((model, weights), (output_model, output_weights), overwrite)
        graph = build_graph(net)
        _check_pairing(graph, stored, model, weights, options.conv_like)
        _log_input(net_text)
        on_step("folding")
        rewrite, plan = run_rules(
            net, graph, stored, options.rules(), options.bn_flavour, frozenset(options.conv_like), net_text.frozen
        )
        for action in plan.actions:
            into = f" -> {action.target}" if action.target else ""
            log.info("%s: %s%s", action.rule, " + ".join(action.layers), into)
        for kept in plan.kept:
            log.info("kept %s '%s': %s", kept.type, kept.layer, kept)
        _warn_negative_variance(net, stored, plan, options.bn_flavour)
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


def _warn_negative_variance(net: object, stored: read.Weights, plan: FoldPlan, flavour: str) -> None:
    """Warn once per folded BatchNorm whose stored variance has negative channels."""
    folded = {name for action in plan.actions for name in action.layers}
    for layer in net.layer:
        negative = negative_variance(layer, stored.layers.get(layer.name), flavour) if layer.name in folded else 0
        if negative:
            log.warning(
                "%s '%s': %d channel(s) have negative variance; folded as Caffe computes them",
                layer.type,
                layer.name,
                negative,
            )


def _check_pairing(
    graph: NetGraph, stored: read.Weights, model: Path, weights: Path, conv_like: tuple[str, ...]
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
    net_text: object, rewrite: Rewrite, stored: read.Weights, removed: set[str], model: Path, weights: Path
) -> None:
    """Write the caffemodel, then the prototxt; never leave one without the other."""
    emit.write_weights(stored, rewrite.edits, removed, weights)
    try:
        emit.write_net_text(net_text, rewrite.net, rewrite.origin, model)
    except BaseException:
        weights.unlink(missing_ok=True)
        raise
