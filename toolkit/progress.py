"""Progress of long work, reported by the library and drawn (or not) by the CLI.

Library functions take an optional `Reporter` instead of printing. The CLI passes one that draws
rich progress bars with the time left on stderr when it is a terminal, plain progress lines when
it is a pipe or a file (a log a person reads later, or follows with `tail -f`), and nothing but
errors with `--quiet`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

POLL_SECONDS = 0.1
# A plain progress line at most this often (seconds): often enough to follow a step of many
# minutes, rare enough that a log stays readable. EDGECDS_PROGRESS_EVERY sets it (0: every update).
PLAIN_EVERY_SECONDS = 10.0
PLAIN_EVERY_ENV = "EDGECDS_PROGRESS_EVERY"
BYTES = "bytes"
ESTIMATED_BYTES = "bytes, estimated"  # a file's size before it is written: the total is said to be an estimate


class Reporter(Protocol):
    shows_bars: bool  # whether progress bars are wanted (a terminal, not --quiet); tools' own bars follow it

    def start(self, label: str, total: int, unit: str = BYTES) -> None: ...
    def advance_to(self, done: int) -> None: ...
    def finish(self) -> None: ...
    def note(self, message: str) -> None: ...


def amount(done: int, total: int, unit: str) -> str:
    """'1.2 of 2.6 GiB', '1.2 of ~2.6 GiB (estimate)', or '3 of 10 cases'."""
    if unit not in (BYTES, ESTIMATED_BYTES):
        return f"{done} of {total} {unit}"
    scale, suffix = (2**30, "GiB") if total >= 2**30 else (2**20, "MiB") if total >= 2**20 else (2**10, "KiB")
    if unit == ESTIMATED_BYTES:
        return f"{done / scale:.1f} of ~{total / scale:.1f} {suffix} (estimate)"
    return f"{done / scale:.1f} of {total / scale:.1f} {suffix}"


def seconds_left(done: int, total: int, elapsed: float) -> float | None:
    """Time left at the pace so far; None before there is a pace to go by."""
    if done <= 0 or elapsed <= 0:
        return None
    return max(total - done, 0) * elapsed / done


def clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def lazy_step(reporter: Reporter | None, label: str, total: int, unit: str = BYTES) -> Callable[[int], None] | None:
    """A progress callback for a step that starts `label` on its first call (so a step that never
    begins, a skipped variant, shows nothing) and ends any step before it."""
    if reporter is None:
        return None
    started = False

    def advance(done: int) -> None:
        nonlocal started
        if not started:
            reporter.finish()
            reporter.start(label, total, unit)
            started = True
        reporter.advance_to(min(done, total))

    return advance


def offset(progress: Callable[[int], None] | None, base: int) -> Callable[[int], None] | None:
    """`progress` for one file among several: its bytes counted after the `base` already done."""
    return None if progress is None else (lambda n: progress(base + n))


def watch_file_growth(wait: Callable[[float], bool], path: Path, expected_bytes: int, reporter: Reporter | None) -> None:
    """Wait until `wait(timeout)` returns True, reporting the size of the file being written.

    The engines write their output progressively, so its size is an honest measure of progress
    that needs no hook into their code. `wait` blocks until the work ends or the timeout passes,
    so the end is seen at once, not at the next poll.
    """
    while not wait(POLL_SECONDS):
        if reporter is not None:
            try:
                reporter.advance_to(min(os.stat(path).st_size, expected_bytes))
            except FileNotFoundError:
                pass
    if reporter is not None:
        reporter.advance_to(expected_bytes)


def time_left(done: int, total: int, elapsed: float | None) -> str:
    """The time-left column: at the pace since the step began. rich's own estimate uses only the
    last 30 s of updates, and shows nothing when steps advance less often, as a large model's do."""
    left = seconds_left(done, total, elapsed or 0.0)
    return clock(left) if left is not None else "-:--:--"


class RichReporter:
    """Progress bars on stderr, one per step, with the time elapsed and left; messages above them."""

    shows_bars = True

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
        from rich.text import Text

        class TimeLeft(ProgressColumn):
            def render(self, task: Any) -> Text:
                return Text(f"{time_left(int(task.completed), int(task.total or 1), task.elapsed)} left", style="progress.remaining")

        self._console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[amount]}"), TimeElapsedColumn(),
            TimeLeft(), console=self._console, transient=False,
        )
        self._task: Any = None
        self._unit = BYTES

    def start(self, label: str, total: int, unit: str = BYTES) -> None:
        if self._task is None:
            self._progress.start()
        else:
            self._progress.stop_task(self._task)
        self._unit = unit
        self._task = self._progress.add_task(label, total=max(total, 1), amount=amount(0, total, unit))

    def advance_to(self, done: int) -> None:
        if self._task is not None:
            total = int(self._progress.tasks[-1].total or 1)
            self._progress.update(self._task, completed=done, amount=amount(done, total, self._unit))

    def finish(self) -> None:
        if self._task is not None:
            self._progress.stop()  # the finished bar stays on screen; the next step draws only its own
            self._progress.remove_task(self._task)
            self._task = None

    def note(self, message: str) -> None:
        self._console.print(message, markup=False, highlight=False)


class PlainReporter:
    """Not a terminal: a line when a step starts, then one at most every PLAIN_EVERY_SECONDS with
    how far it is and the time left. Quiet: nothing at all."""

    shows_bars = False

    def __init__(self, quiet: bool, every: float | None = None) -> None:
        self._quiet = quiet
        if every is None:
            try:
                every = float(os.environ.get(PLAIN_EVERY_ENV, PLAIN_EVERY_SECONDS))
            except ValueError:
                every = PLAIN_EVERY_SECONDS
        self._every = every if math.isfinite(every) and every >= 0 else PLAIN_EVERY_SECONDS
        self._label, self._total, self._unit, self._began, self._last = "", 0, BYTES, 0.0, 0.0

    def _line(self, message: str) -> None:
        if not self._quiet:
            import click

            click.echo(message, err=True)

    def start(self, label: str, total: int, unit: str = BYTES) -> None:
        self._label, self._total, self._unit = label.strip(), max(total, 1), unit
        self._began = self._last = time.monotonic()
        self._line(f"{self._label}: started, {amount(0, self._total, unit).split(' of ', 1)[1]}")

    def advance_to(self, done: int) -> None:
        if not self._label:
            return
        now = time.monotonic()
        if now - self._last < self._every or done >= self._total:
            return
        self._last = now
        left = seconds_left(done, self._total, now - self._began)
        pace = f", about {clock(left)} left" if left is not None else ""
        self._line(f"{self._label}: {100 * done // self._total}% ({amount(done, self._total, self._unit)}){pace}")

    def finish(self) -> None:
        if self._label:
            self._line(f"{self._label}: done in {clock(time.monotonic() - self._began)}")
        self._label = ""

    def note(self, message: str) -> None:
        self._line(message)


def make_reporter(quiet: bool) -> Reporter:
    """The reporter for a command; on a terminal, its display is closed when the command ends,
    however it ends (an error midway must not leave a live bar and a hidden cursor)."""
    import sys

    import click

    if not quiet and sys.stderr.isatty():
        reporter = RichReporter()
        context = click.get_current_context(silent=True)
        if context is not None:
            context.call_on_close(reporter.finish)
        return reporter
    return PlainReporter(quiet)
