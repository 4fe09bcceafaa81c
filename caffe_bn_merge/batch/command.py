"""`merge-bn batch` as four steps: prepare the work list, show notes, convert, report; and
`merge-bn batch-report`, which merges the reports of a job array's shards."""

import argparse
import importlib.util
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

from ..display import end_on_closed_stream
from ..errors import UsageError
from ..io.outputs import Interrupted, clean_up_interrupted, pause_point, signals_raise
from .args import build_parser, build_report_parser
from .console import EVERY_ROW_UP_TO, Console, fleet_lines
from .pool import ItemResult, Readiness, Settings, Status, Workers, item_result, run_items, start_workers
from .report import fleet_totals, make_report, merge_reports, read_report, write_report
from .worklist import WorkItem, WorkList, auto_shard, build_work_list, is_up_to_date


def main(argv: Sequence[str] | None = None) -> int:
    """Run `merge-bn batch`; return the exit status (0 all converted or skipped, 1 some failed or
    some file or folder could not be read, 2 usage or a standard stream closed, 128 + N after
    signal N)."""
    with signals_raise():
        try:
            return _main(argv)
        except Interrupted as signalled:
            clean_up_interrupted()
            Console(quiet=False).error(
                f"merge-bn batch: interrupted by {signalled}; deployments not finished left no files"
            )
            return signalled.exit_code
        except BrokenPipeError:  # the workers are ended already, as for a signal
            return end_on_closed_stream(
                "merge-bn batch: error: an output stream was closed (broken pipe); deployments not "
                "finished left no files (--skip-existing resumes the rest)"
            )


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(args.quiet)
    start = time.perf_counter()
    settings = _settings(args)
    with start_workers(args.jobs, settings) if args.jobs > 1 else nullcontext() as workers:
        pause_point("workers")
        try:
            work, items = _prepare(args)
        except (UsageError, OSError) as err:
            console.error(f"merge-bn batch: error: {err}")
            return 2
        _show_notes(console, work.notes, args.verbose)
        for line in work.unread:
            console.error(f"merge-bn batch: not read: {line}")
        results = _convert(args, settings, console, items, workers)
    seconds = time.perf_counter() - start
    if args.report is not None:  # before the table: a reader of stdout gone leaves the report
        try:
            report = make_report(results, work.notes, seconds, unread=work.unread, **_run_settings(args, work))
            write_report(args.report, report)
        except UsageError as err:
            console.error(f"merge-bn batch: error: {err}")
            return 2
    console.table(results, every=args.verbose or len(results) <= EVERY_ROW_UP_TO)
    console.summary(results, seconds, args.report, len(work.unread))
    for line in fleet_lines(fleet_totals(results)):
        console.note(line)
    return 1 if any(r.status is Status.FAILED for r in results) or work.unread else 0


def _settings(args: argparse.Namespace) -> Settings:
    """How each deployment is converted, from the command line."""
    overwrite = args.force or args.skip_existing  # else outputs appearing meanwhile are not replaced
    readiness = Readiness(args.quant, args.benchmark, args.threads)
    return Settings(args.verify, args.backend, args.tolerance, overwrite, readiness)


def _prepare(args: argparse.Namespace) -> tuple[WorkList, list[WorkItem]]:
    """The work list and this shard of it, once every usage check has passed (raises UsageError)."""
    if args.shard == "auto":
        args.shard = auto_shard(os.environ, args.shard_count)
    elif args.shard_count is not None:
        raise UsageError("--shard-count goes with --shard auto")
    work = build_work_list(args.sources, args.out, args.manifest, args.shard)
    if args.report is not None:
        _check_report(args.report, work)
    if args.verify and args.backend == "opencv" and importlib.util.find_spec("cv2") is None:
        raise UsageError("--verify --backend opencv needs OpenCV: pip install 'caffe-bn-merge[verify]'")
    items = work.items
    existing = [out for item in items for out in (item.out_prototxt, item.out_caffemodel) if out.exists()]
    if existing and not (args.force or args.skip_existing):
        raise UsageError(
            f"{len(existing)} output files exist already (e.g. {existing[0]}); "
            "add --skip-existing to keep the up-to-date ones, or --force to replace them all"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    return work, items


def _check_report(report: Path, work: WorkList) -> None:
    """The report is no source and no output (by device and inode), and a regular file if it exists."""
    from ..errors import OutputError
    from ..io.outputs import Output, check_outputs, file_key

    if file_key(report) in work.taken:
        raise UsageError(f"{report}: the report would overwrite a source file or an output")
    try:
        check_outputs([], [Output(report, "--report", replaceable=True)], overwrite=True)
    except OutputError as err:
        raise UsageError(str(err)) from None


def _show_notes(console: "Console", notes: Sequence[str], verbose: bool) -> None:
    if verbose:
        for text in notes:
            console.note(text)
    elif notes:
        console.note(f"{len(notes)} notes (skipped train/test/solver prototxts...): -v or --report lists them")


def _convert(
    args: argparse.Namespace,
    settings: Settings,
    console: "Console",
    items: Sequence[WorkItem],
    workers: Workers | None,
) -> list[ItemResult]:
    """Skip what is up to date (with --skip-existing), convert the rest (on `workers`, started
    while the work list was made); results sorted by key."""
    results: list[ItemResult] = []
    with console.progress(len(items)) as progress:
        todo = []
        for item in items:
            if args.skip_existing and item.problem is None and is_up_to_date(item):
                result = item_result(item, Status.SKIPPED, "outputs up to date")
                results.append(result)
                progress.advance(result)
            else:
                todo.append(item)
        results += run_items(todo, args.jobs, settings, progress.advance, workers)
    return sorted(results, key=lambda r: r.key)


def _run_settings(args: argparse.Namespace, work: WorkList) -> dict[str, object]:
    """How the run was asked for, for the report."""
    return {
        "sources": [str(s) for s in args.sources],
        "manifest": str(args.manifest) if args.manifest else None,
        "out": str(args.out),
        "jobs": args.jobs,
        "shard": list(args.shard) if args.shard else None,
        "verify": args.verify,
        "quant": args.quant,
        "benchmark": args.benchmark or None,
        "tolerance": args.tolerance if args.verify else None,
        "backend": args.backend if args.verify else None,
        "skip_existing": args.skip_existing,
        "force": args.force,
        "work_list": work.total,
    }


def report_main(argv: Sequence[str] | None = None) -> int:
    """Run `merge-bn batch-report`: merge shard reports; return the exit status (0 complete and
    nothing failed, 1 shards missing or failures, 2 usage or a standard stream closed)."""
    try:
        return _report_main(argv)
    except BrokenPipeError:  # the merged report is written before anything is said
        return end_on_closed_stream("merge-bn batch-report: error: an output stream was closed (broken pipe)")


def _report_main(argv: Sequence[str] | None) -> int:
    args = build_report_parser().parse_args(argv)
    console = Console(args.quiet)
    try:
        if args.output.resolve() in {r.resolve() for r in args.reports}:
            raise UsageError(f"{args.output}: would overwrite one of the shard reports")
        merged = merge_reports({str(path): read_report(path) for path in args.reports})
        write_report(args.output, merged)
    except UsageError as err:
        console.error(f"merge-bn batch-report: error: {err}")
        return 2
    missing, counts = merged["shards"]["missing"], merged["counts"]
    if missing:
        listed = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
        console.error(f"merge-bn batch-report: {len(missing)} of {merged['shards']['count']} shards missing: {listed}")
    for failure in merged["failures"]:
        console.error(f"merge-bn batch-report: failed: {failure['key']}: {failure['reason']}")
    for line in merged["unread"]:
        console.error(f"merge-bn batch-report: not read: {line}")
    summary = ", ".join(f"{counts[str(s)]} {s}" for s in Status)
    console.note(f"{counts['total']} of {merged['work_list']} deployments reported: {summary}; report {args.output}")
    return 1 if missing or counts["failed"] or merged["unread"] else 0
