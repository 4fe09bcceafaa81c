"""The argument parser of `merge-bn batch`."""

import argparse
import os
from pathlib import Path

from ..argtypes import positive_int
from ..defaults import BACKENDS, BENCHMARK_ROUNDS, DEFAULT_TOLERANCE
from .worklist import SHARD_COUNT_VARIABLE, parse_shard


def _shard_arg(text: str) -> tuple[int, int] | str:
    if text.strip() == "auto":
        return "auto"
    try:
        return parse_shard(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `merge-bn batch`."""
    parser = argparse.ArgumentParser(
        prog="merge-bn batch",
        description="Convert every deployment under SRC folders (or listed in a manifest): each caffemodel "
        "is paired with its deploy prototxt (same stem, else the only deploy-looking prototxt in its "
        "folder; train/test/solver prototxts are skipped with a note; ambiguity is reported, not "
        "guessed) and merged into OUTDIR/<its folder relative to SRC>/<caffemodel stem>.{prototxt,caffemodel} "
        "(with several SRCs, under OUTDIR/<SRC folder name>/...). Sources are never written; "
        "OUTDIR may lie inside a SRC (it is not searched).",
        epilog="Exit status: 0 all converted or skipped, 1 some deployment failed or some file or folder "
        "could not be read (each listed on stderr and in the report's unread), 2 usage error. "
        "--shard i/n keeps the items at positions p (from 0) of the sorted work list with p % n == i-1, "
        "so the n shards of a job array partition the fleet; give each shard its own --report, and merge them "
        "with `merge-bn batch-report`.",
    )
    parser.add_argument("sources", nargs="*", type=Path, metavar="SRC", help="folders to search (recursively)")
    parser.add_argument("--out", required=True, type=Path, metavar="OUTDIR", help="folder for the merged models")
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="worker processes (default: the number of cores); 1 converts in this process",
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        metavar="FILE",
        help="CSV (header prototxt,caffemodel[,out]) or .json list of those objects, instead of SRC folders; "
        "relative paths are relative to the manifest's folder; out is the output path in OUTDIR without suffix",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run each merged model against its original; a deployment above --tolerance fails and is not written",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="engine for --verify: pycaffe (scripts/install_pycaffe.sh), OpenCV dnn or our float64 reference "
        "engine; auto (default) takes the first of these that runs the net",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest error --verify allows, relative to each output's magnitude (default {DEFAULT_TOLERANCE:g})",
    )
    _add_readiness_flags(parser)
    parser.add_argument("--report", type=Path, metavar="FILE", help="write a JSON report of every deployment")
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip deployments whose two outputs exist and are newer than both inputs",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace outputs that exist already (without it or --skip-existing, any existing output is a usage error)",
    )
    parser.add_argument(
        "--shard",
        type=_shard_arg,
        metavar="i/n|auto",
        help="process only shard i of n (1-based) of the sorted work list; auto: this task's shard of a Slurm job "
        "array (SLURM_ARRAY_TASK_ID, _MIN, _COUNT) or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, with "
        f"--shard-count or {SHARD_COUNT_VARIABLE})",
    )
    parser.add_argument(
        "--shard-count",
        type=positive_int,
        metavar="N",
        help="with --shard auto in a Kubernetes Indexed Job: the job's completions",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print nothing but failures")
    verbosity.add_argument(
        "-v", "--verbose", action="store_true", help="list every note and every deployment in the table"
    )
    return parser


def _add_readiness_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quant", action="store_true", help="int8 readiness of each deployment's folded layers (README: --quant)"
    )
    parser.add_argument(
        "--benchmark",
        nargs="?",
        const=BENCHMARK_ROUNDS,
        default=0,
        type=positive_int,
        metavar="N",
        help=f"time N (default {BENCHMARK_ROUNDS}) interleaved forward passes of each original and merged model "
        "on OpenCV dnn (use --jobs 1 for figures that mean something)",
    )
    parser.add_argument("--threads", type=positive_int, metavar="N", help="OpenCV threads for --benchmark")


def build_report_parser() -> argparse.ArgumentParser:
    """The argument parser of `merge-bn batch-report`."""
    parser = argparse.ArgumentParser(
        prog="merge-bn batch-report",
        description="Merge the JSON reports of the shards of one `merge-bn batch --shard` job array into one "
        "report: every deployment, counts over them all, the failures, and which shards are missing.",
        epilog="Exit status: 0 every shard present and nothing failed, 1 shards missing or deployments failed "
        "or files not read, 2 usage error (a report unreadable, or reports of different runs).",
    )
    parser.add_argument("reports", nargs="+", type=Path, metavar="REPORT", help="shard reports (--report of each)")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="FILE", help="the merged report")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but problems")
    return parser
