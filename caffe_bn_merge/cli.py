"""`merge-bn`: the command line. The only module that prints and exits."""

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import MergeError
from .merge import MergeOptions, MergeResult, merge
from .plan import Rule

log = logging.getLogger("caffe_bn_merge")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every flag is documented here and in README."""
    parser = argparse.ArgumentParser(
        prog="merge-bn",
        description="Fold BatchNorm/Scale layers of a Caffe deploy net into the Convolution, "
        "Deconvolution and InnerProduct layers they follow. Writes a new prototxt + caffemodel "
        "that compute the same function with fewer layers; the inputs are never modified.",
    )
    parser.add_argument("--model", required=True, type=Path, help="deploy .prototxt of the net")
    parser.add_argument("--weights", required=True, type=Path, help="trained .caffemodel matching --model")
    parser.add_argument(
        "--output-model", type=Path, help="merged prototxt to write (default: <model>_merged.prototxt beside --model)"
    )
    parser.add_argument(
        "--output-weights",
        type=Path,
        help="merged caffemodel to write (default: <weights>_merged.caffemodel beside --weights)",
    )
    rules = parser.add_argument_group("rules (all on by default; turn off for the classic behaviour)")
    rules.add_argument(
        "--no-backward", action="store_true", help="do not fold a BatchNorm/Scale chain into the layer reading it"
    )
    rules.add_argument(
        "--keep-standalone",
        action="store_true",
        help="do not merge a chain that folds nowhere (e.g. BatchNorm+Scale after Concat) into one Scale",
    )
    rules.add_argument(
        "--keep-identity", action="store_true", help="keep Dropout, Split and layers that compute the identity"
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log every fold and every layer kept")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 2 bad input or usage)."""
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:
        options = MergeOptions(
            identity=not args.keep_identity, backward=not args.no_backward, standalone=not args.keep_standalone
        )
        result = merge(args.model, args.weights, args.output_model, args.output_weights, options)
    except MergeError as err:
        if args.debug:
            raise
        print(f"merge-bn: error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:  # a bug of ours: say so in one line, keep the traceback behind --debug
        if args.debug:
            raise
        print(f"merge-bn: internal error: {type(err).__name__}: {err} (rerun with --debug)", file=sys.stderr)
        return 1
    if not args.quiet:
        print(summary(result))
    return 0


def summary(result: MergeResult) -> str:
    """A few lines: what was folded, layer counts before/after, what was kept and why."""
    plan = result.plan
    before, after = sum(result.layers_before.values()), sum(result.layers_after.values())
    counts = Counter(action.rule for action in plan.actions)
    done = ", ".join(f"{counts[rule]} {rule}" for rule in Rule if counts[rule]) or "nothing to fold"
    lines = [f"{before} -> {after} layers ({done})"]
    for type_ in sorted(set(result.layers_before) | set(result.layers_after)):
        if result.layers_before[type_] != result.layers_after[type_]:
            lines.append(f"  {type_}: {result.layers_before[type_]} -> {result.layers_after[type_]}")
    for kept in plan.kept:
        lines.append(f"kept {kept.type} '{kept.layer}': {kept}")
    lines.append(f"wrote {result.output_model} and {result.output_weights}")
    return "\n".join(lines)
