"""`merge-bn batch`: convert a fleet of deployments (deploy prototxt + one or more caffemodels).

The pieces, each usable on its own:

- discovery (`discovery.py`): `classify_prototxt` tells deploy nets from train/test nets and
  solvers by content; `pair_folder` / `discover` pair each caffemodel with its deploy prototxt;
  `read_manifest` reads an explicit list instead;
- the work list: `plan_discovered` / `plan_manifest` give every deployment its outputs under OUTDIR
  and a key (its output path relative to OUTDIR, without suffix), sorted by key; `check_outputs`
  refuses outputs that collide or would overwrite a source; `shard` keeps a deterministic 1/n;
- running: `convert_item` converts (and optionally verifies) one deployment and never raises;
  `run_items` runs many, in worker processes;
- reporting: `make_report` (JSON, ``"schema": 1``) and the console progress bar and table.

Sharding (`--shard i/n`, i from 1): the work list is sorted by key, and shard i keeps the items whose
position p in it (from 0) has p % n == i - 1. Keys depend only on the SRC folders' names and the
files under them (or the manifest), so every machine of a job array given the same SRC arguments
computes the same list and the n shards partition it.
"""

import argparse
import importlib.util
import json
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath

from . import __version__
from .cli import DEFAULT_TOLERANCE
from .discovery import (
    CAFFEMODEL_SUFFIX,
    PROTOTXT_SUFFIX,
    BatchUsageError,
    Discovery,
    ManifestEntry,
    discover,
    read_manifest,
)
from .errors import MergeError

SCHEMA = 1
# Workers start fresh ("spawn"): a forked child inherits the locks of threads it does not have
# (OpenCV's and BLAS's thread pools in a process that verified before), and can hang on them.
START_METHOD = "spawn"
VERIFY_TOLERANCE = DEFAULT_TOLERANCE  # max relative error of a verified deployment, as for merge-bn

# --- the work list ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkItem:
    """One deployment to convert: inputs, outputs and its key (output path relative to OUTDIR,
    without suffix, POSIX). An item with a `problem` is reported as failed and never run."""

    key: str
    prototxt: Path | None
    caffemodel: Path
    out_prototxt: Path
    out_caffemodel: Path
    problem: str | None = None


def _item(key: PurePosixPath, outdir: Path, prototxt: Path | None, caffemodel: Path, problem: str | None) -> WorkItem:
    out = outdir.joinpath(*key.parts)
    return WorkItem(
        key.as_posix(),
        prototxt,
        caffemodel,
        out.with_name(out.name + PROTOTXT_SUFFIX),
        out.with_name(out.name + CAFFEMODEL_SUFFIX),
        problem,
    )


def source_prefixes(roots: Sequence[Path]) -> list[str]:
    """The output prefix of each SRC root: none for a single root, else the folder's name, made
    unique with -2, -3... in argument order."""
    if len(roots) == 1:
        return [""]
    prefixes: list[str] = []
    for root in roots:
        name = Path(root).resolve().name or "root"
        candidate, n = name, 1
        while candidate in prefixes:
            n += 1
            candidate = f"{name}-{n}"
        prefixes.append(candidate)
    return prefixes


def plan_discovered(discoveries: Sequence[Discovery], outdir: Path) -> list[WorkItem]:
    """Work items for discovered pairings, mirroring each SRC tree under OUTDIR (prefixed by the SRC
    folder's name when there are several): `<folder>/<caffemodel stem>.{prototxt,caffemodel}`.
    A caffemodel found under several roots is kept once (first root). Sorted by key."""
    items, seen = [], set()
    for found, prefix in zip(discoveries, source_prefixes([d.root for d in discoveries]), strict=True):
        for pairing in found.pairings:
            resolved = pairing.caffemodel.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            relative = pairing.caffemodel.relative_to(found.root).with_suffix("")
            key = PurePosixPath(prefix, *relative.parts) if prefix else PurePosixPath(*relative.parts)
            items.append(_item(key, outdir, pairing.prototxt, pairing.caffemodel, pairing.problem))
    return sorted(items, key=lambda item: item.key)


def plan_manifest(entries: Sequence[ManifestEntry], manifest: Path, outdir: Path) -> list[WorkItem]:
    """Work items for manifest entries. The key is `out` (a path relative to OUTDIR, a .prototxt or
    .caffemodel suffix dropped), else the caffemodel's path relative to the manifest's folder
    without suffix, else (caffemodel outside that folder) its stem. Sorted by key."""
    base = Path(manifest).parent.resolve()
    items = []
    for entry in entries:
        if entry.out:
            key = PurePosixPath(entry.out.replace("\\", "/"))
            if key.suffix.lower() in (PROTOTXT_SUFFIX, CAFFEMODEL_SUFFIX):
                key = key.with_suffix("")
            if key.is_absolute() or ".." in key.parts or not key.name:
                raise BatchUsageError(f"{manifest}: out '{entry.out}' must be a relative path inside OUTDIR")
        else:
            try:
                key = PurePosixPath(*entry.caffemodel.resolve().relative_to(base).with_suffix("").parts)
            except ValueError:
                key = PurePosixPath(entry.caffemodel.stem)
        items.append(_item(key, outdir, entry.prototxt, entry.caffemodel, None))
    return sorted(items, key=lambda item: item.key)


def check_outputs(items: Sequence[WorkItem], protected: Iterable[Path] = ()) -> None:
    """Refuse (BatchUsageError) two items writing the same file, and any output that is an input of
    an item or one of the `protected` source files."""
    sources = {Path(p).resolve() for p in protected}
    for item in items:
        sources.update(p.resolve() for p in (item.prototxt, item.caffemodel) if p is not None)
    writers: dict[Path, str] = {}
    for item in items:
        for out in (item.out_prototxt, item.out_caffemodel):
            resolved = out.resolve()
            if resolved in sources:
                raise BatchUsageError(f"{out}: would overwrite a source file; choose an OUTDIR outside the sources")
            if resolved in writers:
                raise BatchUsageError(
                    f"{out}: written by both '{writers[resolved]}' and '{item.key}'; give distinct out names"
                )
            writers[resolved] = item.key


def parse_shard(text: str) -> tuple[int, int]:
    """`i/n` with 1 <= i <= n, as (i, n); raises ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"shard '{text}' is not of the form i/n (e.g. 2/8)")
    index, count = int(match.group(1)), int(match.group(2))
    if not 1 <= index <= count:
        raise ValueError(f"shard '{text}': need 1 <= i <= n")
    return index, count


def shard(items: Sequence[WorkItem], index: int, count: int) -> list[WorkItem]:
    """Shard `index` of `count` (1-based) of the sorted work list: positions p with p % count == index - 1."""
    return [item for position, item in enumerate(items) if position % count == index - 1]


def is_up_to_date(item: WorkItem) -> bool:
    """Both outputs exist and are newer than both inputs (outputs are written by renaming a complete
    temporary file, so an existing output is complete)."""
    try:
        inputs = max(p.stat().st_mtime_ns for p in (item.prototxt, item.caffemodel) if p is not None)
        outputs = min(p.stat().st_mtime_ns for p in (item.out_prototxt, item.out_caffemodel))
    except (OSError, ValueError):
        return False
    return item.prototxt is not None and outputs > inputs


# --- running ------------------------------------------------------------------------------------


class Status(StrEnum):
    """What became of a deployment."""

    CONVERTED = "converted"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass
class ItemResult:
    """What became of one deployment: a row of the report."""

    key: str
    prototxt: str | None
    caffemodel: str
    outputs: list[str]
    status: Status
    reason: str | None = None
    layers_before: int | None = None
    layers_after: int | None = None
    folds: dict[str, int] = field(default_factory=dict)  # actions by rule
    max_verify_error: float | None = None  # max relative error of the gating blobs, when verified
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Status) else v) for k, v in asdict(self).items()}


def item_result(item: WorkItem, status: Status, reason: str | None = None, **details: object) -> ItemResult:
    """An ItemResult for `item` with the given status (and details)."""
    outputs = [str(item.out_prototxt), str(item.out_caffemodel)]
    prototxt = str(item.prototxt) if item.prototxt is not None else None
    return ItemResult(item.key, prototxt, str(item.caffemodel), outputs, status, reason, **details)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def convert_item(item: WorkItem, verify: bool = False, tolerance: float = VERIFY_TOLERANCE) -> ItemResult:
    """Merge one deployment into its outputs (replacing them if they exist: `main` decides up front
    whether that is wanted), verify it on OpenCV when asked; never raises: any error becomes a failed
    result with a one-line reason. A deployment that fails verification has its outputs removed, so
    that `--skip-existing` retries it."""
    start = time.perf_counter()
    if item.problem is not None:
        return item_result(item, Status.FAILED, item.problem)
    details: dict[str, object] = {}
    try:
        from .pipeline import merge  # loaded here, so that --help needs no numpy

        item.out_prototxt.parent.mkdir(parents=True, exist_ok=True)
        result = merge(item.prototxt, item.caffemodel, item.out_prototxt, item.out_caffemodel, overwrite=True)
        details["layers_before"] = sum(result.layers_before.values())
        details["layers_after"] = sum(result.layers_after.values())
        details["folds"] = dict(sorted(Counter(str(a.rule) for a in result.plan.actions).items()))
        if verify:
            error = max_verify_error(item)
            details["max_verify_error"] = error
            if not error <= tolerance:
                _remove_outputs(item)
                reason = f"verification failed: max relative error {error:.3g} > {tolerance:g} (outputs removed)"
                return _finish(item, Status.FAILED, reason, start, details)
    except Exception as err:  # one bad deployment never stops the others
        if "layers_before" in details:  # merged, then verification could not run
            _remove_outputs(item)
        reason = str(err) if isinstance(err, MergeError) else f"internal error: {type(err).__name__}: {err}"
        return _finish(item, Status.FAILED, _one_line(reason), start, details)
    return _finish(item, Status.CONVERTED, None, start, details)


def _finish(item: WorkItem, status: Status, reason: str | None, start: float, details: dict) -> ItemResult:
    return item_result(item, status, reason, seconds=round(time.perf_counter() - start, 4), **details)


def max_verify_error(item: WorkItem) -> float:
    """Max relative error of the merged outputs of `item` against its inputs on OpenCV dnn,
    over the blobs that decide pass / fail."""
    from .verification import verify

    return verify((item.prototxt, item.caffemodel), (item.out_prototxt, item.out_caffemodel), "opencv").max_relative


def _remove_outputs(item: WorkItem) -> None:
    for out in (item.out_prototxt, item.out_caffemodel):
        out.unlink(missing_ok=True)


def _init_worker(verify: bool) -> None:
    """Worker processes: one BLAS / OpenMP / OpenCV thread each (unless set otherwise), so that N
    workers use N cores, not N * cores. (The BLAS settings take effect when numpy was not loaded yet,
    as in `merge-bn batch`, whose own process leaves it to the workers.)"""
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    if verify:
        try:
            import cv2

            cv2.setNumThreads(1)
        except ImportError:
            pass  # reported per item by verify


def run_items(
    items: Sequence[WorkItem],
    jobs: int = 1,
    verify: bool = False,
    on_result: Callable[[ItemResult], None] | None = None,
) -> list[ItemResult]:
    """Convert `items` (in this process when `jobs` is 1, else in `jobs` worker processes); call
    `on_result` as each finishes; return the results in the order of `items`. Items whose worker
    process died (a crash in native code) are retried alone, each in a fresh process."""
    results: dict[str, ItemResult] = {}

    def done(result: ItemResult) -> None:
        results[result.key] = result
        if on_result is not None:
            on_result(result)

    if jobs <= 1 or len(items) <= 1:
        for item in items:
            done(convert_item(item, verify))
    else:
        crashed = _run_pool(items, min(jobs, len(items)), verify, done)
        for item in crashed:
            again = _run_pool([item], 1, verify, done)
            if again:
                done(item_result(item, Status.FAILED, "the worker process died converting it (crash in native code?)"))
    return [results[item.key] for item in items]


def _run_pool(items: Sequence[WorkItem], jobs: int, verify: bool, done: Callable[[ItemResult], None]) -> list[WorkItem]:
    """Run `items` on a pool of `jobs` processes; return those lost to a dead worker."""
    crashed = []
    context = multiprocessing.get_context(START_METHOD)
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(verify,)) as pool:
        futures = {pool.submit(convert_item, item, verify): item for item in items}
        try:
            for future in as_completed(futures):
                item = futures[future]
                try:
                    result = future.result()
                except BrokenProcessPool:
                    crashed.append(item)
                    continue
                except Exception as err:  # e.g. a result that cannot be sent back
                    result = item_result(item, Status.FAILED, _one_line(f"internal error: {type(err).__name__}: {err}"))
                done(result)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return crashed


# --- reporting ----------------------------------------------------------------------------------


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
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        temporary.write_text(json.dumps(report, indent=2) + "\n")
        temporary.replace(path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        raise BatchUsageError(f"{path}: cannot write the report ({err.strerror})") from None


class Console:
    """Notes, failures and the final table (rich): notes and errors on stderr, the table on stdout."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console as RichConsole

        self.quiet = quiet
        self.out, self.err = RichConsole(width=TABLE_WIDTH), RichConsole(stderr=True)

    def note(self, text: str) -> None:
        """A line on stderr, unless quiet."""
        if not self.quiet:
            self.error(text)

    def error(self, text: str) -> None:
        """A line on stderr, always."""
        self.err.print(text, markup=False, highlight=False, soft_wrap=True)

    def progress(self, total: int) -> "Progress":
        """A progress bar on stderr (none when quiet)."""
        return Progress(None if self.quiet else self.err, total)

    def table(self, results: Sequence[ItemResult], every: bool) -> None:
        """A table of the failed deployments (of all when `every`), then each failure's reason on a
        line of its own; when quiet, only those lines, on stderr."""
        failures = [f"failed: {r.key}: {r.reason}" for r in results if r.status is Status.FAILED]
        if self.quiet:
            for line in failures:
                self.error(f"merge-bn batch: {line}")
            return
        rows = [r for r in results if every or r.status is Status.FAILED]
        if rows:
            from rich.table import Table
            from rich.text import Text

            table = Table(title="merge-bn batch" if every else "merge-bn batch: failed deployments")
            for column, justify in TABLE_COLUMNS:
                table.add_column(column, justify=justify, overflow="fold", no_wrap=column != "deployment")
            for r in rows:
                cells = [Text(cell) for cell in _row(r)]
                cells[1].stylize(STATUS_STYLES[r.status])
                table.add_row(*cells)
            self.out.print(table)
        for line in failures:
            self.out.print(line, markup=False, highlight=False, soft_wrap=True)


TABLE_COLUMNS = (
    ("deployment", "left"),
    ("status", "left"),
    ("layers", "right"),
    ("folds", "left"),
    ("verify err", "right"),
    ("seconds", "right"),
)
TABLE_WIDTH = 100  # as `merge-bn`'s tables
EVERY_ROW_UP_TO = 25  # larger runs list only failures in the table, unless --verbose
STATUS_STYLES = {Status.CONVERTED: "green", Status.SKIPPED: "dim", Status.FAILED: "bold red"}


def _row(r: ItemResult) -> list[str]:
    """The table cells of one deployment, as plain text."""
    layers = f"{r.layers_before} -> {r.layers_after}" if r.layers_before is not None else ""
    folds = ", ".join(f"{n} {rule}" for rule, n in r.folds.items())
    error = f"{r.max_verify_error:.2g}" if r.max_verify_error is not None else ""
    return [r.key, str(r.status), layers, folds, error, f"{r.seconds:.2f}"]


class Progress:
    """A progress bar with counts of converted / skipped / failed deployments (nothing when quiet)."""

    def __init__(self, console: object | None, total: int) -> None:
        self.counts: Counter[str] = Counter()
        self.bar = self.task = None
        if console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("converting"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[counts]}"),
                TimeElapsedColumn(),
                console=console,
                auto_refresh=False,  # redrawn on each result: no thread of its own while workers fork
            )
            self.task = self.bar.add_task("convert", total=total, counts=self._counts())

    def _counts(self) -> str:
        return f"[green]{self.counts['converted']} done[/] [red]{self.counts['failed']} failed[/]" + (
            f" [dim]{self.counts['skipped']} skipped[/]" if self.counts["skipped"] else ""
        )

    def __enter__(self) -> "Progress":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def advance(self, result: ItemResult) -> None:
        self.counts[str(result.status)] += 1
        if self.bar is not None:
            self.bar.update(self.task, advance=1, counts=self._counts(), refresh=True)


# --- the command --------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not '{text}'")
    return value


def _shard_arg(text: str) -> tuple[int, int]:
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
        epilog="Exit status: 0 all converted or skipped, 1 some deployment failed, 2 usage error. "
        "--shard i/n keeps the items at positions p (from 0) of the sorted work list with p % n == i-1, "
        "so the n shards of a job array partition the fleet.",
    )
    parser.add_argument("sources", nargs="*", type=Path, metavar="SRC", help="folders to search (recursively)")
    parser.add_argument("--out", required=True, type=Path, metavar="OUTDIR", help="folder for the merged models")
    parser.add_argument(
        "--jobs",
        type=_positive,
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
        help="run each merged model against its original on OpenCV dnn; "
        f"fail above {VERIFY_TOLERANCE:g} relative error",
    )
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
        "--shard", type=_shard_arg, metavar="i/n", help="process only shard i of n (1-based) of the sorted work list"
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print nothing but failures")
    verbosity.add_argument(
        "-v", "--verbose", action="store_true", help="list every note and every deployment in the table"
    )
    return parser


@dataclass
class WorkList:
    """The full sorted work list and the notes made while building it."""

    items: list[WorkItem]
    notes: list[str]
    protected: set[Path] = field(default_factory=set)  # source files (resolved): never written

    @property
    def outputs(self) -> set[Path]:
        return {p.resolve() for item in self.items for p in (item.out_prototxt, item.out_caffemodel)}


def build_work_list(sources: Sequence[Path], outdir: Path, manifest: Path | None = None) -> WorkList:
    """Discover (or read the manifest), plan outputs and check them; raises BatchUsageError."""
    outdir = Path(outdir)
    if manifest is not None:
        if sources:
            raise BatchUsageError("give SRC folders or --manifest, not both")
        items = plan_manifest(read_manifest(manifest), manifest, outdir)
        protected = {Path(manifest).resolve()} | _inputs(items)
        check_outputs(items, protected)
        return WorkList(items, [], protected)
    if not sources:
        raise BatchUsageError("no SRC folder given (or --manifest)")
    for source in sources:
        if not Path(source).is_dir():
            raise BatchUsageError(f"{source}: not a folder")
        if Path(source).resolve() == outdir.resolve():
            raise BatchUsageError(f"{source}: OUTDIR is a source folder; choose another --out")
    roots = list(dict.fromkeys(Path(s) for s in sources))
    discoveries = [discover(root, ignore=[outdir]) for root in roots]
    items = plan_discovered(discoveries, outdir)
    if not items:
        raise BatchUsageError(f"found no caffemodel under {', '.join(map(str, roots))}")
    protected = set().union(*(d.files for d in discoveries)) | _inputs(items)
    check_outputs(items, protected)
    return WorkList(items, [note for d in discoveries for note in d.notes], protected)


def _inputs(items: Iterable[WorkItem]) -> set[Path]:
    return {p.resolve() for item in items for p in (item.prototxt, item.caffemodel) if p is not None}


def main(argv: Sequence[str] | None = None) -> int:
    """Run `merge-bn batch`; return the exit status (0 all converted or skipped, 1 some failed, 2 usage)."""
    args = build_parser().parse_args(argv)
    console = Console(args.quiet)
    start = time.perf_counter()
    try:
        work, items = _prepare(args)
    except (BatchUsageError, OSError) as err:
        console.error(f"merge-bn batch: error: {err}")
        return 2
    _show_notes(console, work.notes, args.verbose)
    try:
        results = _convert(args, console, items)
    except KeyboardInterrupt:
        console.error("merge-bn batch: interrupted")
        return 130
    seconds = time.perf_counter() - start
    console.table(results, every=args.verbose or len(results) <= EVERY_ROW_UP_TO)
    if args.report is not None:
        try:
            write_report(args.report, make_report(results, work.notes, seconds, **_run_settings(args, work)))
        except BatchUsageError as err:
            console.error(f"merge-bn batch: error: {err}")
            return 2
    counts = Counter(str(r.status) for r in results)
    summary = ", ".join(f"{counts[str(s)]} {s}" for s in Status)
    console.note(
        f"{len(results)} deployments: {summary} in {seconds:.1f} s" + (f"; report {args.report}" if args.report else "")
    )
    return 1 if counts["failed"] else 0


def _prepare(args: argparse.Namespace) -> tuple[WorkList, list[WorkItem]]:
    """The work list and this shard of it, once every usage check has passed (raises BatchUsageError)."""
    work = build_work_list(args.sources, args.out, args.manifest)
    if args.report is not None and args.report.resolve() in work.protected | work.outputs:
        raise BatchUsageError(f"{args.report}: the report would overwrite a source file or an output")
    if args.report is not None and not args.report.resolve().parent.is_dir():
        raise BatchUsageError(f"{args.report}: folder {args.report.parent} does not exist")
    if args.verify and importlib.util.find_spec("cv2") is None:
        raise BatchUsageError("--verify needs OpenCV: pip install 'caffe-bn-merge[verify]'")
    items = shard(work.items, *args.shard) if args.shard else work.items
    existing = [out for item in items for out in (item.out_prototxt, item.out_caffemodel) if out.exists()]
    if existing and not (args.force or args.skip_existing):
        raise BatchUsageError(
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


def _convert(args: argparse.Namespace, console: "Console", items: Sequence[WorkItem]) -> list[ItemResult]:
    """Skip what is up to date (with --skip-existing), convert the rest; results sorted by key."""
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
        results += run_items(todo, args.jobs, args.verify, progress.advance)
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
        "tolerance": VERIFY_TOLERANCE if args.verify else None,
        "skip_existing": args.skip_existing,
        "force": args.force,
        "work_list": len(work.items),
    }
