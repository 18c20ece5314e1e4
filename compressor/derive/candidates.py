"""Student derivation: thinner (fewer channels) and shallower (fewer blocks per stage).

Family rules cover the zoo: WRN-d-k (blocks n = (d-4)/6, width k), CIFAR ResNets (n = (d-2)/6,
base width) and torchvision-style ResNets (blocks per stage, width multiplier). A student is
described by the same registry family with smaller arguments, so it is a zoo model like any
other. Any other traceable CNN (torchvision's MobileNets, EfficientNet, VGG, RegNet, a user's own
``file.py:Class``) gets a *derived* student instead: the teacher's own architecture thinned and
shortened by ``compressor.derive.thinning``, described by a plan stored with the spec. ``ladder`` lists
candidates with their measured params and GMACs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from compressor.config import Config
from compressor.derive.rules import has_family_rule, ladder_archs, student_arch
from compressor.derive.search import Target
from compressor.derive.thinning import parse_widths
from compressor.errors import ConfigError, ModelError
from compressor.events import SILENT, Reporter
from compressor.load import TeacherAndData
from compressor.models.plan import ThinningPlan
from compressor.models.registry import Arch, parse_arch
from compressor.models.spec import ModelSpec
from compressor.profiling.counts import count_macs, count_params

INITS = ("auto", "inherit", "scratch")


@dataclass(frozen=True)
class Candidate:
    spec: ModelSpec
    params: int
    gmacs: float
    param_ratio: float  # teacher / student
    mac_ratio: float
    gmacs_conv_linear: float = 0.0  # convolutions and matrix products alone (torchvision's convention)

    @property
    def name(self) -> str:
        return self.spec.name


def spec_like(teacher: ModelSpec, arch: Arch) -> ModelSpec:
    return ModelSpec(arch.family, dict(arch.kwargs), teacher.num_classes, list(teacher.class_names),
                     tuple(teacher.input_size), teacher.mean, teacher.std)


def measure(spec: ModelSpec, teacher_params: int, teacher_gmacs: float) -> Candidate:
    model = spec.build()
    params = count_params(model)["total"]
    macs = count_macs(model, spec.input_size)
    return Candidate(spec, params, macs.gmacs, teacher_params / params, teacher_gmacs / macs.gmacs, macs.conv_linear_gmacs)


def thinned(teacher: ModelSpec, plan: ThinningPlan, student: nn.Module, teacher_params: int, teacher_gmacs: float) -> Candidate:
    """A derived student as a candidate: the teacher's spec plus the plan that thins it."""
    if teacher.plan is not None:  # the teacher is itself derived: its plan is replayed first
        plan = replace(plan, base=teacher.plan)
    spec = replace(teacher, plan=plan)
    params = count_params(student)["total"]
    macs = count_macs(student, teacher.input_size)
    return Candidate(spec, params, macs.gmacs, teacher_params / params, teacher_gmacs / macs.gmacs, macs.conv_linear_gmacs)


def derived_candidate(teacher: ModelSpec, model: nn.Module, width: float | str | dict[str, float],
                      max_blocks: int | None = None) -> Candidate:
    """Thin ``model`` (the trained teacher: magnitudes rank its channels) at ``width`` with at most
    ``max_blocks`` blocks per stage."""
    from compressor.derive.thinning import thin

    student, plan = thin(model, teacher.input_size, width, max_blocks, teacher_arch=arch_ref(teacher))
    tp, tm = count_params(model)["total"], count_macs(model, teacher.input_size).gmacs
    return thinned(teacher, plan, student, tp, tm)


def arch_ref(teacher: ModelSpec) -> dict[str, Any]:
    return {"family": teacher.family, "kwargs": dict(teacher.arch_kwargs), "name": teacher.name}


def derived_ladder(teacher: ModelSpec, model: nn.Module | None = None) -> list[Candidate]:
    """Thinned students at widths 0.75/0.5/0.25, with all blocks and with fewer blocks per stage."""
    from compressor.derive.search import depth_options
    from compressor.derive.thinning import Thinner

    model = model if model is not None else teacher.build()
    tp, tm = count_params(model)["total"], count_macs(model, teacher.input_size).gmacs
    first = Thinner(model, teacher.input_size, None, teacher_arch=arch_ref(teacher))
    cands, seen = [], set()
    for cap in depth_options(first.stages):
        thinner = first if cap is None else Thinner(model, teacher.input_size, cap, teacher_arch=arch_ref(teacher), check=False)
        for width in ([1.0] if cap is not None else []) + [0.75, 0.5, 0.25]:
            student, plan = thinner.student(width, describe=False)
            key = tuple(sorted(plan.channels.items())) + tuple(plan.removed_blocks)
            if key not in seen:
                seen.add(key)
                cands.append(thinned(teacher, plan, student, tp, tm))
    return cands


def ladder(teacher: ModelSpec, model: nn.Module | None = None) -> list[Candidate]:
    """Every candidate, largest first, with params, GMACs and ratios to the teacher: family rules for
    the zoo's WRNs and ResNets, derived (thinned) students for any other traceable CNN."""
    if not has_family_rule(teacher.arch):
        return sorted(derived_ladder(teacher, model), key=lambda c: -c.gmacs)
    model = teacher.build()
    tp, tm = count_params(model)["total"], count_macs(model, teacher.input_size).gmacs
    cands = [measure(spec_like(teacher, a), tp, tm) for a in ladder_archs(teacher.arch)]
    return sorted(cands, key=lambda c: -c.gmacs)


@dataclass(frozen=True)
class StudentChoice:
    """Which students a run trains: zoo ``names``; or a student derived from the teacher, thinned to
    ``width`` (one ratio, or per stage as ``0.75,layer4=0.5``) with at most ``blocks_per_stage``
    blocks, or searched until it meets ``target``; or else ``count`` candidates nearest the preset's
    policy (0 or 1: the policy student alone). ``init`` says whether a derived student inherits the
    teacher's surviving weights (``auto``/``inherit``) or starts fresh (``scratch``). Naming students
    and deriving one are exclusive; the rules are checked when the choice is made."""

    names: tuple[str, ...] = ()
    count: int = 0
    width: float | str | None = None
    blocks_per_stage: int | None = None
    target: Target | None = None
    init: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(self.names or ()))
        twice = next((n for i, n in enumerate(self.names) if n.strip().lower() in [m.strip().lower() for m in self.names[:i]]), None)
        if twice is not None:  # both would train into the same folder, the second over the first
            raise ConfigError(f"--student {twice!r} is named twice; name each student once")
        if self.names and (self.width is not None or self.blocks_per_stage is not None or self.target is not None):
            raise ConfigError("--student names a zoo student; drop it to derive one with --width-ratio/--blocks-per-stage/--target-speedup")
        if self.target is not None and self.width is not None:
            raise ConfigError("--target-speedup searches the width itself; drop --width-ratio (or --target-speedup)")
        if self.init not in INITS:
            raise ConfigError(f"--init {self.init} is unknown; choose one of {', '.join(INITS)}")
        if self.width is not None:
            parse_widths(self.width)  # reject a malformed value before loading anything


def choose_students(teacher: ModelSpec, cfg: Config, choice: StudentChoice = StudentChoice(), *,
                    teacher_model: nn.Module | None = None, reporter: Reporter = SILENT) -> list[Candidate]:
    """``choice.names`` if given; a derived student meeting ``choice.target`` (a search) or thinned to
    ``choice.width``; else the ``choice.count`` ladder candidates nearest the preset policy; else the
    policy student. Teachers without a family rule (any other traceable CNN) get derived students.
    ``teacher_model`` (the trained teacher) ranks channels for derived students; without it a fresh
    build does."""
    names, count, width, blocks_per_stage, target = choice.names, choice.count, choice.width, choice.blocks_per_stage, choice.target
    t_model = teacher_model if teacher_model is not None else teacher.build()
    tp, tm = count_params(t_model)["total"], count_macs(t_model, teacher.input_size).gmacs
    if names:
        return [measure(spec_like(teacher, parse_arch(n)), tp, tm) for n in names]
    if target is not None:
        from compressor.derive.search import search

        reporter.info(f"searching a student of {teacher.name} for {target.describe()}")
        found = search(t_model, teacher.input_size, target, teacher_arch=arch_ref(teacher),
                       blocks_per_stage=blocks_per_stage, reporter=reporter)
        return [thinned(teacher, found.plan, found.student, tp, tm)]
    explicit = width is not None or blocks_per_stage is not None
    if explicit or not has_family_rule(teacher.arch):
        # Given one of width/depth, the other is left alone (None keeps every block); given neither, the preset's policy.
        policy = derived_candidate(teacher, t_model, width if width is not None else (1.0 if explicit else cfg.student.width_ratio),
                                   blocks_per_stage if explicit else cfg.student.blocks_per_stage)
        rungs = partial(derived_ladder, teacher, t_model)  # built only when more than one student is wanted
    else:
        policy = measure(spec_like(teacher, student_arch(teacher.arch, cfg.student.blocks_per_stage, cfg.student.width_ratio)), tp, tm)
        rungs = partial(ladder, teacher)
    if count <= 1:
        return [policy]
    others = [c for c in rungs() if c.name != policy.name]
    others.sort(key=lambda c: abs(math.log(c.gmacs / policy.gmacs)))
    return [policy] + others[: count - 1]


def choose(loaded: TeacherAndData, cfg: Config, choice: StudentChoice = StudentChoice(), reporter: Reporter = SILENT) -> list[Candidate]:
    """The choose step of compress, the dry run and sweep: the students of ``choice`` for a loaded
    teacher (its trained weights rank the channels of a derived student), and a note for any that
    is larger than the teacher."""
    candidates = choose_students(loaded.spec, cfg, choice, teacher_model=loaded.model, reporter=reporter)
    warn_larger_students(candidates, loaded.spec.name, reporter)
    return candidates


def warn_larger_students(candidates: list[Candidate], teacher: str, reporter: Reporter) -> None:
    """A "student" with more parameters or multiply-adds than its teacher is allowed, but never silently."""
    for c in candidates:
        if c.param_ratio < 1 or c.mac_ratio < 1:
            reporter.info(f"note: student {c.name} is larger than the teacher {teacher}: {1 / c.param_ratio:.2f}x its params and "
                          f"{1 / c.mac_ratio:.2f}x its GMACs; it will not be faster")


def resolve_init(init: str, spec: ModelSpec) -> str:
    """``auto``: a derived (thinned) student inherits the teacher's surviving weights; a zoo student starts from scratch."""
    if init not in INITS:
        raise ConfigError(f"--init {init} is unknown; choose one of {', '.join(INITS)}")
    if init == "inherit" and spec.plan is None:
        raise ConfigError(f"--init inherit needs a student derived from the teacher ({spec.name} is a zoo architecture); "
                          "use --width-ratio or --target-speedup, or --init scratch")
    return ("inherit" if spec.plan is not None else "scratch") if init == "auto" else init


def teacher_ladder(teacher: str | Path, *, arch: str | None = None, trust: bool = False,
                   input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10) -> tuple[ModelSpec, list[Candidate]]:
    """``atc derive``: the student ladder of a checkpoint or of an architecture name."""
    from compressor.models.checkpoint import check_model_source, read_model
    from compressor.models.importers import not_rebuildable

    check_model_source(teacher)
    if Path(teacher).exists():
        loaded = read_model(teacher, arch=arch, trust=trust, input_size=input_size)
        if loaded.spec.family == "module":
            raise ModelError(not_rebuildable(teacher, loaded.source))
        return loaded.spec, ladder(loaded.spec, loaded.model)
    spec = ModelSpec.for_arch(str(teacher), num_classes, input_size=input_size)
    return spec, ladder(spec)
