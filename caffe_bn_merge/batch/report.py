"""The JSON report of a batch run."""

import json
import os
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..errors import UsageError
from .pool import ItemResult, Status

SCHEMA = 1


def make_report(results: Sequence[ItemResult], notes: Sequence[str], seconds: float, **run: object) -> dict:
    """The JSON report: schema version, how the run was made (`run`), counts, notes, deployments."""
    counts = Counter(str(r.status) for r in results)
    return {
        "schema": SCHEMA,
        "tool": f"merge-bn batch {__version__}",
        **run,
        "seconds": round(seconds, 3),
        "counts": {str(s): counts[str(s)] for s in Status} | {"total": len(results)},
        "notes": list(notes),
        "totals": fleet_totals(results),
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
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        temporary.write_text(json.dumps(report, indent=2) + "\n")
        temporary.replace(path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        raise UsageError(f"{path}: cannot write the report ({err.strerror})") from None
