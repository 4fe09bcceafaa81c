"""The live display of `merge-bn` and `merge-bn batch`, and the one place that knows it: consoles
sized to the terminal (tables fit it, down to 80 columns; piped, message lines are never broken),
the logging handler that shows every warning once, above any progress bar, and a progress bar for
work that takes more than a second (terminals only). Tables themselves are built by `report` and
`batch.console`; rich is imported only once something is shown, so `--help` stays fast."""

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .defaults import TABLE_WIDTH
from .io.outputs import signals_held
from .logs import LOGGER

if TYPE_CHECKING:
    from rich.console import Console

    from .pipeline import MergeResult
    from .verification.compare import VerifyResult

SHOW_AFTER = 1.0  # seconds of work before a progress bar appears


def make_console(stderr: bool = False) -> "Console":
    """A console for stdout (or stderr): on a terminal, as wide as the terminal (or `COLUMNS`);
    piped, `COLUMNS` or 100 columns for tables. Print message lines with `message`, so that piped,
    a path is never broken across lines."""
    from rich.console import Console

    class PipeConsole(Console):
        def on_broken_pipe(self) -> None:  # rich would exit 1; the CLI says so in one line, exit 2
            raise BrokenPipeError

    probe = PipeConsole(stderr=stderr)
    if probe.is_terminal:
        return probe
    return PipeConsole(stderr=stderr, width=_columns() or TABLE_WIDTH)


def end_on_closed_stream(line: str) -> int:
    """After a write to a closed pipe (`merge-bn ... | head`): `line` on stderr, unless stderr is
    the closed one, and both standard streams sent to os.devnull, so that the exit writes nothing
    more; returns 2, the exit status."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    try:
        print(line, file=sys.stderr, flush=True)
    except BrokenPipeError:
        os.dup2(devnull, sys.stderr.fileno())
    os.close(devnull)
    return 2


def _columns() -> int | None:
    value = os.environ.get("COLUMNS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def message(console: "Console", text: str, style: str | None = None) -> None:
    """A line of text, never read as markup: wrapped at the terminal's width, and never wrapped at
    all when not a terminal (so a long path stays whole for whatever reads it)."""
    from rich.text import Text

    # styled as a Text, not through print's style, which would also colour a live bar redrawn below
    console.print(Text(text, style=style or ""), soft_wrap=not console.is_terminal)


class LiveLog(logging.Handler):
    """Shows each distinct log message once, on `console` (above a live progress bar: rich keeps
    the bar below what is printed), from `level` up; warnings are prefixed and kept in `warnings`
    for the report, shown or not."""

    def __init__(self, console: "Console | None", level: int) -> None:
        super().__init__(logging.DEBUG)
        self.console, self.level_shown = console, level
        self.warnings: list[str] = []
        self._seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text in self._seen:
            return
        self._seen.add(text)
        if record.levelno >= logging.WARNING:
            self.warnings.append(text)
        if self.console is not None and record.levelno >= self.level_shown:
            warning = record.levelno >= logging.WARNING
            message(self.console, f"warning: {text}" if warning else text, "yellow" if warning else None)


@contextmanager
def live_log(console: "Console | None", verbose: bool, quiet: bool) -> Iterator[LiveLog]:
    """Route the package's log through a `LiveLog` while open: the step log with `verbose`, nothing
    but errors with `quiet` (warnings are still kept), else warnings."""
    shown = logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
    handler = LiveLog(console, shown)
    logger = logging.getLogger(LOGGER)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(min(shown, logging.WARNING))
    logger.propagate = False  # shown here, not again by a root handler
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


class StepProgress:
    """The current step of one merge and a bar of the bytes written, drawn on a terminal once the
    work has taken `SHOW_AFTER` seconds, and gone when done (nothing at all when piped or quiet)."""

    def __init__(self, console: "Console | None") -> None:
        self.bar = self.task = None
        if console is None or not console.is_terminal:
            return
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[amount]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task = self.bar.add_task("starting ...", total=None, amount="")
        self._lock = threading.Lock()
        self._shown = self._closed = False
        self._timer = threading.Timer(SHOW_AFTER, self._show)
        self._timer.daemon = True

    def _show(self) -> None:
        with self._lock:
            if not self._closed:
                self.bar.start()
                self._shown = True

    def __enter__(self) -> "StepProgress":
        if self.bar is not None:
            with signals_held():  # starting a thread waits on a Python-level lock
                self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is None:
            return
        with self._lock, signals_held():  # as do ending the timer and the bar's own thread
            self._closed = True
            self._timer.cancel()
            if self._shown:
                self.bar.stop()

    def step(self, name: str) -> None:
        """A new step begins (its amount of work not known yet)."""
        logging.getLogger(LOGGER).info("%s ...", name)
        if self.bar is not None:  # a new task: its amount of work is not known yet
            self.bar.remove_task(self.task)
            self.task = self.bar.add_task(f"{name} ...", total=None, amount="")

    def advance(self, done: int, total: int) -> None:
        """`done` of `total` bytes of the current step are through."""
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total, amount=f"{done / 1e6:.0f}/{total / 1e6:.0f} MB")


def show_result(
    console: "Console", result: "MergeResult", checked: "VerifyResult | None", everything: bool, dry_run: bool
) -> None:
    """The closing output of one merge: layer counts, decisions (every one with `everything`, else
    those that stay), the verify table, and what is true about the outputs."""
    from .report import counts_table, decisions_table, verify_table

    console.print(counts_table(result))
    table = decisions_table(result, everything, console.width)
    if table.row_count:
        console.print(table)
    if checked is not None:
        console.print(verify_table(checked, console.width))
        message(console, f"verify inputs: {checked.inputs}")
        for why in checked.passed_over:
            message(console, f"verify: passed over {why}")
    for line in _summary(result):
        message(console, line)
    if dry_run:
        message(console, "dry run: nothing written")
    elif result.output_model is not None:
        message(console, f"wrote {result.output_model} and {result.output_weights}")
    if checked is not None and not checked.passed:
        message(
            console,
            "the merged model differs from the original: rerun with --no-backward or --keep-standalone "
            "to narrow it down, and please report it",
        )


def _summary(result: "MergeResult") -> list[str]:
    """What is true when something stayed for batch statistics, or nothing folded."""
    from .rules.reasons import Reason

    batch_stats = sum(1 for k in result.plan.kept if any(r.reason is Reason.BATCH_STATS for r in k.refusals))
    lines = []
    if batch_stats:
        lines.append(
            f"{batch_stats} BatchNorm layer{'s' if batch_stats != 1 else ''} use batch statistics at inference "
            "(use_global_stats: false) and were kept; if that was copied from training by mistake, "
            "--assume-global-stats folds them with their stored moving averages"
        )
    if not result.plan.actions:
        lines.append(
            "nothing folded: the merged model computes as the input model"
            if batch_stats
            else "nothing to fold: the merged model is the input model (already merged, or no BatchNorm)"
        )
    return lines
