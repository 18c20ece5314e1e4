"""The dry run: what ``compress`` would do, with nothing trained or written. The teacher's size and,
per student, its shape (stages beside the teacher's), its attention pairs (for FitNet the hint pair and
its regressor's shape) and the loss terms on one training batch before any training (a check that β and
α, or the hint's weight, are sane).

Device rule: every tensor made here (example inputs, the batch) is made on the device of the model
it feeds, so a teacher already on CUDA meets CUDA tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.config import Config
from compressor.data.open import Dataset
from compressor.derive.candidates import Candidate, StudentChoice, choose
from compressor.derive.thinning import describe_stages
from compressor.device import example_input, model_device
from compressor.distill.loop import make_batches, objective_from
from compressor.distill.losses import distillation_terms, input_gradient
from compressor.distill.student import describe_hint, teacher_ties
from compressor.events import SILENT, Reporter, reporter_for
from compressor.load import load_teacher_and_data, normalization
from compressor.models.outputs import ensure_logits
from compressor.models.plan import StageRow
from compressor.models.spec import ModelSpec
from compressor.options import RunOptions
from compressor.pair import AttentionPair, tapped
from compressor.profiling.counts import count_macs, count_params


@dataclass
class DryRunStudent:
    """One student of a dry run: the candidate, its attention pairs, its loss terms before training and
    its stages beside the teacher's (blocks and width)."""

    student: Candidate
    pairs: list[AttentionPair]
    initial_terms: dict[str, float]
    stages: list[StageRow] = field(default_factory=list)
    hint: str | None = None  # FitNet: the hint pair and the regressor's shape (``distill.student.describe_hint``)


@dataclass
class DryRunReport:
    """What ``compress`` would do: the teacher's size and, per student, its shape, pairs and first loss terms."""

    teacher: str
    teacher_params: int
    teacher_gmacs: float
    method: str
    at_layers: str
    init: str
    students: list[DryRunStudent]

    def to_dict(self) -> dict[str, Any]:
        """``atc compress --dry-run --json``: plain data, the counts labelled as counts (not measured speed-ups)."""
        return {"teacher": self.teacher, "teacher_params": self.teacher_params, "teacher_gmacs": self.teacher_gmacs,
                "method": self.method, "at_layers": self.at_layers, "init": self.init,
                "students": [_student_dict(s) for s in self.students]}


def _student_dict(s: DryRunStudent) -> dict[str, Any]:
    c = s.student
    plan = c.spec.plan
    return {"name": c.name, "params": c.params, "gmacs": c.gmacs, "gmacs_conv_linear": c.gmacs_conv_linear,
            "param_ratio": c.param_ratio, "mac_ratio": c.mac_ratio,
            "pairs": [{"student": {"module": p.student.module, "shape": list(p.student.shape)},
                       "teacher": {"module": p.teacher.module, "shape": list(p.teacher.shape)}} for p in s.pairs],
            "initial_terms": dict(s.initial_terms), "stages": [r.to_dict() for r in s.stages],
            "search": plan.search.to_dict() if plan is not None and plan.search is not None else None}


def initial_terms(student: nn.Module, teacher: nn.Module, pairs: list[AttentionPair], data: Dataset, cfg: Config,
                  mean, std, method: str, hint: AttentionPair | None = None, regressor: nn.Module | None = None
                  ) -> dict[str, float]:
    """The loss terms on one training batch before any training, computed by ``distill.losses`` as
    training computes them (FitNet's hint through ``regressor``, fresh and in training mode, as the
    first step sees it). The batch is made on the teacher's device; the student must be there too."""
    train_b, _ = make_batches(data, cfg, mean, std, model_device(teacher))
    with train_b:
        x, y = next(iter(train_b))
    obj, grads, hinted = objective_from(cfg, method), None, None
    if obj.uses_fitnet:
        if hint is None or regressor is None:
            raise ValueError("FitNet's initial terms need the hint pair and its regressor")
        pairs = [hint]
    s_names, t_names = [p.student.module for p in pairs], [p.teacher.module for p in pairs]
    student.train(), teacher.eval()
    with tapped(student, s_names) as s_taps, tapped(teacher, t_names) as t_taps:
        with torch.no_grad():
            t_logits, logits = teacher(x), student(x)
            maps = list(zip(s_taps.take(s_names), t_taps.take(t_names)))
            if obj.uses_fitnet:
                (fs, ft), maps = maps[0], []
                hinted = (regressor.to(x.device).train()(fs), ft)
        if obj.gradient and obj.uses_at:
            xg = x.clone().requires_grad_(True)
            grads = (input_gradient(student, xg, y)[0], input_gradient(teacher, xg, y)[0])
        terms = distillation_terms(obj, logits, y, t_logits, maps, input_grads=grads, hint=hinted)
    return {k: float(v) for k, v in terms.items()}


def try_students(teacher: nn.Module, t_spec: ModelSpec, data: Dataset, cfg: Config, candidates: list[Candidate],
                 method: str, reporter: Reporter = SILENT) -> list[DryRunStudent]:
    """Each candidate built on the teacher's device, paired with the teacher and its first loss terms taken."""
    mean, std = normalization(t_spec, data)
    out = []
    for cand in candidates:
        torch.manual_seed(cfg.train.seed)
        student = cand.spec.build().to(model_device(teacher))
        if note := ensure_logits(student, example_input(student, t_spec.input_size, batch=2), f"student {cand.name}"):
            reporter.info(note)
        ties = teacher_ties(student, teacher, t_spec.input_size, cfg, objective_from(cfg, method))
        plan = cand.spec.plan
        stages = (plan.stages if plan is not None else []) or describe_stages(teacher, student, t_spec.input_size)
        terms = initial_terms(student, teacher, list(ties.pairs), data, cfg, mean, std, method, ties.hint, ties.regressor)
        out.append(DryRunStudent(cand, list(ties.pairs), terms, stages, describe_hint(ties)))
    return out


def dry_run(teacher_path: str | Path, data_spec: str | Path, cfg: Config, choice: StudentChoice = StudentChoice(),
            options: RunOptions = RunOptions(), *, reporter: Reporter = SILENT, progress: bool = False) -> DryRunReport:
    """Students, attention pairs and initial loss terms of a ``compress`` run, without training or writing.
    From ``options``: how to read the teacher (``arch``, ``trust``) and ``strict_data``. Quiet unless
    ``progress`` (plain lines on stderr) or a ``reporter`` is given."""
    reporter = reporter_for(reporter, progress)
    loaded = load_teacher_and_data(teacher_path, data_spec, cfg, options, reporter=reporter)
    model, spec = loaded.model, loaded.spec
    tp, tm = count_params(model)["total"], count_macs(model, spec.input_size).gmacs
    cands = choose(loaded, cfg, choice, reporter)
    return DryRunReport(spec.name, tp, tm, cfg.distill.method, cfg.distill.at_layers, choice.init,
                        try_students(model, spec, loaded.data, cfg, cands, cfg.distill.method, reporter))
