"""The JSON report of a batch run."""

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..errors import OutputError, UsageError
from ..io.outputs import Staged, writing
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
        "deployments": [r.to_json() for r in results],
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
