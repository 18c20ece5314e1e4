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
from compressor.attention import AttentionPair, Taps
from compressor.config import Config
from compressor.data import Augment, DeviceBatches, ImageData
from compressor.errors import CheckpointError, TrainingError
from compressor.events import SILENT, Reporter
from compressor.losses import Objective, distillation_terms, input_gradient

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        from compressor.errors import ConfigError

        raise ConfigError("--device cuda asked for but no CUDA device is available; use --device cpu or auto")
    return torch.device(requested)


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


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived; the state was saved at a step boundary."""


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
        self.raised = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def _check_finite(terms: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    for name, value in terms.items():
        if name != "loss" and not torch.isfinite(value):
            raise TrainingError(f"the {name} loss became {float(value)} at epoch {epoch}, step {step}; lower the learning rate "
                                f"or beta; the last good checkpoint is kept")
    if not torch.isfinite(terms["loss"]):
        raise TrainingError(f"the loss became non-finite at epoch {epoch}, step {step}; lower the learning rate")


def train_one_epoch(student: nn.Module, batches: DeviceBatches, optimizer: torch.optim.Optimizer, objective: Objective,
                    epoch: int, teacher: Teacher | None = None, beta: float | None = None, bf16: bool = True,
                    stats: EpochStats | None = None, reporter: Reporter = SILENT, stop: _StopFlag | None = None,
                    on_stop=None) -> EpochStats:
    student.train()
    stats = stats or EpochStats()
    grad_at = teacher is not None and objective.uses_at and objective.gradient
    pairs = list(teacher.pairs) if teacher and objective.uses_at and not grad_at else []
    s_taps = Taps(student, [p.student.module for p in pairs])
    t_taps = Taps(teacher.model, [p.teacher.module for p in pairs]) if pairs else None
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
            terms["loss"].backward()
            optimizer.step()
            n = len(y)
            stats.add({k: v.detach() for k, v in terms.items()}, int((logits.argmax(1) == y).sum()), n)
            stats.seconds += time.perf_counter() - t0
            step += 1
            reporter.advance(1, loss=float(terms["loss"].detach()), img_s=stats.seen / max(stats.seconds, 1e-9))
            if stop is not None and stop.raised is not None:
                if on_stop is not None:
                    on_stop(epoch, step, stats)
                raise StopRequested()
    finally:
        s_taps.remove()
        if t_taps:
            t_taps.remove()
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, batches: DeviceBatches, bf16: bool = True) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over ``batches``."""
    was_training = model.training
    model.eval()
    correct, total, loss = 0, 0, 0.0
    for x, y in batches:
        with _autocast(batches.device, bf16):
            logits = model(x)
        loss += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return {"top1": 100.0 * correct / max(total, 1), "loss": loss / max(total, 1)}


@dataclass
class FitResult:
    history: list[dict[str, float]]
    final: dict[str, float]
    seconds: float


def make_batches(data: ImageData, cfg: Config, mean, std, device: torch.device, rank: int = 0, world: int = 1):
    aug = Augment(cfg.data.crop_padding, cfg.data.flip)
    train = DeviceBatches(data.train_x, data.train_y, cfg.train.batch_size, mean, std, device, True, aug,
                          cfg.train.seed, rank=rank, world_size=world)
    test = DeviceBatches(data.test_x, data.test_y, max(cfg.train.batch_size, 256), mean, std, device, False)
    return train, test


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device):
    t = cfg.train
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    # BN and bias parameters without weight decay, as most WRN reimplementations; the reference
    # code decays everything, a difference of a few hundredths of a point.
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov, foreach=device.type == "cuda")
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(t.milestones), gamma=t.gamma)
    return opt, sched


def _beta_at(cfg: Config, epoch: int) -> float:
    if cfg.distill.beta_schedule == "decay":
        return cfg.distill.beta * (1 - epoch / cfg.train.epochs)
    return cfg.distill.beta


def _save_state(path: Path, student, opt, sched, epoch: int, step: int, history, stats: EpochStats | None) -> None:
    fileio.torch_save(path, {
        "model": student.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "epoch": epoch, "step": step, "history": history,
        "stats": None if stats is None else {"sums": stats.sums, "correct": stats.correct, "seen": stats.seen,
                                              "steps": stats.steps, "seconds": stats.seconds},
        "rng": torch.get_rng_state(),
    })


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"the training state {path} is unreadable ({type(exc).__name__}); start again without --resume") from exc


def fit(student: nn.Module, data: ImageData, cfg: Config, out_dir: str | Path, mean, std, teacher: Teacher | None = None,
        objective: Objective | None = None, device: torch.device | None = None, reporter: Reporter = SILENT,
        resume: bool = False, bf16: bool = True, tag: str = "") -> FitResult:
    """Train ``student`` for ``cfg.train.epochs``; distil from ``teacher`` when the objective uses one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or pick_device()
    objective = objective or objective_from(cfg, "none")
    torch.manual_seed(cfg.train.seed)
    student.to(device)
    if teacher is not None:
        teacher.model.to(device).eval().requires_grad_(False)
    train_b, test_b = make_batches(data, cfg, mean, std, device)
    opt, sched = make_optimizer(student, cfg, device)
    state_path, metrics_path = out_dir / STATE_FILE, out_dir / METRICS_FILE
    history: list[dict[str, float]] = []
    start_epoch, start_step, stats = 0, 0, None
    if resume and state_path.exists():
        st = _load_state(state_path)
        student.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"])
        start_epoch, start_step, history = st["epoch"], st["step"], list(st["history"])
        stats = EpochStats(**st["stats"]) if st["stats"] else None
        reporter.info(f"resuming {tag or 'training'} at epoch {start_epoch + 1}, step {start_step}")
        _rewrite_metrics(metrics_path, history)
    began = time.perf_counter()
    with _StopFlag() as stop:
        for epoch in range(start_epoch, cfg.train.epochs):
            train_b.set_epoch(epoch, start_step)
            reporter.task(f"{tag} epoch {epoch + 1}/{cfg.train.epochs}".strip(), len(train_b))
            save = lambda e, s, st_: _save_state(state_path, student, opt, sched, e, s, history, st_)  # noqa: E731
            try:
                stats = train_one_epoch(student, train_b, opt, objective, epoch + 1, teacher, _beta_at(cfg, epoch), bf16,
                                        stats, reporter, stop, on_stop=lambda e, s, st_: save(e - 1, s, st_))
            except StopRequested:
                reporter.done("stopped")
                raise
            sched.step()
            record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **stats.means(),
                      "train_top1": 100.0 * stats.correct / max(stats.seen, 1),
                      **{f"test_{k}": v for k, v in evaluate(student, test_b, bf16).items()},
                      "images_per_s": stats.seen / max(stats.seconds, 1e-9)}
            history.append(record)
            fileio.append_jsonl(metrics_path, record)
            _save_state(state_path, student, opt, sched, epoch + 1, 0, history, None)
            reporter.done(f"{tag} epoch {epoch + 1}: test top-1 {record['test_top1']:.2f}%  loss {record['train_loss']:.3f}".strip())
            stats, start_step = None, 0
    final = history[-1] if history else {}
    return FitResult(history, final, time.perf_counter() - began)


def _rewrite_metrics(path: Path, history: list[dict[str, float]]) -> None:
    """On resume, metrics.jsonl is rebuilt from the saved state, dropping lines of lost epochs."""
    import json

    fileio.write_text(path, "".join(json.dumps(r) + "\n" for r in history))

