"""One training loop for teacher training and distillation.

``train_one_epoch`` and ``evaluate`` are plain functions over a model, batches and a device.
``fit`` adds the schedule, per-epoch evaluation, ``metrics.jsonl`` and a resumable training
state written after every epoch and when SIGINT/SIGTERM arrives. With a fixed seed a resumed
run repeats the uninterrupted one exactly on CPU: batch order and augmentation are functions
of (seed, epoch, step), and the state holds model, optimizer, scheduler and RNGs.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
import torch
from torch import nn
from compressor import fileio
from compressor.pair import AttentionPair, Taps
from compressor.config import Config
from compressor.data.images import Augment, DeviceBatches, ImageData
from compressor import distributed
from compressor.distributed import unwrap
from compressor.errors import CheckpointError, ConfigError, Interrupted, TrainingError
from compressor.events import SILENT, Reporter
from compressor.distill.losses import Objective, distillation_terms, input_gradient
from compressor.device import Speed, _autocast, autocast_dtype, pick_device
from compressor.evaluate import evaluate



STATE_FILE = "train_state.pt"

METRICS_FILE = "metrics.jsonl"



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



class StopRequested(Interrupted):
    """SIGINT/SIGTERM arrived; the state was saved at a step boundary."""

    def __init__(self, message: str = "training stopped", signum: int = signal.SIGINT):
        super().__init__(message, signum)



class _StopFlag:
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



class Diverged(TrainingError):
    """A loss term went NaN or infinite; ``fit`` adds where the last good state is."""



def _check_finite(terms: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    """``epoch`` is 1-based, ``step`` the 0-based index of the batch; the message counts both from 1."""
    bad = [name for name, value in terms.items() if name != "loss" and not torch.isfinite(value)]
    if bad or not torch.isfinite(terms["loss"]):
        name = bad[0] if bad else "loss"
        what = "the total loss" if name == "loss" else f"the {name} loss term"
        raise Diverged(f"training diverged: {what} became {float(terms[name].detach())} at epoch {epoch}, step {step + 1}; "
                       f"lower --lr (or distill.beta) and run again")



# torch.OutOfMemoryError is the CUDA allocator's error; older torch only has it under torch.cuda.
_CUDA_OOM = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())



def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (_CUDA_OOM, MemoryError)) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))



def _out_of_memory_message(batch_size: int, device: torch.device, epoch: int, kept: str, exc: BaseException) -> str:
    """A suggestion that fits: half the batch, rounded down to a power of two (memory grows with the batch)."""
    where = "CUDA" if device.type == "cuda" or isinstance(exc, _CUDA_OOM) else "the CPU"
    if batch_size <= 1:
        return (f"{where} ran out of memory at epoch {epoch} even with batch size 1; use a smaller model, fewer AT layers "
                f"or another device; {kept}")
    suggest = 1 << ((batch_size // 2).bit_length() - 1)
    return (f"{where} ran out of memory at epoch {epoch} with batch size {batch_size}; try --batch-size {suggest} "
            f"(or --set train.batch_size={suggest}); {kept}")



def train_one_epoch(student: nn.Module, batches: DeviceBatches, optimizer: torch.optim.Optimizer, objective: Objective,
                    epoch: int, teacher: Teacher | None = None, beta: float | None = None, bf16: bool = True,
                    stats: EpochStats | None = None, reporter: Reporter = SILENT, stop: _StopFlag | None = None,
                    on_stop=None, scaler: torch.amp.GradScaler | None = None) -> EpochStats:
    """One epoch. ``student`` (and ``teacher.model``) may be wrapped in DDP or ``torch.compile``; ``bf16``
    may be an autocast dtype (see ``_autocast``); ``scaler`` does fp16 loss scaling."""
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
            with _autocast(device, bf16):
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



def _run_identity(cfg: Config, data: ImageData) -> dict[str, Any]:
    """What a resumed run must share with the saved one to repeat it: the recipe and the data's size."""
    ident = {f"{section}.{k}": v for section in ("data", "train", "distill") for k, v in getattr(cfg, section).__dict__.items()}
    ident = {k: list(v) if isinstance(v, tuple) else v for k, v in ident.items()}
    ident["images"] = [len(data.train_y), len(data.test_y)]
    return ident



def _check_same_run(saved: dict[str, Any] | None, now: dict[str, Any], path: Path) -> None:
    if not saved:
        return
    diff = [k for k in now if k in saved and saved[k] != now[k]]
    if diff:
        shown = ", ".join(f"{k}={saved[k]} (now {now[k]})" for k in diff[:3])
        raise ConfigError(f"the training state in {path.parent} was made with {shown}; resume with the same options and data, "
                          "or pass --overwrite to start again")



def _save_state(path: Path, student, opt, sched, epoch: int, step: int, history, stats: EpochStats | None,
                identity: dict[str, Any] | None = None, scaler: torch.amp.GradScaler | None = None) -> None:
    fileio.torch_save(path, {
        "model": student.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "epoch": epoch, "step": step, "history": history,
        "stats": None if stats is None else {"sums": stats.sums, "correct": stats.correct, "seen": stats.seen,
                                              "steps": stats.steps, "seconds": stats.seconds},
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "run": identity or {},
    })



def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"the training state {path} is unreadable ({type(exc).__name__}); start again without --resume") from exc



def fit(student: nn.Module, data: ImageData, cfg: Config, out_dir: str | Path, mean, std, teacher: Teacher | None = None,
        objective: Objective | None = None, device: torch.device | None = None, reporter: Reporter = SILENT,
        resume: bool = False, bf16: bool = True, tag: str = "", speed: Speed | None = None) -> FitResult:
    """Train ``student`` for ``cfg.train.epochs``; distil from ``teacher`` when the objective uses one.

    ``speed`` picks precision, memory format, compilation and DataLoader workers (``bf16=False``
    forces fp32). Inside a process group (``compressor.distributed``) the student trains under DDP
    on this rank's shard, evaluation covers the whole test set across ranks, and rank 0 alone
    reports and writes metrics and state."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or pick_device()
    objective = objective or objective_from(cfg, "none")
    speed, rank = speed or Speed(), distributed.current()
    reporter = reporter if rank.is_main else SILENT  # rank 0 alone reports and writes
    amp = autocast_dtype(speed.precision, device) if bf16 else None
    cl = device.type == "cuda" if speed.channels_last is None else speed.channels_last
    fmt = torch.channels_last if cl else torch.contiguous_format
    if device.type == "cuda" and speed.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its kernels once and keeps the fastest
    torch.manual_seed(cfg.train.seed)
    student.to(device, memory_format=fmt)
    if teacher is not None:
        teacher.model.to(device, memory_format=fmt).eval().requires_grad_(False)
    train_b, test_b = make_batches(data, cfg, mean, std, device, rank.rank, rank.world_size, cl, speed.workers)
    opt, sched = make_optimizer(student, cfg, device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    state_path, metrics_path = out_dir / STATE_FILE, out_dir / METRICS_FILE
    identity = _run_identity(cfg, data)
    history: list[dict[str, float]] = []
    start_epoch, start_step, stats = 0, 0, None
    if resume and state_path.exists():
        st = _load_state(state_path)
        _check_same_run(st.get("run"), identity, state_path)
        student.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])  # the loss scale it had found, not a fresh 65536
        torch.set_rng_state(st["rng"])
        if st.get("cuda_rng") and torch.cuda.is_available() and len(st["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        start_epoch, start_step, history = st["epoch"], st["step"], list(st["history"])
        stats = EpochStats(**st["stats"]) if st["stats"] else None
        reporter.info(f"resuming {tag or 'training'} at epoch {start_epoch + 1}, step {start_step}")
        if rank.is_main:
            _rewrite_metrics(metrics_path, history)
    else:  # a fresh start: no metrics or state of an earlier run may survive to be mixed with this one's
        if resume:
            reporter.info(f"no training state in {out_dir}; {tag or 'training'} starts from epoch 1")
        for stale in (state_path, metrics_path) if rank.is_main else ():
            stale.unlink(missing_ok=True)
    model, run_teacher, compile_s = _runtime_models(student, teacher, objective, speed, device, train_b, amp, reporter)
    began = time.perf_counter()
    with _StopFlag() as stop:
        for epoch in range(start_epoch, cfg.train.epochs):
            train_b.set_epoch(epoch, start_step)
            reporter.task(f"{tag} epoch {epoch + 1}/{cfg.train.epochs}".strip(), len(train_b))
            save = lambda e, s, st_: rank.is_main and _save_state(state_path, student, opt, sched, e, s, history, st_, identity, scaler)  # noqa: E731
            kept = (f"the last good training state is kept in {state_path}; --resume continues from it"
                    if state_path.exists() else "no epoch had finished, so no training state was saved")
            try:
                stats = train_one_epoch(model, train_b, opt, objective, epoch + 1, run_teacher, _beta_at(cfg, epoch), amp,
                                        stats, reporter, stop, on_stop=lambda e, s, st_: save(e - 1, s, st_), scaler=scaler)
                stats = _global_stats(stats, device)
                distributed.sync_buffers(student)  # every rank evaluates and ends with rank 0's BN statistics
                lr = opt.param_groups[0]["lr"]  # the rate this epoch trained at, before the scheduler moves it
                sched.step()
                record = {"epoch": epoch + 1, "lr": lr, **stats.means(),
                          "train_top1": 100.0 * stats.correct / max(stats.seen, 1),
                          **{f"test_{k}": v for k, v in evaluate(student, test_b, amp).items()},
                          "images_per_s": stats.seen / max(stats.seconds, 1e-9)}
            except StopRequested as exc:
                reporter.done()
                raise _stopped(exc.signum, f"at epoch {epoch + 1}", state_path) from None
            except Diverged as exc:
                reporter.done()
                raise Diverged(f"{exc}; {kept}") from None
            except (RuntimeError, MemoryError) as exc:
                if not _is_out_of_memory(exc):
                    raise
                reporter.done()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                raise TrainingError(_out_of_memory_message(cfg.train.batch_size, device, epoch + 1, kept, exc)) from None
            history.append(record)
            # The state first: it holds the history, and --resume rebuilds metrics.jsonl from it.
            if rank.is_main:
                _save_state(state_path, student, opt, sched, epoch + 1, 0, history, None, identity, scaler)
                fileio.append_jsonl(metrics_path, record)
            reporter.done(f"{tag} epoch {epoch + 1}: test top-1 {record['test_top1']:.2f}%  loss {record['train_loss']:.3f}".strip())
            stats, start_step = None, 0
            if stop.raised is not None and epoch + 1 < cfg.train.epochs:  # arrived during evaluation: stop at the boundary
                raise _stopped(stop.raised, f"after epoch {epoch + 1}", state_path)
    seconds = time.perf_counter() - began
    distributed.check_same_weights(student, device)
    student.to(memory_format=torch.contiguous_format)  # what export and other callers expect
    if teacher is not None:
        teacher.model.to(memory_format=torch.contiguous_format)
    final = history[-1] if history else {}
    return FitResult(history, final, seconds, compile_s)



def _stopped(signum: int, when: str, state_path: Path) -> StopRequested:
    return StopRequested(f"stopped by {signal.Signals(signum).name} {when}; the training state is saved in {state_path}; "
                         "run the same command with --resume to continue", signum)



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
        with _autocast(x.device, amp):
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



def _rewrite_metrics(path: Path, history: list[dict[str, float]]) -> None:
    """On resume, metrics.jsonl is rebuilt from the saved state, dropping lines of lost epochs."""
    import json

    fileio.write_text(path, "".join(json.dumps(r) + "\n" for r in history))
