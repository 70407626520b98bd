"""A rich progress bar shared by the commands (a no-op on non-terminals keeps logs clean)."""

from __future__ import annotations

import contextlib

from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None):
    """Yields ``update(done)`` that sets the completed count."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as prog:
        task = prog.add_task(description, total=total)
        yield lambda done: prog.update(task, completed=done)
