"""Rich progress bars and console for long work (quiet when not a terminal is fine)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

import sys

__all__ = ["make_progress", "task"]

# wide enough for result tables when output goes to a file or CI log
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def make_progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


@contextmanager
def task(progress: Progress | None, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(n, description=None)`` callback for one bar (a no-op without a Progress);
    a new ``description`` replaces the bar's label (e.g. to show epsilon spent)."""
    if progress is None:
        yield lambda n=1, description=None: None
        return
    tid = progress.add_task(description, total=total)

    def advance(n: int = 1, description: str | None = None) -> None:
        progress.update(tid, advance=n, **({"description": description} if description else {}))

    yield advance
    progress.update(tid, completed=total)
