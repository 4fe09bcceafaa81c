"""The JSON report of a batch run."""

import json
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..errors import OutputError, UsageError
from ..io.outputs import Staged, writing
from .pool import ItemResult, Status

SCHEMA = 1


def make_report(
    results: Sequence[ItemResult], notes: Sequence[str], seconds: float, unread: Sequence[str] = (), **run: object
) -> dict:
    """The JSON report: schema version, how the run was made (`run`), counts, notes, what discovery
    could not read (`unread`), deployments."""
    counts = Counter(str(r.status) for r in results)
    return {
        "schema": SCHEMA,
        "tool": f"merge-bn batch {__version__}",
        **run,
        "seconds": round(seconds, 3),
        "counts": {str(s): counts[str(s)] for s in Status} | {"total": len(results)},
        "notes": list(notes),
        "totals": fleet_totals(results),
        "unread": list(unread),
        "deployments": [r.to_json() for r in results],
    }


def fleet_totals(results: Sequence[ItemResult]) -> dict:
    """Fleet-level figures of --quant (deployments with flagged layers) and --benchmark (median ratio)."""
    quant = [r.quant for r in results if r.quant is not None]
    ratios = [r.benchmark["ratio"] for r in results if r.benchmark is not None]
    return {
        "quant": None
        if not quant
        else {
            "deployments": len(quant),
            "deployments_flagged": sum(bool(q["flagged"]) for q in quant),
            "flagged_layers": sum(len(q["flagged"]) for q in quant),
        },
        "benchmark": None if not ratios else {"deployments": len(ratios), "median_ratio": statistics.median(ratios)},
    }


def write_report(path: Path, report: dict) -> None:
    """Write the report as JSON, atomically (a temporary file renamed)."""
    path = Path(path)
    staged = Staged()
    try:
        with writing(path):
            staged.stage(path, replaceable=True).write_text(json.dumps(report, indent=2) + "\n")
        staged.publish()
    except OutputError as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise UsageError(f"{path}: cannot write the report ({err.strerror})") from None
    finally:
        staged.discard()


def read_report(path: Path) -> dict:
    """A batch report written by `write_report` (UsageError when it is not one)."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise UsageError(f"{path}: cannot read the batch report ({getattr(err, 'strerror', None) or err})") from None
    if not (
        isinstance(report, dict) and report.get("schema") == SCHEMA and isinstance(report.get("deployments"), list)
    ):
        raise UsageError(f"{path}: not a merge-bn batch report (schema {SCHEMA})")
    shard = report.get("shard") or [1, 1]
    if not (
        isinstance(shard, list) and len(shard) == 2 and all(type(n) is int for n in shard) and 1 <= shard[0] <= shard[1]
    ):
        raise UsageError(f"{path}: its shard {shard!r} is not [i, n] with 1 <= i <= n")
    if not all(isinstance(d, dict) and isinstance(d.get("key"), str) for d in report["deployments"]):
        raise UsageError(f"{path}: a deployment has no key")
    return report | {"shard": shard}


def merge_reports(reports: dict[str, dict]) -> dict:
    """One report for the shards of a job array (`reports`, from `read_report`, by file name): every
    deployment, counts over them all, the failures, and which of the n shards are missing. A report
    of an unsharded run counts as shard 1/1. Raises UsageError on reports that are not of one array."""
    by_shard: dict[int, str] = {}
    counts_of = {r["shard"][1] for r in reports.values()}
    lists = {r.get("work_list") for r in reports.values()}
    if len(counts_of) != 1 or len(lists) != 1:
        found = f"shard counts {sorted(counts_of)}, work lists {sorted(map(str, lists))}"
        raise UsageError(f"the reports are not of one job array ({found}); give the reports of one run")
    (count,) = counts_of
    for name, report in reports.items():
        index = report["shard"][0]
        if index in by_shard:
            raise UsageError(f"shard {index}/{count} given twice: {by_shard[index]} and {name}")
        by_shard[index] = name
    deployments = sorted((d for r in reports.values() for d in r["deployments"]), key=lambda d: d["key"])
    counts = Counter(d["status"] for d in deployments)
    return {
        "schema": SCHEMA,
        "tool": f"merge-bn batch-report {__version__}",
        "merged_from": {str(index): by_shard[index] for index in sorted(by_shard)},
        "shards": {"count": count, "missing": [i for i in range(1, count + 1) if i not in by_shard]},
        "work_list": lists.pop(),
        "seconds": max(r.get("seconds", 0) for r in reports.values()),  # the slowest shard
        "shard_seconds": round(sum(r.get("seconds", 0) for r in reports.values()), 3),
        "counts": {str(s): counts[str(s)] for s in Status} | {"total": len(deployments)},
        "failures": [{"key": d["key"], "reason": d["reason"]} for d in deployments if d["status"] == Status.FAILED],
        "notes": list(dict.fromkeys(n for r in reports.values() for n in r.get("notes", []))),
        "unread": list(dict.fromkeys(u for r in reports.values() for u in r.get("unread", []))),
        "deployments": deployments,
    }
