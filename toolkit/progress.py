"""Progress of long work, reported by the library and drawn (or not) by the CLI.

Library functions take an optional `Reporter` instead of printing. The CLI passes one that draws
rich progress bars on stderr, or none with `--quiet` or when stderr is not a terminal.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

POLL_SECONDS = 0.1


class Reporter(Protocol):
    shows_bars: bool  # whether progress bars are wanted (a terminal, not --quiet); tools' own bars follow it

    def start(self, label: str, total: int) -> None: ...
    def advance_to(self, done: int) -> None: ...
    def finish(self) -> None: ...
    def note(self, message: str) -> None: ...


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


class RichReporter:
    """Byte progress bars on stderr, one per step; messages above them."""

    shows_bars = True

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        self._console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True), TimeElapsedColumn(),
            console=self._console, transient=False,
        )
        self._task: Any = None

    def start(self, label: str, total: int) -> None:
        if self._task is None:
            self._progress.start()
        else:
            self._progress.stop_task(self._task)
        self._task = self._progress.add_task(label, total=max(total, 1))

    def advance_to(self, done: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=done)

    def finish(self) -> None:
        if self._task is not None:
            self._progress.stop()
            self._task = None

    def note(self, message: str) -> None:
        self._console.print(message, markup=False, highlight=False)


class PlainReporter:
    """No bars (quiet, or not a terminal): step notes only, as plain lines on stderr."""

    shows_bars = False

    def __init__(self, quiet: bool) -> None:
        self._quiet = quiet

    def start(self, label: str, total: int) -> None:
        pass

    def advance_to(self, done: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def note(self, message: str) -> None:
        if not self._quiet:
            import click

            click.echo(message, err=True)


def make_reporter(quiet: bool) -> Reporter:
    import sys

    if not quiet and sys.stderr.isatty():
        return RichReporter()
    return PlainReporter(quiet)
