"""Student derivation: thinner (fewer channels) and shallower (fewer blocks per stage).

Family rules cover the zoo: WRN-d-k (blocks n = (d-4)/6, width k), CIFAR ResNets (n = (d-2)/6,
base width) and torchvision-style ResNets (blocks per stage, width multiplier). A student is
described by the same registry family with smaller arguments, so it is a zoo model like any
other. Any other traceable CNN (torchvision's MobileNets, EfficientNet, VGG, RegNet, a user's own
``file.py:Class``) gets a *derived* student instead: the teacher's own architecture thinned and
shortened by ``compressor.thinning``, described by a plan stored with the spec. ``ladder`` lists
candidates with their measured params and GMACs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from compressor.checkpoint import ModelSpec
from compressor.errors import ModelError
from compressor.models.registry import Arch
from compressor.profiling import count_macs, count_params


@dataclass(frozen=True)
class Candidate:
    spec: ModelSpec
    params: int
    gmacs: float
    param_ratio: float  # teacher / student
    mac_ratio: float

    @property
    def name(self) -> str:
        return self.spec.name


FAMILY_RULES = ("wrn", "cifar_resnet", "resnet")


def has_family_rule(arch: Arch) -> bool:
    return arch.family in FAMILY_RULES


def _blocks_and_width(arch: Arch) -> tuple[list[int], float]:
    k = arch.kwargs
    if arch.family == "wrn":
        return [(k["depth"] - 4) // 6] * 3, float(k["width"])
    if arch.family == "cifar_resnet":
        return [(k["depth"] - 2) // 6] * 3, float(k.get("width", 16))
    if arch.family == "resnet":
        return list(k["layers"]), float(k.get("width", 1.0))
    raise ModelError(f"atc has no family rule for '{arch.name}'; pass --student NAME with a zoo architecture")


def _with(arch: Arch, blocks: list[int], width: float) -> Arch:
    k: dict[str, Any] = dict(arch.kwargs)
    if arch.family == "wrn":
        k.update(depth=6 * blocks[0] + 4, width=int(width) if float(width).is_integer() else width)
    elif arch.family == "cifar_resnet":
        k.update(depth=6 * blocks[0] + 2, width=max(4, int(round(width))))
    else:
        k.update(layers=list(blocks), width=width)
    return Arch(arch.family, k)


def student_arch(teacher: Arch, blocks_per_stage: int, width_ratio: float) -> Arch:
    """The preset policy: at most ``blocks_per_stage`` blocks per stage, width × ``width_ratio``."""
    blocks, width = _blocks_and_width(teacher)
    return _with(teacher, [min(b, blocks_per_stage) for b in blocks], width * width_ratio)


def ladder_archs(teacher: Arch) -> list[Arch]:
    blocks, width = _blocks_and_width(teacher)
    deepest = max(blocks)
    block_caps = sorted({deepest, math.ceil(deepest / 2), max(1, deepest // 3), 1}, reverse=True)
    ratios = [1.0, 0.5, 0.25] if teacher.family != "cifar_resnet" else [1.0, 0.5]
    seen, out = {teacher.name}, []
    for cap in block_caps:
        for r in ratios:
            if teacher.family == "wrn" and width * r < 0.25:
                continue
            arch = _with(teacher, [min(b, cap) for b in blocks], width * r)
            if arch.name not in seen:
                seen.add(arch.name)
                out.append(arch)
    return out


def spec_like(teacher: ModelSpec, arch: Arch) -> ModelSpec:
    return ModelSpec(arch.family, dict(arch.kwargs), teacher.num_classes, list(teacher.class_names),
                     tuple(teacher.input_size), teacher.mean, teacher.std)


def measure(spec: ModelSpec, teacher_params: int, teacher_gmacs: float) -> Candidate:
    model = spec.build()
    params = count_params(model)["total"]
    gmacs = count_macs(model, spec.input_size).gmacs
    return Candidate(spec, params, gmacs, teacher_params / params, teacher_gmacs / gmacs)


def thinned(teacher: ModelSpec, plan: dict[str, Any], student: nn.Module, teacher_params: int, teacher_gmacs: float) -> Candidate:
    """A derived student as a candidate: the teacher's spec plus the plan that thins it."""
    if teacher.plan is not None:  # the teacher is itself derived: its plan is replayed first
        plan = {**plan, "base": teacher.plan}
    spec = replace(teacher, plan=plan)
    params = count_params(student)["total"]
    gmacs = count_macs(student, teacher.input_size).gmacs
    return Candidate(spec, params, gmacs, teacher_params / params, teacher_gmacs / gmacs)


def derived_candidate(teacher: ModelSpec, model: nn.Module, width: float | str | dict[str, float],
                      max_blocks: int | None = None) -> Candidate:
    """Thin ``model`` (the trained teacher: magnitudes rank its channels) at ``width`` with at most
    ``max_blocks`` blocks per stage."""
    from compressor.thinning import derive

    student, plan = derive(model, teacher.input_size, width, max_blocks, teacher_arch=arch_ref(teacher))
    tp, tm = count_params(model)["total"], count_macs(model, teacher.input_size).gmacs
    return thinned(teacher, plan, student, tp, tm)


def arch_ref(teacher: ModelSpec) -> dict[str, Any]:
    return {"family": teacher.family, "kwargs": dict(teacher.arch_kwargs), "name": teacher.name}


def derived_ladder(teacher: ModelSpec, model: nn.Module | None = None) -> list[Candidate]:
    """Thinned students at widths 0.75/0.5/0.25, with all blocks and with fewer blocks per stage."""
    from compressor.search import depth_options
    from compressor.thinning import Thinner

    model = model if model is not None else teacher.build()
    tp, tm = count_params(model)["total"], count_macs(model, teacher.input_size).gmacs
    first = Thinner(model, teacher.input_size, None, teacher_arch=arch_ref(teacher))
    cands, seen = [], set()
    for cap in depth_options(first.stages):
        thinner = first if cap is None else Thinner(model, teacher.input_size, cap, teacher_arch=arch_ref(teacher), check=False)
        for width in ([1.0] if cap is not None else []) + [0.75, 0.5, 0.25]:
            student, plan = thinner.student(width, describe=False)
            key = tuple(sorted(plan["channels"].items())) + tuple(plan["removed_blocks"])
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


def apply_plan(model: nn.Module, plan: dict[str, Any], input_size: tuple[int, int, int] | None = None) -> nn.Module:
    """Rebuild a derived student: replay its thinning plan on a freshly built teacher architecture."""
    from compressor.thinning import apply_plan as replay

    return replay(model, plan, input_size)
