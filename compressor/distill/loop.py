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
from typing import Any, Callable, Sequence

import torch
from torch import nn

from compressor import distributed
from compressor.config import Config
from compressor.data.images import Augment, DeviceBatches, ImageData
from compressor.device import Speed, autocast, autocast_dtype, pick_device
from compressor.distill.failures import StopFlag, StopRequested, stopped, training_failures
from compressor.distill.losses import Objective
from compressor.distill.state import TrainingState, run_identity
from compressor.distill.step import EagerStep, EpochStats, GraphedStep, graph_capture_applies, make_step
from compressor.distributed import unwrap
from compressor.errors import ConfigError
from compressor.evaluate import evaluate
from compressor.events import SILENT, Reporter
from compressor.models.spec import ModelSpec
from compressor.pair import AttentionPair, StageOutputs, stage_outputs


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


LOG_EVERY = 50  # steps between reads of the device-side totals (progress fields, non-finite check)


@dataclass
class Runtime:
    """What the loop runs, built once per run by ``make_runtime``: the step (sync-free eager, or CUDA graph
    captured), and the modules it calls (``StageOutputs``: logits and AT stage outputs in one forward)."""

    step: EagerStep | GraphedStep
    student: nn.Module
    teacher: nn.Module | None = None
    notes: list[str] = field(default_factory=list)

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
                      plain_teacher=teacher.model if teacher is not None else None)
    applies, why = graph_capture_applies(device, speed.cuda_graphs, objective, scaler, distributed.current().world_size,
                                         device_resident, compile_)
    notes += [why] if why else []
    return Runtime(make_step(eager, applies), s_run, t_run, notes)


def train_one_epoch(student: nn.Module, batches: DeviceBatches, optimizer: torch.optim.Optimizer, objective: Objective,
                    epoch: int, teacher: Teacher | None = None, beta: float | None = None,
                    amp: torch.dtype | bool | None = True,
                    stats: EpochStats | None = None, reporter: Reporter = SILENT, stop: StopFlag | None = None,
                    on_stop=None, scaler: torch.amp.GradScaler | None = None, runtime: Runtime | None = None,
                    log_every: int = LOG_EVERY) -> EpochStats:
    """One epoch. ``student`` (and ``teacher.model``) may be wrapped in DDP or ``torch.compile``; ``amp``
    is the autocast dtype (True: bf16 on CUDA only, as ``autocast`` reads it; None/False: fp32);
    ``scaler`` does fp16 loss scaling. ``runtime`` (from ``make_runtime``) is the step to run;
    without one, a sync-free eager step is built for this epoch.

    Nothing waits for the device per step: the loss terms, accuracy and non-finite checks accumulate
    on the device and are read every ``log_every`` steps, at a stop and at the end of the epoch. A
    non-finite term stops training there, naming the first step it was non-finite at."""
    student.train()
    stats = stats or EpochStats()
    own = runtime is None
    if own:
        runtime = make_runtime(student, teacher, objective, optimizer, batches.device, amp, scaler,
                               Speed(cuda_graphs=False))
    step_fn = runtime.step
    runtime.student.train()
    meter = step_fn.meter
    step = batches.start_step
    meter.start(stats, step)
    fields: dict[str, float] = {}
    last_read = time.perf_counter()

    def read() -> None:
        nonlocal last_read, fields
        meter.read(stats, epoch, step - 1)  # synchronises: the time below covers the queued work too
        now = time.perf_counter()
        stats.seconds += now - last_read
        last_read = now
        loss = stats.sums.get("loss")
        fields = ({"loss": loss / max(stats.seen, 1)} if loss is not None else {}) | {"img_s": stats.seen / max(stats.seconds, 1e-9)}

    try:
        for x, y in batches:
            step_fn(x, y, beta)
            stats.seen, stats.steps = stats.seen + len(y), stats.steps + 1
            step += 1
            if stats.steps % log_every == 0:
                read()
            reporter.advance(1, **fields)  # the count moves every step; its fields change at reads
            if stop is not None and stop.raised is not None:
                read()  # a non-finite term found here stops as divergence, not as a stop with a bad state
                if on_stop is not None:
                    on_stop(epoch, step, stats)
                raise StopRequested(signum=stop.raised)
        read()
    finally:
        if own:
            runtime.close()
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
        resume: bool = False, tag: str = "", speed: Speed | None = None,
        on_epoch: Callable[[dict[str, float]], None] | None = None) -> FitResult:
    """Train ``student`` for ``cfg.train.epochs``; distil from ``teacher`` when the objective uses one.
    ``on_epoch`` receives each epoch's metrics record (as written to metrics.jsonl) on rank 0.

    ``speed`` picks precision (``Speed(precision="fp32")`` for plain fp32), memory format,
    compilation and DataLoader workers. Inside a process group (``compressor.distributed``) the student trains under DDP
    on this rank's shard, evaluation covers the whole test set across ranks, and rank 0 alone
    reports and writes metrics and state."""
    # Setup: device, precision, memory format, batches, optimizer.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or pick_device()
    objective = objective or objective_from(cfg, "none")
    speed, rank = speed or Speed(), distributed.current()
    reporter = reporter if rank.is_main else SILENT  # rank 0 alone reports and writes
    amp = autocast_dtype(speed.precision, device)
    channels_last = _place(student, teacher, device, speed)
    train_b, test_b = make_batches(data, cfg, mean, std, device, rank.rank, rank.world_size, channels_last, speed.workers)
    opt, sched = make_optimizer(student, cfg, device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    # Resume: the saved state, or a clean folder.
    state = TrainingState(out_dir, student, opt, sched, scaler, run_identity(cfg, data), writes=rank.is_main)
    at = state.start(resume, reporter, tag)
    stats = EpochStats(**at.stats) if at.stats else None
    example = torch.randn(2, *data.input_size, generator=torch.Generator().manual_seed(0)).to(device)
    model, runtime, compile_s = _runtime_models(student, teacher, objective, speed, device, train_b, amp, reporter, opt, scaler,
                                                example.contiguous(memory_format=torch.channels_last) if channels_last else example)
    # The epochs: train, evaluate, save.
    try:
        with StopFlag() as stop:
            for epoch in range(at.epoch, cfg.train.epochs):
                began = time.perf_counter()
                train_b.set_epoch(epoch, at.step if epoch == at.epoch else 0)
                reporter.task(f"{tag} epoch {epoch + 1}/{cfg.train.epochs}".strip(), len(train_b))
                with training_failures(epoch + 1, cfg.train.batch_size, device, state.kept, state.path, reporter):
                    stats = train_one_epoch(model, train_b, opt, objective, epoch + 1, teacher, _beta_at(cfg, epoch), amp,
                                            stats, reporter, stop, on_stop=lambda e, s, st: state.save(e - 1, s, asdict(st)),
                                            scaler=scaler, runtime=runtime)
                    record = _end_of_epoch(epoch, student, stats, opt, sched, test_b, amp, device)
                state.epoch_done(record, time.perf_counter() - began)
                if on_epoch is not None and rank.is_main:
                    on_epoch(record)
                reporter.done(f"{tag} epoch {epoch + 1}: test top-1 {record['test_top1']:.2f}%  loss {record['train_loss']:.3f}".strip())
                stats = None
                if stop.raised is not None and epoch + 1 < cfg.train.epochs:  # arrived during evaluation: stop at the boundary
                    raise stopped(stop.raised, f"after epoch {epoch + 1}", state.path)
    finally:
        runtime.close()  # the hooks, where stage outputs were taken with them
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
    seconds = _warm_up(runtime, student, objective, batches, amp)
    reporter.info(f"compiled the student{' and teacher' if teacher else ''} in {seconds:.1f} s (torch.compile, "
                  f"{speed.compile_backend}); not counted in training time or images/s")
    return model, runtime, seconds


def _warm_up(runtime: Runtime, student: nn.Module, objective: Objective, batches, amp: torch.dtype | None) -> float:
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


@dataclass
class DistilledStudent:
    """A trained student as the report step needs it: the model (on the CPU), how to rebuild it,
    its metrics (top-1, history, training time, AT pairs) and the folder its files are in."""

    model: nn.Module
    spec: ModelSpec
    metrics: dict[str, Any]
    dir: Path
