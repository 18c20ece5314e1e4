"""FitNet's regressor: training machinery that maps a student stage's output onto the teacher's.

The hint (Romero et al. 2015) compares a teacher stage's output with the student stage's output passed
through a learned regressor. Here the regressor is

- adaptive average pooling of the student's map to the teacher's height and width where the student's
  is larger (as AT pools the larger map; a larger teacher map is pooled by ``hint_loss``), then
- a 1×1 convolution (no bias) + BatchNorm from the student's channels to the teacher's where they
  differ; where they match, nothing (``mode="auto"``): the student's own features then meet the
  teacher's. ``mode="always"`` learns the 1×1 conv + BN there too, as RepDistiller's and mdistiller's
  ``ConvReg`` always does (theirs also ends in a ReLU, left out here: the teacher stage outputs atc
  pairs with are taken before the BN-ReLU for pre-activation networks and can be negative).

The regressor trains with the student (its parameters join the optimizer and the training state) and is
never part of the student: not in its ``state_dict``, its export, its parameter count or its latency.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compressor.pair import AttentionPair

RegressorMode = Literal["auto", "always"]


class HintRegressor(nn.Module):
    """Student stage output (B×Cs×Hs×Ws) → the teacher stage's channels at the smaller of the two sizes.

    ``student_shape`` and ``teacher_shape`` are one sample's C, H, W (``compressor.pair.Stage.shape``)."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], mode: RegressorMode = "auto",
                 generator: torch.Generator | None = None):
        super().__init__()
        (cs, hs, ws), (ct, ht, wt) = tuple(student_shape), tuple(teacher_shape)
        self.student_shape, self.teacher_shape = (cs, hs, ws), (ct, ht, wt)
        self.size = (min(hs, ht), min(ws, wt))
        self.pools = self.size != (hs, ws)
        self.proj: nn.Sequential | None = None
        if cs != ct or mode == "always":
            conv = nn.Conv2d(cs, ct, kernel_size=1, bias=False)
            # as the WRN/ResNet convs; drawn from its own generator, so that adding a regressor leaves the
            # global random stream (and with it everything else in the run) as other methods have it
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            self.proj = nn.Sequential(conv, nn.BatchNorm2d(ct))

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return (self.teacher_shape[0] if self.proj is not None else self.student_shape[0], *self.size)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if self.pools:
            s = F.adaptive_avg_pool2d(s, self.size)
        return s if self.proj is None else self.proj(s)

    def describe(self) -> str:
        """One line for the dry run, e.g. ``1×1 conv 16→32 + BN (544 parameters), pool 32×32→16×16``."""
        (cs, hs, ws), ct = self.student_shape, self.teacher_shape[0]
        steps = []
        if self.pools:
            steps.append(f"pool {hs}×{ws}→{self.size[0]}×{self.size[1]}")
        if self.proj is not None:
            steps.append(f"1×1 conv {cs}→{ct} + BN")
        text = ", ".join(steps) or "identity (channels and size match)"
        return f"{text} ({self.num_parameters():,} parameters)"

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def make_regressor(pair: AttentionPair, mode: RegressorMode = "auto", seed: int = 0) -> HintRegressor:
    """The regressor of a hint pair, its weights drawn from a generator seeded with ``seed``."""
    if mode not in ("auto", "always"):
        raise ValueError(f"regressor mode {mode!r}: use auto or always")
    return HintRegressor(pair.student.shape, pair.teacher.shape, mode, torch.Generator().manual_seed(seed))
