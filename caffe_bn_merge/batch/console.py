"""What a batch run shows a person: notes and failures on stderr, a progress bar, the final table."""

from collections import Counter
from collections.abc import Sequence

from ..defaults import TABLE_WIDTH
from .pool import ItemResult, Status


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
EVERY_ROW_UP_TO = 25  # larger runs list only failures in the table, unless --verbose
STATUS_STYLES = {Status.CONVERTED: "green", Status.SKIPPED: "dim", Status.FAILED: "bold red"}


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
