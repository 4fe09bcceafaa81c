"""What a merge did, for people and for programs: the per-layer decision log, the before/after
table, the verify table (rich, 100 columns at most) and the JSON report (`report_schema.json`)."""

import json
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from . import __version__
from .pipeline import MergeResult
from .rules.plan import Rule
from .rules.reasons import Refusal
from .verification.compare import VerifyResult

SCHEMA_VERSION = 1
_ACTION_OF_RULE = {Rule.FORWARD: "folded", Rule.BACKWARD: "folded", Rule.IDENTITY: "removed"}


@dataclass(frozen=True)
class Decision:
    """What happened to one BatchNorm / Scale / Bias / Power / identity layer."""

    layer: str
    type: str
    action: str  # folded | collapsed | merged | removed | kept
    rule: str | None  # the rule that acted, None when kept
    into: str | None  # the layer it went into (host, or the Scale a chain became)
    reasons: tuple[Refusal, ...]  # why earlier rules (or all, when kept) could not take it


def decisions(result: MergeResult) -> list[Decision]:
    """One decision per candidate layer, in the input net's layer order."""
    plan = result.plan
    found: dict[str, Decision] = {}
    for action in plan.actions:
        for i, name in enumerate(action.layers):
            kind = _ACTION_OF_RULE.get(action.rule) or ("collapsed" if i == 0 else "merged")
            into = action.target or None
            found[name] = Decision(name, plan.types[name], kind, str(action.rule), into, plan.reasons.get(name, ()))
    for kept in plan.kept:
        found[kept.layer] = Decision(kept.layer, kept.type, "kept", None, None, kept.refusals)
    return [found[name] for name in plan.types if name in found]


def build_report(result: MergeResult, model: str, weights: str, checked: VerifyResult | None) -> dict[str, Any]:
    """The JSON report (see report_schema.json, README 'JSON report')."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": f"caffe-bn-merge {__version__}",
        "inputs": {"model": model, "weights": weights},
        "outputs": None
        if result.output_model is None
        else {"model": str(result.output_model), "weights": str(result.output_weights)},
        "layers": {"before": dict(result.layers_before), "after": dict(result.layers_after)},
        "decisions": [_decision_json(d) for d in decisions(result)],
        "verify": None if checked is None else _verify_json(checked),
    }


def _decision_json(decision: Decision) -> dict[str, Any]:
    return {
        "layer": decision.layer,
        "type": decision.type,
        "action": decision.action,
        "rule": decision.rule,
        "into": decision.into,
        "reasons": [{"code": r.reason.code, "text": str(r)} for r in decision.reasons],
    }


def _verify_json(checked: VerifyResult) -> dict[str, Any]:
    return {
        "backend": checked.backend,
        "passed_over": list(checked.passed_over),
        "tolerance": checked.tolerance,
        "inputs": checked.inputs,
        "passed": checked.passed,
        "max_relative_error": checked.max_relative,
        "blobs": [
            {
                "blob": e.blob,
                "max_abs_error": e.max_abs,
                "scale": e.scale,
                "relative_error": e.relative,
                "gating": e.gating,
            }
            for e in checked.errors
        ],
    }


def report_schema() -> dict[str, Any]:
    """The JSON Schema the report follows."""
    return json.loads(files(__package__).joinpath("report_schema.json").read_text())


def counts_table(result: MergeResult) -> "Table":  # noqa: F821 (rich is imported lazily)
    """Layer counts by type, before and after, for the types that changed (then a total)."""
    from rich.table import Table

    table = Table(title="layers", title_justify="left")
    for column in ("type", "before", "after"):
        table.add_column(column, justify="left" if column == "type" else "right")
    before, after = result.layers_before, result.layers_after
    for type_ in sorted(set(before) | set(after)):
        if before[type_] != after[type_]:
            table.add_row(type_, str(before[type_]), str(after[type_]))
    table.add_row("total", str(sum(before.values())), str(sum(after.values())), style="bold")
    return table


def decisions_table(result: MergeResult, everything: bool) -> "Table":  # noqa: F821
    """The decision log; without `everything`, only the layers that were not folded away."""
    from rich.table import Table

    table = Table(title="decisions", title_justify="left")
    for column, width in (("layer", 30), ("type", 9), ("decision", 30), ("why", 40)):
        table.add_column(column, max_width=width, overflow="fold")
    for d in decisions(result):
        if everything or d.action in ("kept", "collapsed"):
            what = d.action if d.into is None or d.action == "collapsed" else f"{d.action} into {d.into}"
            table.add_row(d.layer, d.type, what + (f" ({d.rule})" if d.rule else ""), "; ".join(map(str, d.reasons)))
    return table


def verify_table(checked: VerifyResult) -> "Table":  # noqa: F821
    """Per-blob errors; informational rows (after Softmax / DetectionOutput) are marked."""
    from rich.table import Table

    verdict = "passed" if checked.passed else "FAILED"
    title = f"verify on {checked.backend}: {verdict} (max relative error {checked.max_relative:.2e}"
    title += f", tolerance {checked.tolerance:g})"
    caption = f"inputs: {checked.inputs}" + "".join(f"\nnot run on {why}" for why in checked.passed_over)
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for column in ("blob", "max abs", "scale", "relative", ""):
        table.add_column(column, justify="left" if column in ("blob", "") else "right", max_width=44, overflow="fold")
    for e in checked.errors:
        note = "" if e.gating else "info only"
        table.add_row(e.blob, f"{e.max_abs:.3g}", f"{e.scale:.3g}", f"{e.relative:.2e}", note)
    return table
