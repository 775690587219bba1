"""Console output: one place for log lines, warnings and progress bars (only on rank 0)."""

from __future__ import annotations

import sys

from rich.console import Console as RichConsole
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self.progress, self.task = progress, task

    def update(self, completed: int, info: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=completed, info=info)

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class Console:
    """Rich console on stderr for logs/progress; results go to stdout via ``print_result``."""

    def __init__(self, enabled: bool = True, progress: bool = True):
        self.enabled = enabled
        self.show_progress = progress and enabled
        self.err = RichConsole(stderr=True, highlight=False, soft_wrap=True)
        self.out = RichConsole(highlight=False, soft_wrap=True)

    def log(self, message: str) -> None:
        if self.enabled:
            self.err.print(message, markup=False)

    def warn(self, message: str) -> None:
        if self.enabled:
            self.err.print(f"[bold yellow]WARNING:[/] {message}")

    def print_result(self, text: str) -> None:
        if self.enabled:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
            sys.stdout.flush()

    def progress(self, description: str, total: int, completed: int = 0) -> _Bar:
        if not self.show_progress or not self.err.is_terminal:
            return _Bar(None, None)
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.err,
            transient=True,
        )
        task = progress.add_task(description, total=total, completed=completed, info="")
        progress.start()
        return _Bar(progress, task)
