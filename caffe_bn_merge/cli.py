"""`merge-bn`: the command line; with `batch/console.py`, the only code that prints, and the only
place that turns errors into exit codes.

Exit codes: 0 done; 1 internal error; 2 bad input or usage; 3 --verify found the merged model
further from the original than --tolerance.
"""

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .defaults import DEFAULT_TOLERANCE, EXIT_VERIFY_FAILED, TABLE_WIDTH
from .errors import MergeError

if TYPE_CHECKING:  # the heavy modules load only once there is work to do, so --help is fast
    from .pipeline import MergeResult
    from .verification.compare import VerifyResult

log = logging.getLogger("caffe_bn_merge")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every flag is documented here and in README."""
    parser = argparse.ArgumentParser(
        prog="merge-bn",
        description="Fold BatchNorm/Scale layers of a Caffe deploy net into the Convolution, "
        "Deconvolution and InnerProduct layers they follow. Writes a new prototxt + caffemodel "
        "that compute the same function with fewer layers; the inputs are never modified. "
        "`merge-bn batch --help` converts whole folders.",
        epilog="exit codes: 0 done, 1 internal error, 2 bad input or usage, 3 --verify failed",
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
    _add_rule_flags(parser)
    _add_fork_flags(parser)
    _add_verify_flags(parser)
    out = parser.add_argument_group("reporting")
    out.add_argument("--dry-run", action="store_true", help="plan and print the decisions; write no model files")
    out.add_argument("--force", action="store_true", help="replace output files that exist already")
    out.add_argument("--report", type=Path, help="write a JSON report of every decision (schema: README)")
    verbosity = out.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="show every decision, and log each step")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    out.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _add_rule_flags(parser: argparse.ArgumentParser) -> None:
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


def _add_fork_flags(parser: argparse.ArgumentParser) -> None:
    forks = parser.add_argument_group("Caffe forks")
    forks.add_argument(
        "--bn-flavour",
        choices=("auto", "bvlc", "nvcaffe", "nvcaffe-0.15", "bn"),
        default="auto",
        help="BatchNorm blob layout, when detection from parameters and blob shapes is not enough "
        "(README: BatchNorm variants)",
    )
    forks.add_argument(
        "--conv-like",
        action="append",
        default=[],
        metavar="TYPE",
        help="a layer type that is a Convolution under another name (repeatable; "
        "DepthwiseConvolution and ConvolutionDepthwise are always included)",
    )
    forks.add_argument(
        "--caffe-proto",
        type=Path,
        help="the fork's caffe.proto, to read and write its prototxt fields by name "
        "(pip install 'caffe-bn-merge[schema]')",
    )


def _add_verify_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("verification")
    group.add_argument("--verify", action="store_true", help="run original and merged model and compare outputs")
    group.add_argument(
        "--backend",
        choices=("auto", "opencv", "caffe"),
        default="auto",
        help="engine for --verify: pycaffe (scripts/install_pycaffe.sh) or OpenCV dnn "
        "(pip install 'caffe-bn-merge[verify]'); auto prefers pycaffe when installed",
    )
    group.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest error allowed, relative to each output's magnitude (default {DEFAULT_TOLERANCE:g})",
    )
    group.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an input for --verify: a .npy array or an image (BGR pixels, resized); repeatable; "
        "inputs not given are seeded random normal",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["batch"]:
        from .batch.command import main as batch_main

        return batch_main(argv[1:])
    if argv[:1] == ["batch-report"]:
        from .batch.command import report_main

        return report_main(argv[1:])
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # so a killed run still removes its temporary files
    level = logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    try:
        return _run(args)
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


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _run(args: argparse.Namespace) -> int:
    from .io.emit import atomic_output
    from .pipeline import MergeOptions, merge
    from .rules.hosts import DEFAULT_CONV_LIKE

    console = None if args.quiet else _console()
    options = MergeOptions(
        identity=not args.keep_identity,
        backward=not args.no_backward,
        standalone=not args.keep_standalone,
        bn_flavour=args.bn_flavour,
        conv_like=(*DEFAULT_CONV_LIKE, *args.conv_like),
        caffe_proto=args.caffe_proto,
    )
    with _progress(console) as step:
        result = merge(
            args.model, args.weights, args.output_model, args.output_weights, options,
            write=not args.dry_run, overwrite=args.force, on_step=step,
        )  # fmt: skip
        checked = None
        if args.verify:
            if args.dry_run:
                log.warning("--verify needs the merged model: nothing verified in a --dry-run")
            else:
                step("verifying")
                checked = _verify(args, result)
    if console is not None:
        _print(console, result, checked, args.verbose or args.dry_run)
    if args.report:
        import json

        from .report import build_report

        report = build_report(result, str(args.model), str(args.weights), checked)
        with atomic_output(args.report) as handle:
            handle.write(json.dumps(report, indent=2).encode())
    return EXIT_VERIFY_FAILED if checked is not None and not checked.passed else 0


def _verify(args: argparse.Namespace, result: "MergeResult") -> "VerifyResult":
    from .verification.compare import verify

    original = (args.model, args.weights)
    merged = (result.output_model, result.output_weights)
    return verify(original, merged, args.backend, args.tolerance, args.input, args.seed)


def _console() -> object:
    """Where tables go (rich loads only when something is printed)."""
    from rich.console import Console

    return Console(width=TABLE_WIDTH)


@contextmanager
def _progress(console: object | None) -> Iterator[Callable[[str], None]]:
    """A spinner naming the current step (shown on terminals only, so slow steps are visible)."""
    if console is None or not console.is_terminal:
        yield lambda name: log.info("%s ...", name)
        return
    with console.status("starting") as status:

        def step(name: str) -> None:
            log.info("%s ...", name)
            status.update(f"{name} ...")

        yield step


def _print(console: object, result: "MergeResult", checked: "VerifyResult | None", everything: bool) -> None:
    from .report import counts_table, decisions_table, verify_table

    console.print(counts_table(result))
    table = decisions_table(result, everything)
    if table.row_count:
        console.print(table)
    if checked is not None:
        console.print(verify_table(checked))
    if not result.plan.actions:
        console.print("nothing to fold: the merged model is the input model (already merged, or no BatchNorm)")
    if result.output_model is not None:
        console.print(f"wrote {result.output_model} and {result.output_weights}")
    if checked is not None and not checked.passed:
        console.print("the merged model differs from the original: rerun with --no-backward or "
                      "--keep-standalone to narrow it down, and please report it")  # fmt: skip
