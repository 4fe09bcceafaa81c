"""`merge-bn`: the command line; with `display.py` and `batch/console.py`, the only code that
prints, and the only place that turns errors into exit codes.

Exit codes: 0 done; 1 internal error; 2 bad input or usage; 3 --verify found the merged model
further from the original than --tolerance.
"""

import argparse
import gc
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .argtypes import positive_int
from .defaults import (
    BACKENDS,
    BENCHMARK_ROUNDS,
    DEFAULT_TOLERANCE,
    EXIT_VERIFY_FAILED,
    MAX_INPUT_ELEMENTS,
    MAX_PROTOTXT_MB,
)
from .errors import MergeError, OutputError, VerifyError

if TYPE_CHECKING:  # the heavy modules load only once there is work to do, so --help is fast
    from .io.outputs import Output, Staged
    from .maths.quant import HostReadiness
    from .pipeline import MergeResult
    from .verification.benchmark import BenchmarkResult
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
    _add_statistics_flag(parser)
    _add_fork_flags(parser)
    _add_verify_flags(parser)
    _add_readiness_flags(parser)
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


def _add_statistics_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument_group("BatchNorm statistics").add_argument(
        "--assume-global-stats",
        action="store_true",
        help="fold BatchNorm layers set to use_global_stats: false with their stored moving averages "
        "(for deploy files that copied the setting from training); this changes what Caffe computes "
        "for the file, and the report records it",
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
    forks.add_argument(
        "--max-prototxt-mb",
        type=int,
        default=MAX_PROTOTXT_MB,
        metavar="MB",
        help=f"largest prototxt read, in MB (default {MAX_PROTOTXT_MB})",
    )


def _add_verify_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("verification")
    group.add_argument("--verify", action="store_true", help="run original and merged model and compare outputs")
    group.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="engine for --verify: pycaffe (scripts/install_pycaffe.sh), OpenCV dnn "
        "(pip install 'caffe-bn-merge[verify]') or our float64 reference engine (numpy only); "
        "auto takes the first of these that runs the net",
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
    group.add_argument(
        "--max-input-elements",
        type=int,
        default=MAX_INPUT_ELEMENTS,
        metavar="N",
        help=f"largest number of input values for --verify, all inputs together (default {MAX_INPUT_ELEMENTS:,})",
    )
    group.add_argument(
        "--keep-failed",
        type=Path,
        metavar="DIR",
        help="when --verify rejects the merged pair (or cannot run it), write the pair into DIR for inspection",
    )
    group.add_argument(
        "--layer-plugin",
        action="append",
        default=[],
        type=Path,
        metavar="FILE.py",
        help="layer types for the reference engine: a Python file defining LAYERS = {'Type': forward}, "
        "forward(layer, inputs, blobs) -> outputs; repeatable",
    )


def _add_readiness_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speed and int8 readiness")
    group.add_argument(
        "--benchmark",
        nargs="?",
        const=BENCHMARK_ROUNDS,
        type=positive_int,
        metavar="N",
        help=f"time N interleaved forward passes (default {BENCHMARK_ROUNDS}) of the original and the merged "
        "model on --backend after a warm-up; print median times and their ratio",
    )
    group.add_argument(
        "--threads", type=positive_int, metavar="N", help="threads --benchmark runs with (default: the engine's)"
    )
    group.add_argument(
        "--quant",
        action="store_true",
        help="int8 readiness of every folded layer: weight ranges and int8 error before and after folding; "
        "flags layers where folding costs per-tensor int8 resolution",
    )


def _readiness(
    args: argparse.Namespace, result: "MergeResult", step: Callable[[str], None]
) -> tuple["BenchmarkResult | None", "list[HostReadiness] | None"]:
    """--benchmark and --quant, when asked for."""
    bench = readiness = None
    if args.quant:
        from .maths.quant import readiness as host_readiness

        step("int8 readiness")
        readiness = [host_readiness(host) for host in result.hosts]
    if args.benchmark and args.dry_run:
        log.warning("--benchmark needs the merged model: nothing timed in a --dry-run")
    elif args.benchmark:
        from .verification.benchmark import benchmark

        step("benchmarking")
        temporary = result.staged.temporary
        merged = (temporary(result.output_model), temporary(result.output_weights))
        original = (args.model, args.weights)
        try:
            bench = benchmark(original, merged, args.backend, args.benchmark, args.threads, args.input, args.seed)
        except VerifyError as err:  # the timing is extra: the merged model is still written
            log.warning("--benchmark: nothing timed: %s", err)
    return bench, readiness


def _print_readiness(
    console: object, bench: "BenchmarkResult | None", readiness: "list[HostReadiness] | None", everything: bool
) -> None:
    from .display import message
    from .report import benchmark_table, readiness_notes, readiness_table

    if bench is not None:
        console.print(benchmark_table(bench))
    if readiness is not None:
        table = readiness_table(readiness, everything)
        if table.row_count:
            console.print(table)
        else:
            console.print(table.title, markup=False, highlight=False)
        for line in readiness_notes(readiness, everything):
            message(console, line)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    from .io.outputs import Interrupted, clean_up_interrupted, pause_point, signals_raise

    whole_process = argv is None  # the command line itself, not a call from Python
    argv = list(sys.argv[1:] if argv is None else argv)
    # SIGINT, SIGTERM, SIGHUP: temporary files removed, exit 128 + signal, one line
    try:
        with signals_raise(restore=not whole_process):
            pause_point("started")
            if argv[:1] == ["batch"]:
                from .batch.command import main as batch_main

                code = batch_main(argv[1:])
            elif argv[:1] == ["batch-report"]:
                from .batch.command import report_main

                code = report_main(argv[1:])
            else:
                code = _main(argv)
    except Interrupted as signalled:  # also one that came while the handlers were being put back
        clean_up_interrupted()
        print(f"merge-bn: interrupted by {signalled}; no partial output left", file=sys.stderr)
        return signalled.exit_code
    return code


def run() -> None:
    """The `merge-bn` command (and `python -m caffe_bn_merge`): `main` on the command line, then the
    process ends with its exit code at once, without Python tearing down numpy, protobuf and the
    rest (0-45 ms measured): every file written is closed by then, and the logs and standard streams
    are flushed first. atexit hooks do not run (a --layer-plugin's included). When a stream cannot
    be flushed (a closed pipe), Python's own exit reports it, as without this. A standard stream
    closed when the command started (Python's None) writes to os.devnull. After a failure or a
    signal, what the error's traceback kept in reference cycles is collected first: a batch's
    worker pool, whose semaphores multiprocessing's finalizers must unlink (else its resource
    tracker warns of each on stderr)."""
    sys.stdout = sys.stdout or open(os.devnull, "w")  # noqa: SIM115 (open until the process ends)
    sys.stderr = sys.stderr or open(os.devnull, "w")  # noqa: SIM115
    code = main()
    if code:
        gc.collect()
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    try:
        return _run(args)
    except MergeError as err:
        if args.debug:
            raise
        print(one_line(f"merge-bn: error: {err}"), file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        from .display import end_on_closed_stream

        return end_on_closed_stream("merge-bn: error: standard output was closed (broken pipe); nothing written")
    except Exception as err:  # a bug of ours: say so in one line, keep the traceback behind --debug
        from .io.outputs import raise_interrupted_within  # loaded already, by `main`

        raise_interrupted_within(err)
        if args.debug:
            raise
        print(one_line(f"merge-bn: internal error: {type(err).__name__}: {err} (rerun with --debug)"), file=sys.stderr)
        return 1


MAX_LINE = 300  # characters of an error line; longer ones keep their head and tail


def one_line(message: str, limit: int = MAX_LINE) -> str:
    """`message` on one line of at most `limit` characters: line breaks become spaces, characters
    a terminal cannot take are escaped, and the middle of a longer one gives way to an ellipsis."""
    text = " ".join(message.split("\n")).encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= limit:
        return text
    head = (limit - 1) * 2 // 3
    return f"{text[:head]}…{text[len(text) - (limit - 1 - head) :]}"


def _run(args: argparse.Namespace) -> int:
    """Merge into temporary files, verify them (--verify), print, then publish the outputs and the
    report together; on any failure or signal on the way, nothing is left under the output names."""
    from .display import StepProgress, live_log, make_console, show_result
    from .io.outputs import Staged, pause_point
    from .pipeline import MergeOptions, merge
    from .rules.hosts import DEFAULT_CONV_LIKE

    _check_benchmark_backend(args)
    more_inputs, more_outputs = _more_paths(args)
    _load_plugins(args.layer_plugin)
    console, errors = None if args.quiet else make_console(), make_console(stderr=True)
    options = MergeOptions(
        identity=not args.keep_identity,
        backward=not args.no_backward,
        standalone=not args.keep_standalone,
        bn_flavour=args.bn_flavour,
        conv_like=(*DEFAULT_CONV_LIKE, *args.conv_like),
        caffe_proto=args.caffe_proto,
        assume_global_stats=args.assume_global_stats,
        max_prototxt_mb=args.max_prototxt_mb,
    )
    staged = Staged()
    try:
        with (
            live_log(errors, args.verbose, args.quiet) as logged,
            StepProgress(None if args.quiet else errors) as progress,
        ):
            step = progress.step
            result = merge(
                args.model, args.weights, args.output_model, args.output_weights, options,
                write=not args.dry_run, overwrite=args.force, stage=True, on_step=step,
                on_progress=progress.advance, more_inputs=more_inputs, more_outputs=more_outputs,
            )  # fmt: skip
            staged = result.staged or staged
            checked, failure = None, None
            if args.verify and args.dry_run:
                log.warning("--verify needs the merged model: nothing verified in a --dry-run")
            elif args.verify:
                step("verifying")
                checked, failure = _verify(args, result)
            bench, readiness = _readiness(args, result, step)
        rejected = failure is not None or (checked is not None and not checked.passed)
        if rejected:
            result = replace(result, output_model=None, output_weights=None)
        if args.report:
            _stage_report(staged, args, result, checked, (bench, readiness), logged.warnings)
        if console is not None:
            show_result(console, result, checked, args.verbose or args.dry_run, args.dry_run)
            _print_readiness(console, bench, readiness, args.verbose)
            sys.stdout.flush()
        pause_point("staged")
        if rejected:
            return _reject(args, staged, checked, failure)
        staged.publish(args.force)
    finally:
        staged.discard()
    return 0


def _check_benchmark_backend(args: argparse.Namespace) -> None:
    """--benchmark times on the engines of `BENCHMARKS` only (a usage error before any work)."""
    from .errors import UsageError
    from .verification.benchmark import BENCHMARKS

    if args.benchmark and args.backend != "auto" and args.backend not in BENCHMARKS:
        raise UsageError(f"--benchmark times on {' or '.join(sorted(BENCHMARKS))}, not on --backend {args.backend}")


def _load_plugins(paths: Sequence[Path]) -> None:
    """Register the reference engine's plug-in layer types; a broken plug-in is bad input."""
    if not paths:
        return
    from .errors import InputError
    from .verification.reference import load_plugin

    for path in paths:
        try:
            load_plugin(path)
        except VerifyError as err:
            raise InputError(f"--layer-plugin {err}") from err


def _more_paths(args: argparse.Namespace) -> "tuple[list[Path], list[Output]]":
    """The inputs besides the net, and the paths written besides the pair (report, --keep-failed
    pair), for `merge` to check with the rest."""
    from .io.outputs import Output
    from .pipeline import default_outputs

    given = (*([args.caffe_proto] if args.caffe_proto else []), *args.layer_plugin)
    inputs = [*given, *(Path(s.rpartition("=")[2]) for s in args.input)]
    wanted = [Output(args.report, "--report", replaceable=True)] if args.report else []
    if args.keep_failed and args.verify and not args.dry_run:
        if not args.keep_failed.is_dir():
            raise OutputError(f"{args.keep_failed}: --keep-failed needs an existing folder")
        pair = default_outputs(args.model, args.weights, args.output_model, args.output_weights)
        wanted += [Output(args.keep_failed / path.name, "--keep-failed") for path in pair]
    return inputs, wanted


def _stage_report(
    staged: "Staged",
    args: argparse.Namespace,
    result: "MergeResult",
    checked: "VerifyResult | None",
    measured: "tuple[BenchmarkResult | None, list[HostReadiness] | None]",
    warnings: Sequence[str],
) -> None:
    import json

    from .io.outputs import writing
    from .report import build_report

    report = build_report(result, str(args.model), str(args.weights), checked, *measured, warnings=warnings)
    with writing(args.report):
        staged.stage(args.report, replaceable=True).write_text(json.dumps(report, indent=2))


def _verify(args: argparse.Namespace, result: "MergeResult") -> "tuple[VerifyResult | None, VerifyError | None]":
    """Verify the staged pair: (the result, None), or (None, why no engine could run it)."""
    from .verification.compare import InputLimits, verify

    merged = (result.staged.temporary(result.output_model), result.staged.temporary(result.output_weights))
    limits = InputLimits(args.max_prototxt_mb, args.max_input_elements)
    assumed = result.assume_global_stats
    with _global_stats(args.model, assumed) as model, _global_stats(merged[0], assumed) as merged_model:
        try:
            checked = verify((model, args.weights), (merged_model, merged[1]), args.backend, args.tolerance,
                             args.input, args.seed, limits)  # fmt: skip
            return checked, None
        except VerifyError as err:
            return None, err


@contextmanager
def _global_stats(prototxt: Path, assume_global_stats: bool) -> Iterator[Path]:
    """The prototxt as --verify runs it: with --assume-global-stats, a temporary copy whose BatchNorm
    layers set to batch statistics use their stored ones (the function the merge folded; layers it
    kept then compute the same on both sides)."""
    if not assume_global_stats:
        yield prototxt
        return
    import re
    import tempfile

    text = re.sub(rb"\buse_global_stats\s*:\s*(?:false|False|f|0)\b", b"use_global_stats: true", prototxt.read_bytes())
    with tempfile.TemporaryDirectory(prefix="caffe-bn-merge-") as folder:
        copy = Path(folder) / prototxt.name
        copy.write_bytes(text)
        yield copy


def _reject(
    args: argparse.Namespace, staged: "Staged", checked: "VerifyResult | None", failure: Exception | None
) -> int:
    """Publish the report alone, keep the pair in --keep-failed DIR or drop it; say why in one line."""
    if args.report:
        staged.only(args.report).publish()
    kept = f"; the pair is in {args.keep_failed}" if args.keep_failed else ""
    if args.keep_failed:
        staged.keep_in(args.keep_failed)
    if failure is not None:
        reason = f"could not verify the merged model: {failure}"
    else:
        gating = [e for e in checked.errors if e.gating]
        worst = max(gating, key=lambda e: math.inf if math.isnan(e.relative) else e.relative, default=None)
        blob = f"blob '{worst.blob}' relative error {worst.relative:.3g}" if worst else "no blob compared"
        reason = f"verification failed on {checked.backend}: {blob} > tolerance {checked.tolerance:g}"
    print(one_line(f"merge-bn: error: {reason}; no output written{kept}"), file=sys.stderr)
    return EXIT_VERIFY_FAILED
