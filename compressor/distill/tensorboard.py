"""TensorBoard scalars: one run folder per trained model (``DIR/teacher-NAME``,
``DIR/NAME-METHOD``), one point per epoch for every number of the epoch's metrics record
(loss terms, train and test top-1, learning rate, images/s), written through
``torch.utils.tensorboard``. The ``tensorboard`` package is an optional extra."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from compressor import fileio
from compressor.errors import ConfigError, OutputError

Record = dict[str, float]


def _tag(key: str) -> str:
    """``train_loss`` → ``train/loss``, ``test_top1`` → ``test/top1``; the rest as they are."""
    for split in ("train", "test"):
        if key.startswith(split + "_"):
            return f"{split}/{key[len(split) + 1:]}"
    return key


def _unwritable(exc: OSError, folder: Path, kept: str) -> OutputError:
    why = fileio.output_error(exc, folder)
    reason = str(why).split("; ")[0] if why is not None else f"cannot write TensorBoard scalars to {folder} ({exc.strerror or exc})"
    return OutputError(f"{reason}; {kept}")


def check_tensorboard(log_dir: str | Path | None = None) -> None:
    """Before any training: the package is installed and ``log_dir`` is a folder that can be written."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package; pip install 'atc[tensorboard]'") from None
    if log_dir is not None:
        if Path(log_dir).exists() and not Path(log_dir).is_dir():
            raise OutputError(f"--tensorboard {log_dir} is a file; pass a folder")
        fileio.check_writable(log_dir)


def _quiet_writer_threads() -> None:
    """TensorBoard writes in a background thread that, when a write fails (a full disk), prints its
    traceback and re-raises the error at the next write in the main thread. The main thread's
    one-line error is enough: the writer threads' own tracebacks are not printed (other threads'
    are, as before)."""
    previous = threading.excepthook
    if getattr(previous, "atc_quiet_tensorboard", False):
        return

    def hook(args):
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    hook.atc_quiet_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def epoch_logger(log_dir: str | Path | None, run: str) -> Callable[[Record], None] | None:
    """A callback that writes one epoch's record as scalars under ``log_dir/run``; None without ``log_dir``."""
    if log_dir is None:
        return None
    check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(log_dir) / run.replace(" ", "_").replace("+", "_")
    _quiet_writer_threads()
    try:
        writer = SummaryWriter(str(folder))
    except OSError as exc:  # it writes the event file's header at once
        raise _unwritable(exc, folder, "nothing was trained yet") from None

    def log(record: Record) -> None:
        step = int(record["epoch"])
        try:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    writer.add_scalar(_tag(key), float(value), step)
            writer.flush()
        except OSError as exc:
            raise _unwritable(exc, folder, f"the training state of epoch {step} is saved, so --resume continues "
                                           "(with another --tensorboard folder, or without it)") from None

    return log
