"""What a batch run shows a person: notes, warnings (named by deployment) and failures on stderr,
a progress bar, the final table (fitted to the terminal, down to 80 columns) and the closing line."""

from collections import Counter
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from ..display import live_log, make_console, message
from ..fitting import fold_name
from .pool import ItemResult, Status

if TYPE_CHECKING:
    from rich.console import Console as RichConsole


class Console:
    """Notes, failures and the final table (rich): notes and errors on stderr, the table on stdout."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    @cached_property
    def out(self) -> "RichConsole":  # rich loads when first printed to: a quiet run may never load it
        return make_console()

    @cached_property
    def err(self) -> "RichConsole":
        return make_console(stderr=True)

    def note(self, text: str) -> None:
        """A line on stderr, unless quiet."""
        if not self.quiet:
            self.error(text)

    def error(self, text: str) -> None:
        """A line on stderr, always."""
        message(self.err, text)

    def progress(self, total: int) -> "Progress":
        """A progress bar on stderr (none when quiet or not a terminal) and each deployment's
        warnings, named (none when quiet)."""
        return Progress(None if self.quiet else self.err, total)

    def summary(self, results: Sequence[ItemResult], seconds: float, report: Path | None, unread: int = 0) -> None:
        """The closing line: how many deployments became what, how long it took, how many files or
        folders could not be read, where the report is."""
        counts = Counter(str(r.status) for r in results)
        done = ", ".join(f"{counts[str(s)]} {s}" for s in Status)
        noun = "deployment" if len(results) == 1 else "deployments"
        not_read = f"; {unread} files or folders not read" if unread else ""
        where = f"; report {report}" if report else ""
        self.note(f"{len(results)} {noun}: {done} in {seconds:.1f} s{not_read}{where}")

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
            title = "merge-bn batch" if every else "merge-bn batch: failed deployments"
            self.out.print(_table(title, rows, self.out.width))
        for line in failures:
            message(self.out, line)


TABLE_COLUMNS = (
    ("deployment", "left"),
    ("status", "left"),
    ("layers", "right"),
    ("folds", "left"),
    ("verify", "right"),  # the largest relative error, with --verify
    ("seconds", "right"),
)
EVERY_ROW_UP_TO = 25  # larger runs list only failures in the table, unless --verbose
STATUS_STYLES = {Status.CONVERTED: "green", Status.SKIPPED: "dim", Status.FAILED: "bold red"}


NAME_WIDTH = 16  # columns deployment names get at least (folded after a separator to fit)
FOLDS_WIDTH = 14  # columns the folds get, if they need them, before names take what is left
FOLDS, NAMES = 3, 0  # the two columns that fold: names at separators, folds at spaces


def _table(title: str, rows: Sequence[ItemResult], width: int) -> "Table":  # noqa: F821 (rich is lazy)
    """The table of `rows` in `width` columns: every column but the names and the folds as wide as
    its widest cell; those two share what is left, names folded after a separator, never mid-word."""
    from rich.table import Table
    from rich.text import Text

    cells = [_row(r) for r in rows]
    widths = [max(len(header), *(len(row[i]) for row in cells)) for i, (header, _) in enumerate(TABLE_COLUMNS)]
    folds_least = max((len(word) + 1 for row in cells for word in row[FOLDS].split()), default=len("folds"))
    free = width - (3 * len(widths) + 1) - sum(widths) + widths[NAMES] + widths[FOLDS]  # cells, padding, rules
    folds_wanted = min(widths[FOLDS], max(folds_least, FOLDS_WIDTH))  # before names get the rest
    widths[NAMES] = min(widths[NAMES], max(NAME_WIDTH, free - folds_wanted))
    widths[FOLDS] = max(folds_least, min(widths[FOLDS], free - widths[NAMES]))
    table = Table(title=title)
    for (column, justify), size in zip(TABLE_COLUMNS, widths, strict=True):
        table.add_column(column, justify=justify, width=size, no_wrap=column != "folds")
    for r, row in zip(rows, cells, strict=True):
        row[NAMES] = fold_name(row[NAMES], widths[NAMES])
        texts = [Text(cell) for cell in row]
        texts[1].stylize(STATUS_STYLES[r.status])
        table.add_row(*texts)
    return table


def _row(r: ItemResult) -> list[str]:
    """The table cells of one deployment, as plain text."""
    layers = f"{r.layers_before} -> {r.layers_after}" if r.layers_before is not None else ""
    folds = ", ".join(f"{n} {rule}" for rule, n in r.folds.items())
    error = f"{r.max_verify_error:.2g}" if r.max_verify_error is not None else ""
    return [r.key, str(r.status), layers, folds, error, f"{r.seconds:.2f}"]


def fleet_lines(totals: dict) -> list[str]:
    """The fleet totals of `report.fleet_totals` as lines for the console."""
    lines = []
    if totals["quant"]:
        q = totals["quant"]
        lines.append(
            f"int8 readiness: {q['deployments_flagged']} of {q['deployments']} deployments have flagged layers "
            f"({q['flagged_layers']} layers; --report lists them)"
        )
    if totals["benchmark"]:
        b = totals["benchmark"]
        lines.append(f"speed: merged / original forward time {b['median_ratio']:.3f} (median of {b['deployments']})")
    return lines


class Progress:
    """A progress bar with counts of converted / skipped / failed deployments, on a terminal, and
    each deployment's warnings above it, named (nothing when quiet)."""

    def __init__(self, console: object | None, total: int) -> None:
        self.counts: Counter[str] = Counter()
        self.console = console
        self._log = live_log(None, verbose=False, quiet=True)  # warnings come named, with each result
        self.bar = self.task = None
        if console is not None and console.is_terminal:
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
        self._log.__enter__()
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
        self._log.__exit__(*exc)

    def advance(self, result: ItemResult) -> None:
        self.counts[str(result.status)] += 1
        if self.console is not None:
            for text in result.warnings:
                message(self.console, f"warning: {result.key}: {text}", "yellow")
        if self.bar is not None:
            self.bar.update(self.task, advance=1, counts=self._counts(), refresh=True)
