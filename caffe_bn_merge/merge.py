"""The whole job: load -> graph -> plan -> rewrite -> write, as one library call."""

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import caffe_io
from .errors import MismatchError, OutputError
from .graph import NetGraph, build_graph
from .hosts import HOST_TYPES, read_host
from .norms import NORM_TYPES
from .plan import FoldPlan, plan_folds
from .rewrite import apply_plan

log = logging.getLogger(__name__)


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
    *,
    write: bool = True,
) -> MergeResult:
    """Fold the BatchNorm/Scale layers of `model` + `weights`; write the merged pair unless `write` is False."""
    model, weights = Path(model), Path(weights)
    defaults = default_outputs(model, weights)
    output_model = Path(output_model or defaults[0])
    output_weights = Path(output_weights or defaults[1])
    net = caffe_io.read_net(model)
    stored = caffe_io.read_weights(weights)
    if write:
        _check_outputs((model, weights), (output_model, output_weights))
    graph = build_graph(net)
    _check_pairing(graph, stored, model, weights)
    plan = plan_folds(graph, stored)
    merged, edits = apply_plan(net, graph, plan)
    for fold in plan.folds:
        log.info("folded %s into '%s'", " + ".join(f"'{n}'" for n in fold.chain), fold.host.name)
    for kept in plan.kept:
        log.info("kept %s '%s': %s", kept.type, kept.layer, kept.refusal)
    if write:
        _write(merged, stored, edits, plan.removed, output_model, output_weights)
    return MergeResult(
        plan,
        Counter(layer.type for layer in net.layer),
        Counter(layer.type for layer in merged.layer),
        output_model if write else None,
        output_weights if write else None,
    )


def _check_outputs(inputs: tuple[Path, Path], outputs: tuple[Path, Path]) -> None:
    resolved = {p.resolve() for p in inputs}
    for out in outputs:
        if out.resolve() in resolved:
            raise OutputError(f"{out}: output path equals an input path; choose another output name")
        if not out.parent.is_dir():
            raise OutputError(f"{out}: folder {out.parent} does not exist")
    if outputs[0].resolve() == outputs[1].resolve():
        raise OutputError(f"{outputs[0]}: the output model and weights paths are the same")


def _check_pairing(graph: NetGraph, stored: caffe_io.Weights, model: Path, weights: Path) -> None:
    """Refuse a caffemodel that does not hold this prototxt's weights: one that shares no weighted
    layer with it, lacks normalisation layers' statistics, or has host blobs that do not fit."""
    weighted = [n for n in graph.layers if n.type in HOST_TYPES or (n.type in NORM_TYPES and len(n.bottoms) == 1)]
    present = [n for n in weighted if n.name in stored.layers]
    missing = [n.name for n in weighted if n.name not in stored.layers and (n.type in NORM_TYPES or not present)]
    if missing:
        listed = ", ".join(f"'{name}'" for name in missing[:3])
        raise MismatchError(
            f"{weights} has no weights for {len(missing)} of the {len(weighted)} weighted layers of {model} "
            f"({listed}{', ...' if len(missing) > 3 else ''}); are they from the same net?"
        )
    for node in present:
        if node.type in HOST_TYPES:
            read_host(node.param, stored.layers[node.name])  # raises on blob count or shape mismatch


def _write(
    merged: object, stored: caffe_io.Weights, edits: dict, removed: set[str], model: Path, weights: Path
) -> None:
    """Write the caffemodel, then the prototxt; never leave one without the other."""
    caffe_io.write_weights(stored, edits, removed, weights)
    try:
        caffe_io.write_net(merged, model)
    except BaseException:
        weights.unlink(missing_ok=True)
        raise
