"""One training step that never waits for the host, and the same step captured as a CUDA graph.

``EagerStep`` runs teacher forward, student forward and backward, the loss terms and the optimizer
update, and adds the step's loss terms, correct predictions and non-finite checks to a ``Meter``
that lives on the device: no ``.item()``, ``float(t)`` or ``int(t)`` per step, so the host can
queue step after step. ``Meter.read`` copies the totals to the host (one synchronisation) every
``log_every`` steps and at the end of an epoch; it raises ``Diverged`` naming the first step at
which a term went non-finite.

``GraphedStep`` records the whole step (teacher forward, student forward and backward, loss, the
fused SGD update and the meter's update) once as a CUDA graph on static input buffers and replays
it for every batch of the same shape: one launch instead of hundreds. Its first ``warmup`` steps
run eagerly on a side stream (real training steps; they create the optimizer's momentum buffers
and let cuDNN pick its kernels). The learning rate and β are constants inside the graph, so the
graph is recorded again when either changes (MultiStepLR moves the rate between epochs only).
A batch of another shape (a last partial batch) takes the eager step. Whether capture applies is
decided apart, by ``graph_capture_applies``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compressor.device import autocast
from compressor.distill.failures import diverged
from compressor.distill.losses import Objective, distillation_terms, input_gradient


@dataclass
class EpochStats:
    """An epoch's training totals on the host (plain numbers, saved with the training state)."""

    sums: dict[str, float] = field(default_factory=dict)
    correct: int = 0
    seen: int = 0
    steps: int = 0
    seconds: float = 0.0

    def means(self) -> dict[str, float]:
        return {f"train_{k}": v / max(self.seen, 1) for k, v in self.sums.items()}


class Meter:
    """An epoch's running totals on the device: Σ term·batch per loss term (float64, added in step
    order as the host would, so a resumed epoch sums exactly like an uninterrupted one), correct
    predictions, and per term the first step (0-based) and value at which it was not finite."""

    def __init__(self, device: torch.device):
        self.device, self.names = device, []
        self.sums = self.correct = self.first_bad = self.bad_value = self.step = None
        self.read_step = 0  # the first step since the last read, for messages when no step is known

    def start(self, stats: EpochStats, start_step: int, names: list[str] | None = None) -> None:
        """Load the epoch's totals so far (in place: a captured graph keeps pointing at the tensors)."""
        self.read_step = start_step
        self._stats = stats
        if names is not None:
            self._allocate(names)
        if self.sums is not None:
            self._load(stats, start_step)

    def _allocate(self, names: list[str]) -> None:
        k, d = len(names), self.device
        self.names = list(names)
        self.sums = torch.zeros(k, dtype=torch.float64, device=d)
        self.correct = torch.zeros((), dtype=torch.int64, device=d)
        self.first_bad = torch.full((k,), -1, dtype=torch.int64, device=d)
        self.bad_value = torch.zeros(k, dtype=torch.float32, device=d)
        self.step = torch.zeros((), dtype=torch.int64, device=d)

    def _load(self, stats: EpochStats, start_step: int) -> None:
        self.sums.copy_(torch.tensor([stats.sums.get(n, 0.0) for n in self.names], dtype=torch.float64))
        self.correct.fill_(stats.correct)
        self.first_bad.fill_(-1)
        self.bad_value.zero_()
        self.step.fill_(start_step)

    def update(self, terms: dict[str, torch.Tensor], logits: torch.Tensor, y: torch.Tensor) -> None:
        """Device-only work: a handful of small kernels, no synchronisation."""
        if self.sums is None or list(terms) != self.names:  # first step of a run: the objective's terms are known now
            self._allocate(list(terms))
            self._load(self._stats, self.read_step)
        vals = torch.stack([t.detach().float() for t in terms.values()])
        self.sums.add_(vals.double() * y.shape[0])
        self.correct.add_((logits.detach().argmax(1) == y).sum())
        newly = ~torch.isfinite(vals) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(newly, self.step, self.first_bad))
        self.bad_value.copy_(torch.where(newly, vals, self.bad_value))
        self.step.add_(1)

    def read(self, stats: EpochStats, epoch: int, last_step: int) -> None:
        """Copy the totals into ``stats`` (one synchronisation); raise ``Diverged`` if a term went non-finite.
        ``last_step`` is the last step run (0-based)."""
        if self.sums is not None:
            host = torch.cat([self.sums, self.correct.double().view(1), self.first_bad.double(), self.bad_value.double()]).tolist()
            k = len(self.names)
            sums, correct, first, values = host[:k], host[k], host[k + 1:2 * k + 1], host[2 * k + 1:]
            bad = [(int(f), self.names[i] == "loss", i) for i, f in enumerate(first) if f >= 0]
            if bad:  # the earliest step; at that step a named term before the total, as the message is more useful
                step, _, i = min(bad)
                raise diverged(self.names[i], values[i], epoch, step, step)
            stats.sums = dict(zip(self.names, sums))
            stats.correct = int(correct)
        self.read_step = last_step + 1


class EagerStep:
    """One training step, eager and sync-free. ``student`` and ``teacher`` return ``(logits, stage
    outputs)`` (``compressor.pair.StageOutputs``); ``plain_student``/``plain_teacher`` are the modules
    themselves, for gradient-based AT's input gradients."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, optimizer: torch.optim.Optimizer, objective: Objective,
                 device: torch.device, amp: bool | torch.dtype | None, scaler: torch.amp.GradScaler | None = None,
                 plain_student: nn.Module | None = None, plain_teacher: nn.Module | None = None):
        self.student, self.teacher, self.optimizer, self.objective = student, teacher, optimizer, objective
        self.device, self.amp, self.scaler = device, amp, scaler
        self.plain_student, self.plain_teacher = plain_student, plain_teacher
        self.grad_at = plain_teacher is not None and objective.uses_at and objective.gradient
        self.meter = Meter(device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, beta: float | None) -> None:
        grads, t_logits, t_maps = None, None, []
        with autocast(self.device, self.amp, cache=False):
            if self.grad_at:  # J = dL/dx: a plain gradient for the teacher, double backprop for the student
                x = x.detach().requires_grad_(True)
                jt, t_logits = input_gradient(self.plain_teacher, x, y)
                js, logits = input_gradient(self.plain_student, x, y, create_graph=True)
                grads, t_logits, s_maps = (js, jt.detach()), t_logits.detach(), []
            else:
                if self.teacher is not None and self.objective.needs_teacher:
                    with torch.inference_mode():  # frozen: no autograd records, no version counters
                        t_logits, t_maps = self.teacher(x)
                logits, s_maps = self.student(x)
        terms = distillation_terms(self.objective, logits, y, t_logits, list(zip(s_maps, t_maps)), beta, grads)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            terms["loss"].backward()
            self.optimizer.step()
        else:  # fp16: scaled loss; a step whose gradients overflowed is skipped and the scale lowered
            self.scaler.scale(terms["loss"]).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.meter.update(terms, logits, y)


def graph_capture_applies(device: torch.device, requested: bool | None, objective: Objective, scaler: Any = None,
                          world_size: int = 1, device_resident: bool = True, compiled: bool = False) -> tuple[bool, str]:
    """Whether the step is captured as a CUDA graph, and if not, why (empty when there is nothing to say:
    the user turned it off, or left it on auto on a device without CUDA)."""
    if requested is False:
        return False, ""
    if device.type != "cuda":
        return False, "" if requested is None else "CUDA graphs need a CUDA device; the eager step runs"
    why = None
    if objective.uses_at and objective.gradient:
        why = "gradient attention's double backward"
    elif scaler is not None:
        why = "fp16 loss scaling (its skipped steps are decided on the host)"
    elif world_size > 1:
        why = f"data-parallel training over {world_size} processes"
    elif not device_resident:
        why = "streamed data (a DataLoader feeds the batches)"
    elif compiled:
        why = "--compile (torch.compile manages its own kernels)"
    if why:
        return False, f"CUDA graphs off: not used with {why}; the eager step runs"
    return True, ""


class GraphedStep:
    """``EagerStep`` recorded once as a CUDA graph and replayed (see the module docstring)."""

    def __init__(self, eager: EagerStep, warmup: int = 3):
        self.eager, self.warmup, self.warmed = eager, warmup, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.static_x = self.static_y = None
        self.pool = None
        self.captures = 0
        self.failed: str | None = None

    @property
    def meter(self) -> Meter:
        return self.eager.meter

    def __call__(self, x: torch.Tensor, y: torch.Tensor, beta: float | None) -> None:
        if self.failed is not None:
            return self.eager(x, y, beta)
        if self.static_x is not None and (x.shape != self.static_x.shape or x.stride() != self.static_x.stride()
                                          or y.shape != self.static_y.shape):
            return self.eager(x, y, beta)  # a batch of another shape: the last, partial one
        if self.warmed < self.warmup:
            return self._warm(x, y, beta)
        key = (tuple(g["lr"] for g in self.eager.optimizer.param_groups), beta)
        if self.graph is None or key != self.key:
            return self._capture(x, y, beta, key)
        self.static_x.copy_(x, non_blocking=True)
        self.static_y.copy_(y, non_blocking=True)
        self.graph.replay()

    def _warm(self, x, y, beta) -> None:
        """A real step on a side stream, as capture will run (lazy initialisation happens here, not in the graph)."""
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            self.eager(x, y, beta)
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.warmed += 1
        if self.static_x is None:
            self.static_x, self.static_y = x.clone(), y.clone()  # clone keeps the memory format

    def _capture(self, x, y, beta, key) -> None:
        self.graph = None  # free the old recording before making a new one
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.eager.optimizer.zero_grad(set_to_none=True)  # gradients come from the graph's memory from now on
        graph = torch.cuda.CUDAGraph()
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self.eager(self.static_x, self.static_y, beta)
        except Exception as exc:  # e.g. a model that synchronises inside its forward
            self.failed = f"CUDA graph capture failed ({str(exc).splitlines()[0][:120]}); the eager step runs"
            self.eager.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(x.device)
            return self.eager(x, y, beta)
        self.graph, self.key = graph, key
        self.captures += 1
        graph.replay()  # capture records without running: this runs the step


def make_step(eager: EagerStep, graphs: bool, warmup: int = 3) -> EagerStep | GraphedStep:
    return GraphedStep(eager, warmup) if graphs else eager

