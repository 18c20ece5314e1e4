"""How the library tells its caller what is happening, without printing itself.

The CLI passes a reporter that draws rich progress bars. Python users get silence by default;
``compress(..., progress=True)`` (and ``train``, ``dry_run``) prints plain progress lines to stderr
(``TextReporter``), or pass ``reporter=`` any object with these four methods:

    class MyReporter(compressor.Reporter):
        def info(self, message): ...                  # one line: what starts, what was found
        def task(self, description, total): ...       # long work of ``total`` steps starts
        def advance(self, steps=1, **fields): ...     # progress; fields: loss terms, img_s, ...
        def done(self, summary=""): ...               # the task ended (summary: one line or "")
        def status(self, message): ...                # optional: the task waits on other work (e.g. testing)

``RunClock`` turns the epochs of a run into an estimate of the time left, said after the first.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


class Reporter:
    """Receives progress and messages; every method is optional to override."""

    def info(self, message: str) -> None:
        pass

    def task(self, description: str, total: int) -> None:
        """A unit of long work starts (e.g. one epoch of ``total`` steps)."""

    def advance(self, steps: int = 1, **fields: float) -> None:
        """Progress within the current task; ``fields`` are loss terms, images/s and the like."""

    def done(self, summary: str = "") -> None:
        """The current task ended."""

    def status(self, message: str) -> None:
        """The current task waits on other work (e.g. the test set after an epoch): say what, where it shows."""


SILENT = Reporter()


class TextReporter(Reporter):
    """Plain lines on a stream (stderr by default): every message, each task as it starts and ends, and its
    progress at most every ``every_s`` seconds. What ``progress=True`` gives Python users."""

    def __init__(self, stream: IO[str] | None = None, every_s: float = 10.0):
        self.stream, self.every_s = stream or sys.stderr, every_s
        self._task: tuple[str, int] | None = None
        self._done, self._last = 0, 0.0

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def info(self, message: str) -> None:
        self._print(message)

    def task(self, description: str, total: int) -> None:
        self._task, self._done, self._last = (description, total), 0, time.monotonic()
        self._print(f"{description} ({total} steps)")

    def advance(self, steps: int = 1, **fields: float) -> None:
        if self._task is None:
            return
        self._done += steps
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            extra = "  ".join(f"{k} {v:.3g}" for k, v in fields.items())
            self._print(f"  {self._task[0]}: {self._done}/{self._task[1]}  {extra}".rstrip())

    def done(self, summary: str = "") -> None:
        self._task = None
        if summary:
            self._print(summary)

    def status(self, message: str) -> None:
        if self._task is not None:
            self._print(f"  {self._task[0]}: {message}")


def reporter_for(reporter: Reporter, progress: bool) -> Reporter:
    """The reporter a public API call uses: the one given, or with ``progress=True`` plain lines on stderr."""
    return TextReporter() if progress and reporter is SILENT else reporter


def duration(seconds: float) -> str:
    """``45 s``, ``3 min 20 s``, ``2 h 05 min``."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class RunClock:
    """The time a run has left: ``epochs`` to train in all (every model of the run), measured per epoch.

    ``start()`` before a model's first epoch; ``epoch_done`` after each. After the run's first epoch it
    says the epoch count and the estimate (epochs left × the mean epoch time so far), and again when
    a later model starts; ``now`` stands in for the clock in tests."""

    def __init__(self, epochs: int, reporter: Reporter = SILENT, now=time.monotonic):
        self.epochs, self.reporter, self.now = epochs, reporter, now
        self.done, self.seconds, self._began = 0, 0.0, None
        self.models = 0

    def start(self) -> None:
        self._began = self.now()
        self.models += 1
        if self.done and self.models > 1:
            self.reporter.info(self.estimate(f"model {self.models}"))

    def epoch_done(self, record: dict[str, Any] | None = None) -> None:
        t = self.now()
        if self._began is not None:
            self.seconds += t - self._began
        self._began = t
        self.done += 1
        if self.done == 1:
            self.reporter.info(self.estimate("after epoch 1"))

    @property
    def left_s(self) -> float:
        return max(self.epochs - self.done, 0) * self.seconds / max(self.done, 1)

    def estimate(self, when: str) -> str:
        left = self.left_s
        at = time.strftime("%H:%M", time.localtime(time.time() + left))
        return (f"run: {self.epochs} epochs in all, {self.done} done; {when}: about {duration(left)} of training left "
                f"(≈ {duration(self.seconds / max(self.done, 1))} per epoch), done training around {at}")


def calls_each(*callbacks):
    """One callback that calls each of ``callbacks`` that is not None (None when none is)."""
    live = [c for c in callbacks if c is not None]
    if not live:
        return None

    def call(*args: Any) -> None:
        for c in live:
            c(*args)

    return call
