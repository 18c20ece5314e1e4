"""Distil one student: a chosen candidate, trained from the teacher (or its finished checkpoint
reused on ``--resume``), saved with its metrics, returned as a ``DistilledStudent``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor import distributed, fileio
from compressor.config import Config
from compressor.derive.candidates import Candidate, resolve_init
from compressor.derive.thinning import inherit
from compressor.device import example_input, model_device
from compressor.distill.hints import make_regressor
from compressor.distill.loop import FitOptions, fit, objective_from
from compressor.distill.losses import Objective
from compressor.distill.runtime import Teacher
from compressor.distill.state import METRICS_FILE, STATE_FILE, check_finished
from compressor.distill.tensorboard import epoch_logger
from compressor.errors import ConfigError
from compressor.events import SILENT, Reporter, RunClock, calls_each
from compressor.load import TeacherAndData, normalization
from compressor.models.checkpoint import load_model, save_checkpoint
from compressor.models.outputs import ensure_logits
from compressor.models.spec import ModelSpec
from compressor.options import RunOptions
from compressor.pair import find_pairs, hint_pair, select_pairs


@dataclass
class DistilledStudent:
    """A trained student as the measure step needs it: the model (on the CPU), how to rebuild it, the
    folder its files are in, and what its training gave: last-epoch test top-1 (%), the per-epoch
    history, the training seconds (without compilation), how it started (``init``) and the AT pairs
    it was trained with, and what its training step ran as (``cuda_graphs``: ``GraphStatus.to_dict()``,
    captured with the count, off with why, failed with the first line of the error; None for a
    checkpoint from before atc recorded it). ``metrics()`` is the dict stored in its checkpoint."""

    model: nn.Module
    spec: ModelSpec
    dir: Path
    top1: float
    method: str
    teacher: str
    epochs: int
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float | None = None
    init: str | None = None
    pairs: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0
    cuda_graphs: dict[str, Any] | None = None
    hint: str | None = None  # FitNet: the hint pair and its regressor (training machinery, not in the model)
    teacher_digest: str | None = None  # the weights it was distilled from (models.checkpoint.weights_digest)

    def metrics(self) -> dict[str, Any]:
        d = {"top1": self.top1, "history": self.history, "train_seconds": self.train_seconds, "method": self.method,
             "teacher": self.teacher, "epochs": self.epochs, "init": self.init, "pairs": self.pairs}
        if self.compile_seconds:
            d["compile_seconds"] = self.compile_seconds
        if self.cuda_graphs is not None:
            d["cuda_graphs"] = self.cuda_graphs
        if self.hint:
            d["hint"] = self.hint
        if self.teacher_digest:
            d["teacher_digest"] = self.teacher_digest
        return d

    @classmethod
    def from_checkpoint(cls, model: nn.Module, spec: ModelSpec, metrics: dict[str, Any], folder: Path, *, method: str,
                        teacher: str, epochs: int) -> DistilledStudent:
        """A finished student read back from its checkpoint; ``method``, ``teacher`` and ``epochs`` are
        those of the run that reuses it."""
        return cls(model, spec, folder, float(metrics["top1"]), method, teacher, epochs, list(metrics.get("history", [])),
                   metrics.get("train_seconds"), metrics.get("init"), list(metrics.get("pairs", [])),
                   float(metrics.get("compile_seconds", 0.0)), metrics.get("cuda_graphs"), metrics.get("hint"),
                   metrics.get("teacher_digest"))


def check_same_teacher(metrics: dict[str, Any], loaded: TeacherAndData, ckpt: Path) -> None:
    """A finished student is reused only for the teacher it was distilled from (students of an atc
    before the digest was stored are reused as before)."""
    was = metrics.get("teacher_digest")
    if was and was != loaded.teacher_digest:
        raise ConfigError(f"{ckpt} was distilled from another teacher (weights {was[:12]}, now {loaded.teacher_digest[:12]} "
                          f"of {loaded.spec.name}); pass --overwrite to train it again from this teacher, or use another --out")


def teacher_ties(student: nn.Module, teacher: nn.Module, input_size, cfg: Config, objective: Objective) -> Teacher:
    """The teacher with its attention pairs (``distill.at_layers`` of all stage pairs) and, for FitNet, the
    hint pair (``distill.fitnet_stage``, chosen among all stage pairs) and a fresh regressor for it."""
    every = find_pairs(student, teacher, example_input(teacher, input_size))
    ties = Teacher(teacher, select_pairs(every, cfg.distill.at_layers))
    if objective.uses_fitnet:
        ties.hint = hint_pair(every, cfg.distill.fitnet_stage)
        ties.regressor = make_regressor(ties.hint, cfg.distill.fitnet_regressor, cfg.train.seed)  # type: ignore[arg-type]
    return ties


def describe_hint(ties: Teacher) -> str | None:
    """``group1 32×16×16 → 1×1 conv 32→64 + BN (2,176 parameters) ↔ group1 64×16×16``, or None without a hint."""
    if ties.hint is None or ties.regressor is None:
        return None
    s, t = ties.hint.student, ties.hint.teacher
    return (f"{s.module} {'×'.join(map(str, s.shape))} → {ties.regressor.describe()} ↔ "
            f"{t.module} {'×'.join(map(str, t.shape))}")


def student_dir(out: Path, cand: Candidate, method: str) -> Path:
    """``students/NAME-METHOD``, with characters that some file systems refuse (``timm:…``) replaced."""
    return out / "students" / re.sub(r"[^A-Za-z0-9._-]", "_", f"{cand.name}-{method}")


def distill_student(cand: Candidate, loaded: TeacherAndData, cfg: Config, method: str, out: Path, device: torch.device, *,
                    init: str = "auto", options: RunOptions = RunOptions(), reporter: Reporter = SILENT,
                    clock: RunClock | None = None) -> DistilledStudent:
    """Train one student into ``out/students/NAME-METHOD`` (skipped when a finished checkpoint is already
    there and ``options.resume``; reloading it takes the command's ``loaded.trust``). A derived student
    starts from the teacher's surviving weights (``init="inherit"``) or from a fresh initialisation. ``options``: ``resume``, ``speed`` and
    ``tensorboard`` (a folder for per-epoch scalars)."""
    teacher, t_spec, data = loaded.model, loaded.spec, loaded.data
    mean, std = normalization(t_spec, data)
    spec = replace(cand.spec, mean=mean, std=std, class_names=list(t_spec.class_names or data.class_names))
    sdir = student_dir(out, cand, method)
    ckpt = sdir / "student.pt"
    if options.resume and ckpt.exists():
        model, spec, metrics = load_model(ckpt, trust=loaded.trust)
        check_finished(metrics, ckpt)
        check_same_teacher(metrics, loaded, ckpt)
        if distributed.is_main() and not (sdir / METRICS_FILE).exists():  # removed by hand: the checkpoint has the history
            fileio.write_text(sdir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in metrics.get("history", [])))
        ensure_logits(model, example_input(model, spec.input_size, batch=2), f"student {cand.name}")
        reporter.info(f"{cand.name} ({method}) already finished; reusing {ckpt}")
        return DistilledStudent.from_checkpoint(model, spec, metrics, sdir, method=method, teacher=t_spec.name,
                                                epochs=cfg.train.epochs)
    torch.manual_seed(cfg.train.seed)
    model = spec.build()
    init = resolve_init(init, spec)
    if init == "inherit":
        model.load_state_dict(inherit(teacher, spec.plan).state_dict())
    model.to(model_device(teacher))
    if note := ensure_logits(model, example_input(model, spec.input_size, batch=2), f"student {cand.name}"):
        reporter.info(note)
    objective = objective_from(cfg, method)
    ties = teacher_ties(model, teacher, spec.input_size, cfg, objective)
    on_epoch = calls_each(epoch_logger(options.tensorboard, sdir.name), clock.epoch_done if clock else None)
    fit_options = FitOptions(options.resume, f"{cand.name} ({method})", options.speed, on_epoch,
                             run={"student": cand.name, "teacher": loaded.teacher_digest})
    if clock is not None:
        clock.start()
    with fileio.kept_only_if_used(sdir):
        result = fit(model, data, cfg, sdir, mean, std, ties, objective, device, reporter, fit_options)
    done = DistilledStudent(model.cpu(), spec, sdir, result.final["test_top1"], method, t_spec.name, cfg.train.epochs,
                            result.history, result.seconds, init,
                            ["input gradient dL/dx"] if cfg.distill.attention == "gradient" else [p.describe() for p in ties.pairs],
                            result.compile_seconds, result.cuda_graphs.to_dict(), describe_hint(ties), loaded.teacher_digest)
    if distributed.is_main():
        save_checkpoint(ckpt, done.model, spec, done.metrics())
        if not options.keep_state:  # a finished student resumes from its checkpoint; the state only took space
            (sdir / STATE_FILE).unlink(missing_ok=True)
    return done
