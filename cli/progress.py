"""A rich progress reporter on stderr, so that --json output on stdout stays clean."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from compressor.events import Reporter

stderr = Console(stderr=True)
if not stderr.is_terminal:
    stderr = Console(stderr=True, width=200)  # logs: one message per line, not wrapped at 80 columns


class RichReporter(Reporter):
    def __init__(self, console: Console = stderr, quiet: bool = False):
        self.console, self.quiet = console, quiet
        self._progress: Progress | None = None
        self._task = None

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]›[/dim] {message}", highlight=False)

    def task(self, description: str, total: int) -> None:
        if self.quiet:
            return
        if self._progress is not None:  # one bar at a time: a task started inside another replaces it
            self._progress.stop()
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                  TimeRemainingColumn(), console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, status="")

    def advance(self, steps: int = 1, **fields: float) -> None:
        if self._progress is not None:
            status = "  ".join(f"{k} {v:.3g}" if k != "img_s" else f"{v:,.0f} img/s" for k, v in fields.items())
            self._progress.update(self._task, advance=steps, status=status)

    def status(self, message: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, status=message)

    def done(self, summary: str = "") -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if summary:
            self.info(summary)
