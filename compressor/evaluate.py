"""Top-1 accuracy: of a torch model over batches (on the batches' device, under the given autocast),
and of an ONNX file in onnxruntime over normalised images."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor import distributed
from compressor.data.images import Batches
from compressor.device import autocast, ort_session
from compressor.events import SILENT, Reporter


@dataclass(frozen=True)
class EvalResult:
    """Top-1 accuracy (%) and mean cross-entropy over a test set."""

    top1: float
    loss: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, amp: torch.dtype | bool | None = True, reporter: Reporter = SILENT,
             what: str = "") -> EvalResult:
    """Top-1 accuracy (%) and mean cross-entropy over ``batches``; with sharded batches (several
    data-parallel ranks) the sums are added over the ranks, so every rank gets the whole test set's numbers.
    With ``what`` (e.g. "teacher wrn-16-2 on the test set") the batches go by under ``reporter``'s progress bar."""
    was_training = model.training
    model.eval()
    if what:
        reporter.task(f"evaluating {what}", len(batches))
    sums = torch.zeros(3, dtype=torch.float64, device=batches.device)  # loss, correct, total; one sync at the end
    for x, y in batches:
        with autocast(batches.device, amp):
            logits = model(x)
        sums[0] += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += len(y)
        if what:
            reporter.advance(1)
    if what:
        reporter.done()
    model.train(was_training)
    loss, correct, total = sums.tolist()
    if getattr(batches, "world_size", 1) > 1:
        loss, correct, total = distributed.all_reduce_sum([loss, correct, total], batches.device)
    return EvalResult(100.0 * correct / max(total, 1), loss / max(total, 1))


def normalized_images(x_uint8: torch.Tensor, mean, std) -> np.ndarray:
    """uint8 N×C×H×W → float32 input as the exported model expects it."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((x_uint8.float() / 255 - m) / s).numpy().astype(np.float32)


def onnx_top1(path: str | Path, x: np.ndarray, y: np.ndarray, batch_size: int = 256, threads: int | None = None) -> float:
    """Top-1 (%) of an ONNX classifier on already-normalised inputs, with onnxruntime on CPU."""
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = sess.run(None, {name: x[i:i + batch_size]})[0]
        correct += int((logits.argmax(1) == y[i:i + batch_size]).sum())
    return 100.0 * correct / max(len(x), 1)
