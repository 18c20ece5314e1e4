"""The distillation engine: what one training step runs, built once per run.

``make_runtime`` builds the step (sync-free eager, or captured as a CUDA graph where
``graph_capture_applies``) and the modules it calls (``StageOutputs``: logits and AT stage outputs
in one forward, through an FX feature extractor where the model traces, hooks otherwise).
``prepare_runtime`` adds what a whole run needs around it: the student in DDP when several ranks
train, ``torch.compile`` (warmed up here, so compilation is timed apart from training), and the
notes to report. ``distill.loop`` runs the epochs over it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from compressor import distributed
from compressor.data.images import DeviceBatches
from compressor.device import Speed, autocast
from compressor.distill.losses import Objective
from compressor.distill.step import EagerStep, GraphedStep, graph_capture_applies, graph_device, make_step
from compressor.distributed import unwrap
from compressor.events import Reporter
from compressor.pair import AttentionPair, StageOutputs, stage_outputs


@dataclass
class Teacher:
    """A frozen teacher and what ties it to the student: the attention pairs and, for FitNet, the hint
    pair and its regressor (trained with the student, never part of it; ``fit`` makes one where it is None)."""

    model: nn.Module
    pairs: Sequence[AttentionPair] = ()
    hint: AttentionPair | None = None
    regressor: nn.Module | None = None


@dataclass
class Runtime:
    """What the loop runs, built once per run by ``make_runtime``: the step (sync-free eager, or CUDA graph
    captured), and the modules it calls (``StageOutputs``: logits and AT stage outputs in one forward)."""

    step: EagerStep | GraphedStep
    student: nn.Module
    teacher: nn.Module | None = None
    notes: list[str] = field(default_factory=list)

    def set_dkd_scale(self, value: float) -> None:
        """DKD's warm-up factor for the coming steps (a device scalar the step, captured or not, reads)."""
        getattr(self.step, "eager", self.step).set_dkd_scale(value)

    def close(self) -> None:
        for m in (self.student, self.teacher):
            if m is not None and hasattr(unwrap(m), "remove"):
                unwrap(m).remove()


def make_runtime(student: nn.Module, teacher: Teacher | None, objective: Objective, optimizer: torch.optim.Optimizer,
                 device: torch.device, amp: bool | torch.dtype | None, scaler: torch.amp.GradScaler | None = None,
                 speed: Speed | None = None, example: torch.Tensor | None = None, device_resident: bool = True,
                 compile_: bool = False) -> Runtime:
    """The step for ``student`` (plain, DDP- or compile-wrapped) and ``teacher``: stage outputs through an FX
    feature extractor where it traces (hooks otherwise, and always under DDP), captured as a CUDA graph
    where ``graph_capture_applies``. ``example``: an input batch to check the traced forward against."""
    speed = speed or Speed()
    notes: list[str] = []
    grad_at = teacher is not None and objective.uses_at and objective.gradient
    pairs = list(teacher.pairs) if teacher is not None and objective.uses_at and not grad_at else []
    regressor = None
    if teacher is not None and objective.uses_fitnet:  # one stage output per side: the hint's (AT and FitNet exclude each other)
        if teacher.hint is None or teacher.regressor is None:
            raise ValueError("FitNet needs Teacher.hint (compressor.pair.hint_pair) and Teacher.regressor")
        pairs, regressor = [teacher.hint], teacher.regressor
        if distributed.active() and any(p.requires_grad for p in regressor.parameters()):
            regressor = distributed.wrap_student(regressor, device)  # its gradients averaged over the ranks too
    ddp = isinstance(student, nn.parallel.DistributedDataParallel) or distributed.active()
    plain = unwrap(student)
    if ddp:  # DDP runs the forward (compiled as a whole with --compile); hooks on the module inside it take the maps
        s_run = StageOutputs(plain, [p.student.module for p in pairs],
                             caller=torch.compile(student, backend=speed.compile_backend) if compile_ else student)
    else:
        s_run, note = stage_outputs(plain, [p.student.module for p in pairs], example)
        notes += [note] if note else []
    t_run = None
    if teacher is not None and not grad_at:
        t_plain = unwrap(teacher.model)
        t_run, note = stage_outputs(t_plain, [p.teacher.module for p in pairs], example)
        notes += [note] if note else []
    if compile_:
        backend = speed.compile_backend
        s_run = s_run if ddp else torch.compile(s_run, backend=backend)
        t_run = torch.compile(t_run, backend=backend) if t_run is not None else None
    eager = EagerStep(s_run, t_run, optimizer, objective, device, amp, scaler, plain_student=student,
                      plain_teacher=teacher.model if teacher is not None else None, regressor=regressor)
    applies, why = graph_capture_applies(device, speed.cuda_graphs, objective, scaler, distributed.current().world_size,
                                         device_resident, compile_)
    eager.why_off = why
    if not applies and speed.cuda_graphs is None and graph_device(device):  # the default fell back: say so
        notes.append(f"CUDA graphs off ({why}); the eager step runs")
    return Runtime(make_step(eager, applies), s_run, t_run, notes)


def prepare_runtime(student: nn.Module, teacher: Teacher | None, objective: Objective, speed: Speed, device: torch.device,
                    batches, amp: torch.dtype | None, reporter: Reporter, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None = None, example: torch.Tensor | None = None
                    ) -> tuple[nn.Module, Runtime, float]:
    """What the loop runs: the student in DDP when several ranks train (the frozen teacher never), the
    step built by ``make_runtime`` (its notes reported), compiled with ``speed.compile``; and the seconds
    compilation took."""
    model = distributed.wrap_student(student, device)
    compile_ = speed.compile
    if compile_ and objective.uses_at and objective.gradient:
        reporter.info("--compile skipped: gradient attention needs a double backward, which torch.compile does not support")
        compile_ = False
    runtime = make_runtime(model, teacher, objective, optimizer, device, amp, scaler, speed, example,
                           isinstance(batches, DeviceBatches), compile_)
    for note in runtime.notes:
        reporter.info(note)
    if not compile_:
        return model, runtime, 0.0
    seconds = warm_up(runtime, student, objective, batches, amp)
    reporter.info(f"compiled the student{' and teacher' if teacher else ''} in {seconds:.1f} s (torch.compile, "
                  f"{speed.compile_backend}); not counted in training time or images/s")
    return model, runtime, seconds


def warm_up(runtime: Runtime, student: nn.Module, objective: Objective, batches, amp: torch.dtype | None) -> float:
    """One forward and backward on a training batch through the runtime's modules, so that torch.compile
    compiles now. Weights, gradients, BN statistics and the RNG are left as they were; returns the seconds."""
    buffers = [b.detach().clone() for b in student.buffers()]
    rng = torch.get_rng_state()
    x, _ = next(iter(batches))
    began = time.perf_counter()
    with autocast(x.device, amp, cache=False):
        if runtime.teacher is not None and objective.needs_teacher:
            with torch.inference_mode():
                runtime.teacher(x)
        logits, maps = runtime.student(x)
    (logits.float().mean() + sum((m.float().mean() for m in maps), torch.zeros((), device=x.device))).backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    seconds = time.perf_counter() - began
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        for b, saved in zip(student.buffers(), buffers):
            b.copy_(saved)
    torch.set_rng_state(rng)
    return seconds
