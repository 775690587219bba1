"""Console output: one place for log lines, warnings and progress bars (only on rank 0)."""

from __future__ import annotations

import sys
from typing import Literal

from rich.console import Console as RichConsole
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class ProgressBar:
    """One progress bar on stderr (see ``progress_bar``); every method does nothing when it is not shown."""

    def __init__(self, progress: Progress | None, task: TaskID | None):
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

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def progress_bar(
    description: str,
    total: int | None,
    completed: int = 0,
    *,
    enabled: bool = True,
    unit: Literal["items", "bytes"] = "items",
    console: RichConsole | None = None,
) -> ProgressBar:
    """The progress bar every command shows: on stderr, only when ``enabled`` and stderr is a terminal (a
    log file gets no bar), gone when closed. ``unit="bytes"`` shows sizes and transfer speed."""
    console = console or RichConsole(stderr=True)
    if not (enabled and console.is_terminal):
        return ProgressBar(None, None)
    if unit == "bytes":
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
    else:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
    progress = Progress(*columns, console=console, transient=True)
    task = progress.add_task(description, total=total, completed=completed, info="")
    progress.start()
    return ProgressBar(progress, task)


class Console:
    """Rich console on stderr for logs/progress; results go to stdout via ``print_result``."""

    def __init__(self, enabled: bool = True, progress: bool = True):
        self.enabled = enabled
        self.show_progress = progress and enabled
        self.err = RichConsole(stderr=True, highlight=False, soft_wrap=True)

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

    def progress(self, description: str, total: int, completed: int = 0) -> ProgressBar:
        return progress_bar(description, total, completed, enabled=self.show_progress, console=self.err)
