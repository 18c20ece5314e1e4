"""TensorBoard scalars: one run folder per trained model (``DIR/teacher-NAME``,
``DIR/NAME-METHOD``), one point per epoch for every number of the epoch's metrics record
(loss terms, train and test top-1, learning rate, images/s), written through
``torch.utils.tensorboard``. The ``tensorboard`` package is an optional extra."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from compressor.errors import ConfigError

Record = dict[str, float]


def _tag(key: str) -> str:
    """``train_loss`` → ``train/loss``, ``test_top1`` → ``test/top1``; the rest as they are."""
    for split in ("train", "test"):
        if key.startswith(split + "_"):
            return f"{split}/{key[len(split) + 1:]}"
    return key


def check_tensorboard() -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package; pip install 'atc[tensorboard]'") from None


def epoch_logger(log_dir: str | Path | None, run: str) -> Callable[[Record], None] | None:
    """A callback that writes one epoch's record as scalars under ``log_dir/run``; None without ``log_dir``."""
    if log_dir is None:
        return None
    check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(Path(log_dir) / run.replace(" ", "_").replace("+", "_")))

    def log(record: Record) -> None:
        step = int(record["epoch"])
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                writer.add_scalar(_tag(key), float(value), step)
        writer.flush()

    return log
