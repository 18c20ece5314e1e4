"""How a training run ends early, and what the user is told: a stop signal (SIGINT/SIGTERM, saved
at a step boundary), a loss that went non-finite, or a device out of memory. ``training_failures``
turns each into atc's one-line error naming what was kept and how to continue."""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Callable, Iterator

import torch

from compressor.errors import Interrupted, TrainingError
from compressor.events import Reporter


class StopRequested(Interrupted):
    """SIGINT/SIGTERM arrived; the state was saved at a step boundary."""

    def __init__(self, message: str = "training stopped", signum: int = signal.SIGINT):
        super().__init__(message, signum)


class StopFlag:
    """Records the first SIGINT/SIGTERM instead of dying, so the loop can stop at a step boundary."""

    def __init__(self):
        self.raised: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.raised is not None:  # a second signal: stop now, the last epoch's state is on disk
            raise KeyboardInterrupt
        self.raised = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def stopped(signum: int, when: str, state_path) -> StopRequested:
    return StopRequested(f"stopped by {signal.Signals(signum).name} {when}; the training state is saved in {state_path}; "
                         "run the same command with --resume to continue", signum)


class Diverged(TrainingError):
    """A loss term went NaN or infinite; ``training_failures`` adds where the last good state is."""


def diverged(name: str, value: float, epoch: int, first_step: int, last_step: int) -> Diverged:
    """``epoch`` is 1-based, the steps 0-based; the message counts both from 1."""
    what = "the total loss" if name == "loss" else f"the {name} loss term"
    where = f"step {first_step + 1}" if first_step == last_step else f"steps {first_step + 1}-{last_step + 1}"
    return Diverged(f"training diverged: {what} became {value} at epoch {epoch}, {where}; lower --lr (or distill.beta) and run again")


# torch.OutOfMemoryError is the CUDA allocator's error; older torch only has it under torch.cuda.
_CUDA_OOM = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (_CUDA_OOM, MemoryError)) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def out_of_memory_message(batch_size: int, device: torch.device, epoch: int, kept: str, exc: BaseException) -> str:
    """A suggestion that fits: half the batch, rounded down to a power of two (memory grows with the batch)."""
    where = "CUDA" if device.type == "cuda" or isinstance(exc, _CUDA_OOM) else "the CPU"
    if batch_size <= 1:
        return (f"{where} ran out of memory at epoch {epoch} even with batch size 1; use a smaller model, fewer AT layers "
                f"or another device; {kept}")
    suggest = 1 << ((batch_size // 2).bit_length() - 1)
    return (f"{where} ran out of memory at epoch {epoch} with batch size {batch_size}; try --batch-size {suggest} "
            f"(or --set train.batch_size={suggest}); {kept}")


@contextlib.contextmanager
def training_failures(epoch: int, batch_size: int, device: torch.device, kept: Callable[[], str], state_path,
                      reporter: Reporter) -> Iterator[None]:
    """One epoch's failures as atc errors; ``kept()`` says what is on disk at the time of failure."""
    try:
        yield
    except StopRequested as exc:
        reporter.done()
        raise stopped(exc.signum, f"at epoch {epoch}", state_path) from None
    except Diverged as exc:
        reporter.done()
        raise Diverged(f"{exc}; {kept()}") from None
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        reporter.done()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise TrainingError(out_of_memory_message(batch_size, device, epoch, kept(), exc)) from None
