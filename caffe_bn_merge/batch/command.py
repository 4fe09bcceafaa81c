"""`merge-bn batch` as four steps: prepare the work list, show notes, convert, report."""

import argparse
import importlib.util
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext

from ..defaults import DEFAULT_TOLERANCE
from ..errors import UsageError
from .args import build_parser, build_report_parser
from .console import EVERY_ROW_UP_TO, Console
from .pool import ItemResult, Status, item_result, run_items, start_workers
from .report import make_report, merge_reports, read_report, write_report
from .worklist import WorkItem, WorkList, auto_shard, build_work_list, is_up_to_date


def main(argv: Sequence[str] | None = None) -> int:
    """Run `merge-bn batch`; return the exit status (0 all converted or skipped, 1 some failed or
    some file or folder could not be read, 2 usage)."""
    args = build_parser().parse_args(argv)
    console = Console(args.quiet)
    start = time.perf_counter()
    with start_workers(args.jobs, args.verify) if args.jobs > 1 else nullcontext() as workers:
        try:
            work, items = _prepare(args)
        except (UsageError, OSError) as err:
            console.error(f"merge-bn batch: error: {err}")
            return 2
        _show_notes(console, work.notes, args.verbose)
        for line in work.unread:
            console.error(f"merge-bn batch: not read: {line}")
        try:
            results = _convert(args, console, items, workers)
        except KeyboardInterrupt:
            console.error("merge-bn batch: interrupted")
            return 130
    seconds = time.perf_counter() - start
    console.table(results, every=args.verbose or len(results) <= EVERY_ROW_UP_TO)
    if args.report is not None:
        try:
            report = make_report(results, work.notes, seconds, unread=work.unread, **_run_settings(args, work))
            write_report(args.report, report)
        except UsageError as err:
            console.error(f"merge-bn batch: error: {err}")
            return 2
    counts = Counter(str(r.status) for r in results)
    summary = ", ".join(f"{counts[str(s)]} {s}" for s in Status)
    unread = f"; {len(work.unread)} files or folders not read" if work.unread else ""
    console.note(
        f"{len(results)} deployments: {summary} in {seconds:.1f} s{unread}"
        + (f"; report {args.report}" if args.report else "")
    )
    return 1 if counts["failed"] or work.unread else 0


def _prepare(args: argparse.Namespace) -> tuple[WorkList, list[WorkItem]]:
    """The work list and this shard of it, once every usage check has passed (raises UsageError)."""
    if args.shard == "auto":
        args.shard = auto_shard(os.environ, args.shard_count)
    elif args.shard_count is not None:
        raise UsageError("--shard-count goes with --shard auto")
    work = build_work_list(args.sources, args.out, args.manifest, args.shard)
    if args.report is not None and args.report.resolve() in work.protected | work.outputs:
        raise UsageError(f"{args.report}: the report would overwrite a source file or an output")
    if args.report is not None and not args.report.resolve().parent.is_dir():
        raise UsageError(f"{args.report}: folder {args.report.parent} does not exist")
    if args.verify and importlib.util.find_spec("cv2") is None:
        raise UsageError("--verify needs OpenCV: pip install 'caffe-bn-merge[verify]'")
    items = work.items
    existing = [out for item in items for out in (item.out_prototxt, item.out_caffemodel) if out.exists()]
    if existing and not (args.force or args.skip_existing):
        raise UsageError(
            f"{len(existing)} output files exist already (e.g. {existing[0]}); "
            "add --skip-existing to keep the up-to-date ones, or --force to replace them all"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    return work, items


def _show_notes(console: "Console", notes: Sequence[str], verbose: bool) -> None:
    if verbose:
        for text in notes:
            console.note(text)
    elif notes:
        console.note(f"{len(notes)} notes (skipped train/test/solver prototxts...): -v or --report lists them")


def _convert(
    args: argparse.Namespace, console: "Console", items: Sequence[WorkItem], workers: ProcessPoolExecutor | None
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
        results += run_items(todo, args.jobs, args.verify, progress.advance, workers)
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
        "tolerance": DEFAULT_TOLERANCE if args.verify else None,
        "skip_existing": args.skip_existing,
        "force": args.force,
        "work_list": work.total,
    }


def report_main(argv: Sequence[str] | None = None) -> int:
    """Run `merge-bn batch-report`: merge shard reports; return the exit status (0 complete and
    nothing failed, 1 shards missing or failures, 2 usage)."""
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
