"""One training loop for teacher training and distillation.

``train_one_epoch`` and ``evaluate`` are plain functions over a model, batches and a device.
``fit`` adds the schedule, per-epoch evaluation, ``metrics.jsonl`` and a resumable training
state written after every epoch and when SIGINT/SIGTERM arrives. With a fixed seed a resumed
run repeats the uninterrupted one exactly on CPU: batch order and augmentation are functions
of (seed, epoch, step), and the state holds model, optimizer, scheduler and RNGs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence
import torch
from torch import nn
from compressor.pair import AttentionPair, Taps
from compressor.config import Config
from compressor.data.images import Augment, DeviceBatches, ImageData
from compressor import distributed
from compressor.distributed import unwrap
from compressor.errors import ConfigError
from compressor.events import SILENT, Reporter
from compressor.models.spec import ModelSpec
from compressor.distill.losses import Objective, distillation_terms, input_gradient
from compressor.device import Speed, autocast, autocast_dtype, pick_device
from compressor.evaluate import evaluate
from compressor.distill.failures import StopFlag, StopRequested, diverged, stopped, training_failures
from compressor.distill.state import TrainingState, run_identity


def objective_from(cfg: Config, method: str | None = None) -> Objective:
    d = cfg.distill
    p, reduce = d.p, "max" if d.attention == "max-p" else "mean"
    return Objective(method or d.method, d.alpha, d.temperature, d.beta, p, d.at_form, reduce,  # type: ignore[arg-type]
                     gradient=d.attention == "gradient", flip_beta=d.flip_beta)


@dataclass
class Teacher:
    """A frozen teacher and the attention pairs that tie it to the student."""

    model: nn.Module
    pairs: Sequence[AttentionPair] = ()


@dataclass
class EpochStats:
    sums: dict[str, float] = field(default_factory=dict)
    correct: int = 0
    seen: int = 0
    steps: int = 0
    seconds: float = 0.0

    def add(self, terms: dict[str, torch.Tensor], correct: int, n: int) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n
        self.correct, self.seen, self.steps = self.correct + correct, self.seen + n, self.steps + 1

    def means(self) -> dict[str, float]:
        return {f"train_{k}": v / max(self.seen, 1) for k, v in self.sums.items()}


def _check_finite(terms: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    bad = [name for name, value in terms.items() if name != "loss" and not torch.isfinite(value)]
    if bad or not torch.isfinite(terms["loss"]):
        name = bad[0] if bad else "loss"
        raise diverged(name, float(terms[name].detach()), epoch, step, step)


def train_one_epoch(student: nn.Module, batches: DeviceBatches, optimizer: torch.optim.Optimizer, objective: Objective,
                    epoch: int, teacher: Teacher | None = None, beta: float | None = None, bf16: bool = True,
                    stats: EpochStats | None = None, reporter: Reporter = SILENT, stop: StopFlag | None = None,
                    on_stop=None, scaler: torch.amp.GradScaler | None = None) -> EpochStats:
    """One epoch. ``student`` (and ``teacher.model``) may be wrapped in DDP or ``torch.compile``; ``bf16``
    may be an autocast dtype (see ``autocast``); ``scaler`` does fp16 loss scaling."""
    student.train()
    stats = stats or EpochStats()
    grad_at = teacher is not None and objective.uses_at and objective.gradient
    pairs = list(teacher.pairs) if teacher and objective.uses_at and not grad_at else []
    s_taps = Taps(unwrap(student), [p.student.module for p in pairs])
    t_taps = Taps(unwrap(teacher.model), [p.teacher.module for p in pairs]) if pairs else None
    device = batches.device
    step = batches.start_step
    try:
        for x, y in batches:
            t0 = time.perf_counter()
            grads = None
            with autocast(device, bf16):
                t_logits = None
                if grad_at:  # J = dL/dx: a plain gradient for the teacher, double backprop for the student
                    x = x.detach().requires_grad_(True)
                    jt, t_logits = input_gradient(teacher.model, x, y)
                    js, logits = input_gradient(student, x, y, create_graph=True)
                    grads, t_logits = (js, jt.detach()), t_logits.detach()
                else:
                    if teacher is not None and objective.needs_teacher:
                        with torch.no_grad():
                            t_logits = teacher.model(x)
                    logits = student(x)
            s_maps = s_taps.take([p.student.module for p in pairs])
            t_maps = t_taps.take([p.teacher.module for p in pairs]) if t_taps else []
            terms = distillation_terms(objective, logits, y, t_logits, list(zip(s_maps, t_maps)), beta, grads)
            _check_finite(terms, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                terms["loss"].backward()
                optimizer.step()
            else:  # fp16: scaled loss; a step whose gradients overflowed is skipped and the scale lowered
                scaler.scale(terms["loss"]).backward()
                scaler.step(optimizer)
                scaler.update()
            n = len(y)
            stats.add({k: v.detach() for k, v in terms.items()}, int((logits.argmax(1) == y).sum()), n)
            stats.seconds += time.perf_counter() - t0
            step += 1
            reporter.advance(1, loss=float(terms["loss"].detach()), img_s=stats.seen / max(stats.seconds, 1e-9))
            if stop is not None and stop.raised is not None:
                if on_stop is not None:
                    on_stop(epoch, step, stats)
                raise StopRequested(signum=stop.raised)
    finally:
        s_taps.remove()
        if t_taps:
            t_taps.remove()
    return stats


@dataclass
class FitResult:
    history: list[dict[str, float]]
    final: dict[str, float]
    seconds: float  # training and evaluation, without compilation
    compile_seconds: float = 0.0


def make_batches(data, cfg: Config, mean, std, device: torch.device, rank: int | None = None, world: int | None = None,
                 channels_last: bool = False, workers: int | None = None):
    """Train and test batches: ``DeviceBatches`` for an in-memory ``ImageData``, ``LoaderBatches`` (a
    DataLoader) for a ``compressor.loaders.StreamingData``. Rank and world size default to this
    process's place in the process group; ``train.batch_size`` is split over the ranks."""
    from compressor.data.streaming import StreamingData, make_streaming_batches

    if rank is None or world is None:
        info = distributed.current()
        rank, world = info.rank, info.world_size
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} does not split evenly over {world} processes; "
                          f"use a multiple of {world}")
    batch = cfg.train.batch_size // world
    aug = Augment(cfg.data.crop_padding, cfg.data.flip)
    if isinstance(data, StreamingData):
        return make_streaming_batches(data, batch, max(batch, 256), mean, std, device, aug, cfg.train.seed, rank, world,
                                      channels_last, workers)
    train = DeviceBatches(data.train_x, data.train_y, batch, mean, std, device, True, aug,
                          cfg.train.seed, rank=rank, world_size=world, channels_last=channels_last)
    test = DeviceBatches(data.test_x, data.test_y, max(batch, 256), mean, std, device, False, rank=rank, world_size=world,
                         channels_last=channels_last)
    return train, test


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device):
    t = cfg.train
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    # BN and bias parameters without weight decay, as most WRN reimplementations; the reference
    # code decays everything, a difference of a few hundredths of a point.
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fast = {"fused": True} if device.type == "cuda" else {}  # one kernel for the whole update on CUDA
    opt = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov, **fast)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(t.milestones), gamma=t.gamma)
    return opt, sched


def _beta_at(cfg: Config, epoch: int) -> float:
    if cfg.distill.beta_schedule == "decay":
        return cfg.distill.beta * (1 - epoch / cfg.train.epochs)
    return cfg.distill.beta


def fit(student: nn.Module, data: ImageData, cfg: Config, out_dir: str | Path, mean, std, teacher: Teacher | None = None,
        objective: Objective | None = None, device: torch.device | None = None, reporter: Reporter = SILENT,
        resume: bool = False, bf16: bool = True, tag: str = "", speed: Speed | None = None) -> FitResult:
    """Train ``student`` for ``cfg.train.epochs``; distil from ``teacher`` when the objective uses one.

    ``speed`` picks precision, memory format, compilation and DataLoader workers (``bf16=False``
    forces fp32). Inside a process group (``compressor.distributed``) the student trains under DDP
    on this rank's shard, evaluation covers the whole test set across ranks, and rank 0 alone
    reports and writes metrics and state."""
    # Setup: device, precision, memory format, batches, optimizer.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or pick_device()
    objective = objective or objective_from(cfg, "none")
    speed, rank = speed or Speed(), distributed.current()
    reporter = reporter if rank.is_main else SILENT  # rank 0 alone reports and writes
    amp = autocast_dtype(speed.precision, device) if bf16 else None
    channels_last = _place(student, teacher, device, speed)
    train_b, test_b = make_batches(data, cfg, mean, std, device, rank.rank, rank.world_size, channels_last, speed.workers)
    opt, sched = make_optimizer(student, cfg, device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    # Resume: the saved state, or a clean folder.
    state = TrainingState(out_dir, student, opt, sched, scaler, run_identity(cfg, data), writes=rank.is_main)
    at = state.start(resume, reporter, tag)
    stats = EpochStats(**at.stats) if at.stats else None
    model, run_teacher, compile_s = _runtime_models(student, teacher, objective, speed, device, train_b, amp, reporter)
    # The epochs: train, evaluate, save.
    with StopFlag() as stop:
        for epoch in range(at.epoch, cfg.train.epochs):
            began = time.perf_counter()
            train_b.set_epoch(epoch, at.step if epoch == at.epoch else 0)
            reporter.task(f"{tag} epoch {epoch + 1}/{cfg.train.epochs}".strip(), len(train_b))
            with training_failures(epoch + 1, cfg.train.batch_size, device, state.kept, state.path, reporter):
                stats = train_one_epoch(model, train_b, opt, objective, epoch + 1, run_teacher, _beta_at(cfg, epoch), amp,
                                        stats, reporter, stop, on_stop=lambda e, s, st: state.save(e - 1, s, asdict(st)),
                                        scaler=scaler)
                record = _end_of_epoch(epoch, student, stats, opt, sched, test_b, amp, device)
            state.epoch_done(record, time.perf_counter() - began)
            reporter.done(f"{tag} epoch {epoch + 1}: test top-1 {record['test_top1']:.2f}%  loss {record['train_loss']:.3f}".strip())
            stats = None
            if stop.raised is not None and epoch + 1 < cfg.train.epochs:  # arrived during evaluation: stop at the boundary
                raise stopped(stop.raised, f"after epoch {epoch + 1}", state.path)
    distributed.check_same_weights(student, device)
    _place(student, teacher, None, speed)
    return FitResult(state.history, state.history[-1] if state.history else {}, state.train_seconds, compile_s)


def _place(student: nn.Module, teacher: Teacher | None, device: torch.device | None, speed: Speed) -> bool:
    """Move the models to ``device`` in the memory format the speed options ask for (the frozen teacher
    in eval mode, without gradients); with ``device=None`` back to the contiguous format that export
    and other callers expect. Returns whether channels_last is used."""
    if device is None:
        for m in (student, teacher.model if teacher is not None else None):
            if m is not None:
                m.to(memory_format=torch.contiguous_format)
        return False
    channels_last = device.type == "cuda" if speed.channels_last is None else speed.channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if device.type == "cuda" and speed.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its kernels once and keeps the fastest
    student.to(device, memory_format=fmt)
    if teacher is not None:
        teacher.model.to(device, memory_format=fmt).eval().requires_grad_(False)
    return channels_last


def _end_of_epoch(epoch: int, student: nn.Module, stats: EpochStats, opt, sched, test_b, amp, device: torch.device) -> dict[str, float]:
    """The epoch's record: training means over all ranks, the rate it trained at, test accuracy."""
    stats = _global_stats(stats, device)
    distributed.sync_buffers(student)  # every rank evaluates and ends with rank 0's BN statistics
    lr = opt.param_groups[0]["lr"]  # the rate this epoch trained at, before the scheduler moves it
    sched.step()
    return {"epoch": epoch + 1, "lr": lr, **stats.means(), "train_top1": 100.0 * stats.correct / max(stats.seen, 1),
            **{f"test_{k}": v for k, v in evaluate(student, test_b, amp).items()},
            "images_per_s": stats.seen / max(stats.seconds, 1e-9)}


def _global_stats(stats: EpochStats, device: torch.device) -> EpochStats:
    """Training sums over all data-parallel ranks (seconds stay this rank's, so images/s is the total rate)."""
    if not distributed.active():
        return stats
    keys = sorted(stats.sums)
    total = distributed.all_reduce_sum([stats.sums[k] for k in keys] + [stats.correct, stats.seen], device)
    return EpochStats(dict(zip(keys, total[:-2])), int(total[-2]), int(total[-1]), stats.steps, stats.seconds)


def _runtime_models(student: nn.Module, teacher: Teacher | None, objective: Objective, speed: Speed, device: torch.device,
                    batches, amp: torch.dtype | None, reporter: Reporter) -> tuple[nn.Module, Teacher | None, float]:
    """The modules the loop runs: the student in DDP when several ranks train (the frozen teacher never),
    both through ``torch.compile`` with ``speed.compile``; and the seconds compilation took."""
    model = distributed.wrap_student(student, device)
    if not speed.compile:
        return model, teacher, 0.0
    if objective.uses_at and objective.gradient:
        reporter.info("--compile skipped: gradient attention needs a double backward, which torch.compile does not support")
        return model, teacher, 0.0
    model = torch.compile(model, backend=speed.compile_backend)
    if teacher is not None:
        teacher = Teacher(torch.compile(teacher.model, backend=speed.compile_backend), teacher.pairs)
    seconds = _warm_up(model, teacher, objective, batches, amp)
    reporter.info(f"compiled the student{' and teacher' if teacher else ''} in {seconds:.1f} s (torch.compile, "
                  f"{speed.compile_backend}); not counted in training time or images/s")
    return model, teacher, seconds


def _warm_up(model: nn.Module, teacher: Teacher | None, objective: Objective, batches, amp: torch.dtype | None) -> float:
    """One forward and backward on a training batch with the attention taps in place, so that torch.compile
    compiles now (hooks present at the first call are traced in). Weights, gradients, BN statistics and
    the RNG are left as they were; returns the seconds it took."""
    student = unwrap(model)
    pairs = list(teacher.pairs) if teacher is not None and objective.uses_at else []
    buffers = [b.detach().clone() for b in student.buffers()]
    rng = torch.get_rng_state()
    x, _ = next(iter(batches))
    began = time.perf_counter()
    s_taps = Taps(student, [p.student.module for p in pairs])
    t_taps = Taps(unwrap(teacher.model), [p.teacher.module for p in pairs]) if pairs else None
    try:
        with autocast(x.device, amp):
            if teacher is not None and objective.needs_teacher:
                with torch.no_grad():
                    teacher.model(x)
            logits = model(x)
        maps = s_taps.take([p.student.module for p in pairs])
        (logits.float().mean() + sum((m.float().mean() for m in maps), torch.zeros((), device=x.device))).backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
    finally:
        s_taps.remove()
        if t_taps is not None:
            t_taps.remove()
    seconds = time.perf_counter() - began
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        for b, saved in zip(student.buffers(), buffers):
            b.copy_(saved)
    torch.set_rng_state(rng)
    return seconds


@dataclass
class DistilledStudent:
    """A trained student as the report step needs it: the model (on the CPU), how to rebuild it,
    its metrics (top-1, history, training time, AT pairs) and the folder its files are in."""

    model: nn.Module
    spec: ModelSpec
    metrics: dict[str, Any]
    dir: Path
