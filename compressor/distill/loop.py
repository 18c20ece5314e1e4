"""One training loop for teacher training and distillation.

``train_one_epoch`` and ``evaluate`` are plain functions over a model, batches and a device.
``fit`` adds the schedule, per-epoch evaluation, ``metrics.jsonl`` and a resumable training
state written after every epoch and when SIGINT/SIGTERM arrives. With a fixed seed a resumed
run repeats the uninterrupted one exactly on CPU: batch order and augmentation are functions
of (seed, epoch, step), and the state holds model, optimizer, scheduler and RNGs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from compressor import distributed
from compressor.config import Config, canonical_method
from compressor.data.images import Augment, Batches, DeviceBatches, ImageData, Shard
from compressor.data.open import Dataset
from compressor.data.streaming import StreamingData, make_streaming_batches
from compressor.device import Speed, autocast_dtype, channels_last_for, pick_device
from compressor.distill.failures import StopFlag, StopRequested, stopped, training_failures
from compressor.distill.hints import make_regressor
from compressor.distill.losses import Objective
from compressor.distill.runtime import Runtime, Teacher, make_runtime, prepare_runtime
from compressor.distill.state import TrainingState, run_identity
from compressor.distill.step import EpochStats, GraphStatus, graph_capture_applies, graph_device
from compressor.errors import ConfigError
from compressor.evaluate import evaluate
from compressor.events import SILENT, Reporter


def objective_from(cfg: Config, method: str | None = None) -> Objective:
    d = cfg.distill
    p, reduce = d.p, "max" if d.attention == "max-p" else "mean"
    return Objective(canonical_method(method or d.method), d.alpha, d.temperature, d.beta, p, d.at_form, reduce,  # type: ignore[arg-type]
                     gradient=d.attention == "gradient", flip_beta=d.flip_beta, hint_weight=d.fitnet_weight,
                     dkd_alpha=d.dkd_alpha, dkd_beta=d.dkd_beta, dkd_temperature=d.dkd_temperature)


LOG_EVERY = 50  # steps between reads of the device-side totals (progress fields, non-finite check)


@dataclass(frozen=True)
class EpochControl:
    """How an epoch can be stopped and how often it reads the device: ``stop`` (raised by SIGINT/SIGTERM)
    ends it after the current step, ``on_stop(epoch, step, stats)`` saves the state first, and the
    device-side totals are read every ``log_every`` steps."""

    stop: StopFlag | None = None
    on_stop: Callable[[int, int, EpochStats], None] | None = None
    log_every: int = LOG_EVERY


def train_one_epoch(student: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer, objective: Objective,
                    epoch: int, teacher: Teacher | None = None, beta: float | None = None,
                    amp: torch.dtype | bool | None = True, stats: EpochStats | None = None, reporter: Reporter = SILENT,
                    runtime: Runtime | None = None, control: EpochControl = EpochControl()) -> EpochStats:
    """One epoch. ``student`` (and ``teacher.model``) may be wrapped in DDP or ``torch.compile``; ``amp``
    is the autocast dtype (True: bf16 on CUDA only, as ``autocast`` reads it; None/False: fp32).
    ``runtime`` (from ``make_runtime``, with the fp16 loss scaler where one is used) is the step to
    run; without one, a sync-free eager step is built for this epoch.

    Nothing waits for the device per step: the loss terms, accuracy and non-finite checks accumulate
    on the device and are read every ``control.log_every`` steps, at a stop and at the end of the
    epoch. A non-finite term stops training there, naming the first step it was non-finite at."""
    student.train()
    stats = stats or EpochStats()
    stop, on_stop, log_every = control.stop, control.on_stop, control.log_every
    own = runtime is None
    if own:
        runtime = make_runtime(student, teacher, objective, optimizer, batches.device, amp, None, Speed(cuda_graphs=False))
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
    cuda_graphs: GraphStatus = field(default_factory=lambda: GraphStatus("off"))  # what the training step ran as


def make_batches(data: Dataset, cfg: Config, mean, std, device: torch.device, shard: Shard | None = None,
                 channels_last: bool = False, workers: int | None = None) -> tuple[Batches, Batches]:
    """Train and test batches: ``DeviceBatches`` for an in-memory ``ImageData``, ``LoaderBatches`` (a
    DataLoader) for a ``compressor.data.streaming.StreamingData``. ``shard`` defaults to this
    process's place in the process group; ``train.batch_size`` is split over the ranks."""
    if shard is None:
        info = distributed.current()
        shard = Shard(info.rank, info.world_size)
    world = shard.world_size
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} does not split evenly over {world} processes; "
                          f"use a multiple of {world}")
    batch = cfg.train.batch_size // world
    aug = Augment(cfg.data.crop_padding, cfg.data.flip)
    if isinstance(data, StreamingData):
        return make_streaming_batches(data, batch, max(batch, 256), mean, std, device, aug, cfg.train.seed, shard,
                                      channels_last, workers)
    if not isinstance(data, ImageData):
        raise TypeError(f"make_batches needs an ImageData or a StreamingData, not {type(data).__name__}")
    train = DeviceBatches(data.train_x, data.train_y, batch, mean, std, device, True, aug, cfg.train.seed, shard=shard,
                          channels_last=channels_last)
    test = DeviceBatches(data.test_x, data.test_y, max(batch, 256), mean, std, device, False, shard=shard,
                         channels_last=channels_last)
    return train, test


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device, fused: bool = True):
    """SGD with the recipe's schedule. ``fused`` (on CUDA and the CPU): one kernel for the whole update, and
    each group's rate a 0-d float32 tensor on the device, which the fused kernel reads there and
    ``MultiStepLR`` fills at a milestone, so one captured CUDA graph sees every rate. Not with fp16 loss
    scaling: a first step the scaler skips leaves the fused kernel's momentum buffers uninitialised
    (torch 2.14), so that path keeps the multi-tensor update and a float rate."""
    t = cfg.train
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    # BN and bias parameters without weight decay, as most WRN reimplementations; the reference
    # code decays everything, a difference of a few hundredths of a point.
    fused = fused and device.type in ("cuda", "cpu")
    groups = [{"params": params, "weight_decay": wd,
               "lr": torch.full((), t.lr, dtype=torch.float32, device=device) if fused else t.lr}
              for params, wd in ((decay, t.weight_decay), (no_decay, 0.0))]
    opt = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov, **({"fused": True} if fused else {}))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(t.milestones), gamma=t.gamma)
    return opt, sched


def beta_at(cfg: Config, epoch: int) -> float:
    """β in ``epoch`` (0-based): the preset's, or falling linearly to 0 with ``beta_schedule = "decay"``."""
    if cfg.distill.beta_schedule == "decay":
        return cfg.distill.beta * (1 - epoch / cfg.train.epochs)
    return cfg.distill.beta


@dataclass(frozen=True)
class FitOptions:
    """How ``fit`` runs: continue the saved state (``resume``), the tag progress lines carry, the speed
    options (precision, memory format, compilation, DataLoader workers; None: ``Speed()``), and
    ``on_epoch``, which receives each epoch's metrics record (as written to metrics.jsonl) on rank 0.
    ``run``: what else makes the run this run, for ``--resume`` to check (the student's name, the
    teacher's weights digest); the recipe, the data and the student's layer shapes are added by ``fit``."""

    resume: bool = False
    tag: str = ""
    speed: Speed | None = None
    on_epoch: Callable[[dict[str, float]], None] | None = None
    run: Mapping[str, Any] = field(default_factory=dict)


def fit(student: nn.Module, data: Dataset, cfg: Config, out_dir: str | Path, mean, std, teacher: Teacher | None = None,
        objective: Objective | None = None, device: torch.device | None = None, reporter: Reporter = SILENT,
        options: FitOptions = FitOptions()) -> FitResult:
    """Train ``student`` for ``cfg.train.epochs``; distil from ``teacher`` when the objective uses one.

    ``options.speed`` picks precision (``Speed(precision="fp32")`` for plain fp32), memory format,
    compilation and DataLoader workers. Inside a process group (``compressor.distributed``) the student trains under DDP
    on this rank's shard, evaluation covers the whole test set across ranks, and rank 0 alone
    reports and writes metrics and state."""
    # Setup: device, precision, memory format, batches, optimizer.
    device = device or pick_device()
    objective = objective or objective_from(cfg, "none")
    resume, tag, on_epoch = options.resume, options.tag, options.on_epoch
    speed, rank = options.speed or Speed(), distributed.current()
    reporter = reporter if rank.is_main else SILENT  # rank 0 alone reports and writes
    amp = autocast_dtype(speed.precision, device)
    # --cuda-graphs that cannot be honoured fails here, before anything is written (make_runtime decides again)
    graph_capture_applies(device, speed.cuda_graphs, objective, True if amp == torch.float16 else None, rank.world_size,
                          not isinstance(data, StreamingData), speed.compile)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    channels_last = _place(student, teacher, device, speed)
    regressor = _hint_regressor(teacher, objective, cfg, device, channels_last)
    train_b, test_b = make_batches(data, cfg, mean, std, device, Shard(rank.rank, rank.world_size), channels_last, speed.workers)
    # FitNet's regressor trains with the student, in the same optimizer (so also its momentum resumes)
    trained = student if regressor is None else nn.ModuleList([student, regressor])
    opt, sched = make_optimizer(trained, cfg, device, fused=amp != torch.float16)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    # Resume: the saved state, or a clean folder.
    state = TrainingState(out_dir, student, opt, sched, scaler, run_identity(cfg, data, student, options.run), writes=rank.is_main,
                          regressor=regressor)
    at = state.start(resume, reporter, tag)
    stats = EpochStats(**at.stats) if at.stats else None
    example = torch.randn(2, *data.input_size, generator=torch.Generator().manual_seed(0)).to(device)
    example = example.contiguous(memory_format=torch.channels_last) if channels_last else example
    phases = _phases(cfg, objective)
    runtime: Runtime | None = None
    compile_s, running = 0.0, None
    # The epochs: train, evaluate, save.
    try:
        with StopFlag() as stop:
            for epoch in range(at.epoch, cfg.train.epochs):
                began = time.perf_counter()
                phase = phases(epoch)
                if phase is not running:  # the first epoch, or FitNet's stage 1 over: a step for the new objective
                    if runtime is not None:
                        runtime.close()
                    model, runtime, seconds = prepare_runtime(student, teacher, phase, speed, device, train_b, amp, reporter,
                                                              opt, scaler, example)
                    compile_s, running = compile_s + seconds, phase
                    _say_phase(cfg, phase, objective, epoch, reporter)
                    if not phase.hint_only and phases(0).hint_only:
                        _momentum_for_all(opt)
                if phase.uses_dkd:
                    runtime.set_dkd_scale(dkd_scale_at(cfg, epoch))
                train_b.set_epoch(epoch, at.step if epoch == at.epoch else 0)
                reporter.task(f"{tag} epoch {epoch + 1}/{cfg.train.epochs}".strip(), len(train_b))
                with training_failures(epoch + 1, cfg.train.batch_size, device, state.kept, state.path, reporter):
                    control = EpochControl(stop, lambda e, s, st: state.save(e - 1, s, asdict(st)))
                    stats = train_one_epoch(model, train_b, opt, phase, epoch + 1, teacher, beta_at(cfg, epoch), amp,
                                            stats, reporter, runtime, control)
                    reporter.status(f"testing on {len(test_b)} batches")  # the bar stays, saying what it waits for
                    record = _end_of_epoch(epoch, student, stats, opt, sched, test_b, amp, device)
                    graphs = runtime.step.status
                    record |= {"cuda_graphs": graphs.state, "cuda_graph_captures": graphs.captures}
                say_skipped(data, (train_b, test_b), reporter)
                state.epoch_done(record, time.perf_counter() - began)
                if on_epoch is not None and rank.is_main:
                    on_epoch(record)
                reporter.done(f"{tag} epoch {epoch + 1}: test top-1 {record['test_top1']:.2f}%  loss {record['train_loss']:.3f}".strip())
                stats = None
                if stop.raised is not None and epoch + 1 < cfg.train.epochs:  # arrived during evaluation: stop at the boundary
                    raise stopped(stop.raised, f"after epoch {epoch + 1}", state.path)
    finally:
        if runtime is not None:
            runtime.close()  # the hooks, where stage outputs were taken with them
        train_b.close()
        test_b.close()
    graphs = runtime.step.status if runtime is not None else GraphStatus("off", why="no epoch left to train")
    if graphs.state != "off" or graph_device(device):  # a CPU run has nothing to say
        reporter.info(f"{tag}: {graphs.line()}" if tag else graphs.line())
    distributed.check_same_weights(student, device)
    _place(student, teacher, None, speed)
    return FitResult(state.history, state.history[-1] if state.history else {}, state.train_seconds, compile_s, graphs)


def dkd_scale_at(cfg: Config, epoch: int) -> float:
    """DKD's warm-up factor in ``epoch`` (0-based): ``min((epoch + 1) / warm-up, 1)``, mdistiller's
    ``min(epoch / WARMUP, 1)`` with its epochs counted from 1; 1 throughout without a warm-up."""
    warm = cfg.distill.dkd_warmup_epochs
    return 1.0 if warm <= 0 else min((epoch + 1) / warm, 1.0)


def _phases(cfg: Config, objective: Objective) -> Callable[[int], Objective]:
    """The objective of each epoch (0-based): FitNet's stage 1 (the hint alone) for the first
    ``distill.fitnet_stage1_epochs`` epochs, the objective itself after (and for every other method)."""
    stage1 = cfg.distill.fitnet_stage1_epochs if objective.uses_fitnet else 0
    if stage1 and distributed.active():
        raise ConfigError("distill.fitnet_stage1_epochs needs a single process (in stage 1 the student's upper half gets no "
                          "gradient, which data-parallel training refuses); set it to 0 or train without torchrun")
    hint_only = replace(objective, hint_only=True)
    return lambda epoch: hint_only if epoch < stage1 else objective


def _momentum_for_all(opt: torch.optim.Optimizer) -> None:
    """After FitNet's stage 1 the upper half's parameters have no momentum buffer (they got no gradient),
    the lower half's have one; the fused SGD kernel takes all or none. A zero buffer is what SGD's first
    step would make (buffer = gradient, without dampening), so this changes no update."""
    for group in opt.param_groups:
        if group["momentum"]:
            for p in group["params"]:
                if opt.state[p].get("momentum_buffer") is None:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _say_phase(cfg: Config, phase: Objective, objective: Objective, epoch: int, reporter: Reporter) -> None:
    if phase.hint_only:
        reporter.info(f"FitNet stage 1: epochs {epoch + 1}-{cfg.distill.fitnet_stage1_epochs} train the student up to the "
                      "hint stage (and the regressor) on the hint alone")
    elif objective.uses_fitnet and cfg.distill.fitnet_stage1_epochs and epoch == cfg.distill.fitnet_stage1_epochs:
        reporter.info(f"FitNet stage 2: from epoch {epoch + 1} the whole student trains on {objective.method}")


def _hint_regressor(teacher: Teacher | None, objective: Objective, cfg: Config, device: torch.device,
                    channels_last: bool) -> nn.Module | None:
    """FitNet's regressor on ``device`` in training mode (made from ``teacher.hint`` where the caller gave
    none), or None for other methods."""
    if teacher is None or not objective.uses_fitnet:
        return None
    if teacher.hint is None:
        raise ConfigError("FitNet needs a hint pair: pass Teacher(model, hint=compressor.pair.hint_pair(pairs))")
    if teacher.regressor is None:
        teacher.regressor = make_regressor(teacher.hint, cfg.distill.fitnet_regressor, cfg.train.seed)  # type: ignore[arg-type]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return teacher.regressor.to(device, memory_format=fmt).train()
def say_skipped(data: Dataset, batches: tuple[Batches, ...], reporter: Reporter) -> None:
    """Streamed data meets its unreadable files while it reads them: they join ``data.skipped_files``
    (which the report counts) and are said once, in the epoch that found them."""
    new = sorted({f for b in batches for f in b.skipped_files()} - set(data.skipped_files))
    if new:
        data.skipped_files.extend(new)
        reporter.info(f"skipped {len(new)} unreadable image(s) of the streamed data, e.g. {new[0]}; each was replaced by the "
                      f"next readable image with that image's own label ({len(data.skipped_files)} in all; --strict-data "
                      "makes this fatal)")


def _place(student: nn.Module, teacher: Teacher | None, device: torch.device | None, speed: Speed) -> bool:
    """Move the models to ``device`` in the memory format the speed options ask for (the frozen teacher
    in eval mode, without gradients); with ``device=None`` back to the contiguous format that export
    and other callers expect. Returns whether channels_last is used."""
    if device is None:
        for m in (student, teacher.model if teacher is not None else None):
            if m is not None:
                m.to(memory_format=torch.contiguous_format)
        return False
    channels_last = channels_last_for(speed, device)
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
    lr = float(f"{float(opt.param_groups[0]['lr']):.8g}")  # the rate this epoch trained at (float32), before the scheduler moves it
    sched.step()
    return {"epoch": epoch + 1, "lr": lr, **stats.means(), "train_top1": 100.0 * stats.correct / max(stats.seen, 1),
            **{f"test_{k}": v for k, v in evaluate(student, test_b, amp).to_dict().items()},
            "images_per_s": stats.seen / max(stats.seconds, 1e-9)}


def _global_stats(stats: EpochStats, device: torch.device) -> EpochStats:
    """Training sums over all data-parallel ranks (seconds stay this rank's, so images/s is the total rate)."""
    if not distributed.active():
        return stats
    keys = sorted(stats.sums)
    total = distributed.all_reduce_sum([stats.sums[k] for k in keys] + [stats.correct, stats.seen], device)
    return EpochStats(dict(zip(keys, total[:-2])), int(total[-2]), int(total[-1]), stats.steps, stats.seconds)




def say_schedule(cfg: Config, reporter: Reporter) -> None:
    """The learning-rate schedule a run uses, milestones as scaled to its epochs."""
    t = cfg.train
    drops = f"× {t.gamma:g} after epoch{'s' if len(t.milestones) > 1 else ''} {', '.join(map(str, t.milestones))}" if t.milestones \
        else "no drops"
    why = f" (preset {cfg.preset}: {cfg.preset_reason}; --preset picks another)" if cfg.preset_reason else ""
    reporter.info(f"schedule: {t.epochs} epoch{'s' if t.epochs != 1 else ''}, lr {t.lr:g}, {drops}{why}")
