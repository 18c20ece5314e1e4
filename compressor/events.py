"""How the library tells its caller what is happening, without printing itself.

The CLI passes a reporter that draws rich progress bars; Python users get silence by default
or can pass their own object with these methods.
"""

from __future__ import annotations


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


SILENT = Reporter()
