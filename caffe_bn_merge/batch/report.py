"""The JSON report of a batch run."""

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..errors import UsageError
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
        "unread": list(unread),
        "deployments": [r.to_json() for r in results],
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
