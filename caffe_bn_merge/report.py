"""What a merge did, for people and for programs: the per-layer decision log, the before/after
table, the verify table (rich, fitted to a given width, 80 columns or more), the benchmark and int8
readiness tables (80 columns) and the JSON report (`report_schema.json`)."""

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from . import __version__
from .defaults import TABLE_WIDTH
from .fitting import fold_name
from .maths import quant
from .maths.quant import HostReadiness, Int8Error
from .pipeline import MergeResult
from .rules.plan import Rule
from .rules.reasons import Refusal
from .verification.benchmark import BenchmarkResult, Spread
from .verification.compare import VerifyResult

SCHEMA_VERSION = 1
_ACTION_OF_RULE = {Rule.FORWARD: "folded", Rule.BACKWARD: "folded", Rule.IDENTITY: "removed"}
_WHY = {  # why a layer went where it went, by action and rule
    ("removed", "identity"): "computes the identity at inference",
    ("folded", "forward"): "a fixed affine map right after {into}",
    ("folded", "backward"): "a fixed affine map read only by {into}",
    ("collapsed", "standalone"): "folds into no layer: its chain becomes this one Scale",
    ("merged", "standalone"): "folds into no layer: merged into its chain's Scale {into}",
}


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


def build_report(
    result: MergeResult,
    model: str,
    weights: str,
    checked: VerifyResult | None,
    benchmark: BenchmarkResult | None = None,
    readiness: list[HostReadiness] | None = None,
    warnings: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The JSON report (see report_schema.json, README 'JSON report'); `warnings` replaces the
    merge's own (`result.warnings`), e.g. with those of the whole run."""
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
        "benchmark": None if benchmark is None else _benchmark_json(benchmark),
        "quantization": None if readiness is None else _quant_json(readiness),
        "warnings": list(result.warnings if warnings is None else warnings),
        "assume_global_stats": result.assume_global_stats,
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
        "max_relative_error": _finite(checked.max_relative),
        "blobs": [
            {
                "blob": e.blob,
                "max_abs_error": _finite(e.max_abs),
                "scale": _finite(e.scale),
                "relative_error": _finite(e.relative),
                "gating": e.gating,
            }
            for e in checked.errors
        ],
    }


def _spread_json(spread: Spread) -> dict[str, float]:
    return {"median": spread.median, "q1": spread.q1, "q3": spread.q3, "min": spread.low, "max": spread.high}


def _benchmark_json(bench: BenchmarkResult) -> dict[str, Any]:
    return {
        "backend": bench.backend,
        "threads": bench.threads,
        "rounds": bench.rounds,
        "warmup": bench.warmup,
        "original_seconds": _spread_json(bench.times("original")),
        "merged_seconds": _spread_json(bench.times("merged")),
        "ratio": _spread_json(bench.ratio),
    }


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity: such a value (an exact SQNR, a non-finite verify error) is null."""
    return value if math.isfinite(value) else None


def _int8_json(error: Int8Error) -> dict[str, float | None]:
    return {"sqnr_db": _finite(error.sqnr_db), "relative_rms": error.relative_rms}


def _quant_json(readiness: list[HostReadiness]) -> dict[str, Any]:
    return {
        "sqnr_drop_threshold_db": quant.SQNR_DROP_DB,
        "tiny_variance_ratio": quant.TINY_VARIANCE,
        "flagged": sum(h.flagged for h in readiness),
        "hosts": [
            {
                "host": h.host,
                "layers": list(h.layers),
                "backward": h.backward,
                "channel_range_before": h.ranges_before.tolist(),
                "channel_range_after": h.ranges_after.tolist(),
                "range_ratio_before": _finite(h.ratio_before),
                "range_ratio_after": _finite(h.ratio_after),
                "int8_per_tensor_before": _int8_json(h.tensor_before),
                "int8_per_tensor_after": _int8_json(h.tensor_after),
                "int8_per_channel_after": _int8_json(h.channel_after),
                "sqnr_drop_db": _finite(h.sqnr_drop_db),
                "flagged": h.flagged,
                "advice": h.advice() or None,
                "constant_channels": {k: list(v) for k, v in h.constant_channels.items()},
                "tiny_variance_channels": {k: list(v) for k, v in h.tiny_variance_channels.items()},
            }
            for h in readiness
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


def decisions_table(result: MergeResult, everything: bool, width: int = TABLE_WIDTH) -> "Table":  # noqa: F821
    """The decision log, fitted to `width` columns (layer names broken only after a separator);
    without `everything`, only the layers that were not folded away."""
    from rich.table import Table

    names = max(12, width // 4)
    table = Table(title="decisions", title_justify="left")
    table.add_column("layer", no_wrap=True)
    table.add_column("type", no_wrap=True)
    for column in ("decision", "why"):
        table.add_column(column, overflow="fold")
    for d in decisions(result):
        if everything or d.action in ("kept", "collapsed"):
            what = d.action if d.into is None or d.action == "collapsed" else f"{d.action} into {d.into}"
            table.add_row(fold_name(d.layer, names), d.type, what + (f" ({d.rule})" if d.rule else ""), why(d))
    return table


def why(decision: Decision) -> str:
    """Why a layer went where it did: the rule's reason, then why earlier rules could not take it."""
    reasons = [str(r) for r in decision.reasons]
    if decision.action != "kept":
        reasons.insert(0, _WHY[decision.action, decision.rule].format(into=decision.into))
    return "; ".join(reasons)


def verify_table(checked: VerifyResult, width: int = TABLE_WIDTH) -> "Table":  # noqa: F821
    """Per-blob errors, fitted to `width` columns; informational rows (after Softmax /
    DetectionOutput) are marked in the `role` column. (The inputs, which may be paths, are for a
    line of their own: `checked.inputs`.)"""
    from rich.table import Table

    verdict = "passed" if checked.passed else "FAILED"
    title = f"verify on {checked.backend}: {verdict} (max relative error {checked.max_relative:.2e}"
    title += f", tolerance {checked.tolerance:g})"
    table = Table(title=title, title_justify="left", min_width=min(len(title), width))  # wraps only when it must
    table.add_column("blob", overflow="fold", max_width=max(20, width - 50))
    for column in ("max abs", "scale", "relative"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("role", no_wrap=True)
    for e in checked.errors:
        role = "gating" if e.gating else "info only"
        table.add_row(e.blob, f"{e.max_abs:.3g}", f"{e.scale:.3g}", f"{e.relative:.2e}", role)
    return table


READINESS_WIDTH = 80  # the benchmark and readiness tables fit a classic terminal
READINESS_NAMES = 22  # the width layer names are folded to in the readiness table


def benchmark_table(bench: BenchmarkResult) -> "Table":  # noqa: F821
    """Forward-pass times of both models and their ratio: median [interquartile range]."""
    from rich.table import Table

    threads = "default threads" if bench.threads is None else f"{bench.threads} thread(s)"
    title = f"speed on {bench.backend} ({threads}, {bench.rounds} rounds after {bench.warmup} warm-up)"
    table = Table(title=title, title_justify="left", width=READINESS_WIDTH)
    for column in ("model", "median", "IQR", "range"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for which in ("original", "merged"):
        t = bench.times(which)
        table.add_row(which, _ms(t.median), f"{_ms(t.q1)} - {_ms(t.q3)}", f"{_ms(t.low)} - {_ms(t.high)}")
    r = bench.ratio
    table.add_row("merged / original", f"{r.median:.3f}", f"{r.q1:.3f} - {r.q3:.3f}", f"{r.low:.3f} - {r.high:.3f}")
    return table


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def readiness_table(readiness: list[HostReadiness], everything: bool) -> "Table":  # noqa: F821
    """int8 readiness per folded host: range ratio and int8 SQNR before -> after folding. Without
    `everything`, only hosts that are flagged or have constant or tiny-variance channels."""
    from rich.table import Table

    flagged = sum(h.flagged for h in readiness)
    title = (
        f"int8 readiness: {flagged} of {len(readiness)} folded layers flagged "
        f"(per-tensor SQNR drop > {quant.SQNR_DROP_DB:g} dB)"
    )
    table = Table(title=title, title_justify="left", width=READINESS_WIDTH)
    table.add_column("layer", no_wrap=True)  # names folded after separators, as in the other tables
    for column in ("range ratio", "tensor dB", "channel dB"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("note", max_width=22, overflow="fold")
    for h in readiness:
        if everything or h.flagged or h.constant_channels or h.tiny_variance_channels:
            table.add_row(
                fold_name(h.host, READINESS_NAMES),
                f"{h.ratio_before:.3g} -> {h.ratio_after:.3g}",
                f"{_db(h.tensor_before)} -> {_db(h.tensor_after)}",
                _db(h.channel_after),
                _note(h),
            )
    return table


def _db(error: Int8Error) -> str:
    return f"{error.sqnr_db:.0f}" if math.isfinite(error.sqnr_db) else "exact"


def _note(h: HostReadiness) -> str:
    notes = ["FLAGGED"] if h.flagged else []
    for count, what in ((_count(h.constant_channels), "constant"), (_count(h.tiny_variance_channels), "tiny-var")):
        if count:
            notes.append(f"{count} {what} ch")
    return ", ".join(notes)


def _count(channels: dict[str, tuple[int, ...]]) -> int:
    return sum(len(c) for c in channels.values())


def readiness_notes(readiness: list[HostReadiness], everything: bool) -> list[str]:
    """One line per flagged host saying what to do, and (with `everything`) the channels that became
    constant (gamma == 0: pruning candidates) or have a tiny var + eps."""
    lines = [f"{h.host}: {h.advice()}" for h in readiness if h.flagged]
    for h in readiness if everything else ():
        for chain, channels in h.constant_channels.items():
            lines.append(f"{h.host}: constant channels of {chain} (gamma == 0, prunable): {list(channels)}")
        for layer, channels in h.tiny_variance_channels.items():
            lines.append(f"{h.host}: tiny var + eps channels of {layer}: {list(channels)}")
    return lines
