"""Silence torch's exporters and tracers while they run: atc prints its own one-line outcome."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Iterator, Sequence


@contextlib.contextmanager
def quiet(loggers: Sequence[str], level: int = logging.ERROR, stderr: bool = False) -> Iterator[None]:
    """Raise ``loggers`` to ``level``, drop warnings and stdout (and stderr if asked); restore on exit."""
    handles = [logging.getLogger(n) for n in loggers]
    levels = [lg.level for lg in handles]
    for lg in handles:
        lg.setLevel(level)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            if stderr:
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield
    finally:
        for lg, lv in zip(handles, levels):
            lg.setLevel(lv)
