"""Family rules: how the zoo's WRNs and ResNets get thinner (width) and shallower (blocks per
stage) while staying zoo architectures. A ``resnetDxK`` student keeps its family's stem rule, so
resnet32x4 thins to resnet32x2 and resnet8x1, the KD literature's own names."""

from __future__ import annotations

import math
from typing import Any

from compressor.errors import ModelError
from compressor.models.registry import Arch

FAMILY_RULES = ("wrn", "wrn_td", "cifar_resnet", "kd_resnet", "resnet")


def has_family_rule(arch: Arch) -> bool:
    return arch.family in FAMILY_RULES


def _blocks_and_width(arch: Arch) -> tuple[list[int], float]:
    k = arch.kwargs
    if arch.family in ("wrn", "wrn_td"):
        return [(k["depth"] - 4) // 6] * 3, float(k["width"])
    if arch.family == "cifar_resnet":
        return [(k["depth"] - 2) // 6] * 3, float(k.get("width", 16))
    if arch.family == "kd_resnet":
        return [(k["depth"] - 2) // 6] * 3, float(k["k"])
    if arch.family == "resnet":
        return list(k["layers"]), float(k.get("width", 1.0))
    raise ModelError(f"atc has no family rule for {arch.name!r}; pass --student NAME with a zoo architecture")


def _with(arch: Arch, blocks: list[int], width: float) -> Arch:
    k: dict[str, Any] = dict(arch.kwargs)
    if arch.family in ("wrn", "wrn_td"):
        k.update(depth=6 * blocks[0] + 4, width=int(width) if float(width).is_integer() else width)
    elif arch.family == "cifar_resnet":
        k.update(depth=6 * blocks[0] + 2, width=max(4, int(round(width))))
    elif arch.family == "kd_resnet":
        mult = max(0.25, round(width * 16) / 16)  # 16K channels stay whole; 4/8/16 is the thinnest
        k.pop("stem", None)
        k.update(depth=6 * blocks[0] + 2, k=int(mult) if float(mult).is_integer() else mult)
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
            if teacher.family in ("wrn", "wrn_td") and width * r < 0.25:
                continue
            if teacher.family == "kd_resnet" and width * r < 0.5:
                continue
            arch = _with(teacher, [min(b, cap) for b in blocks], width * r)
            if arch.name not in seen:
                seen.add(arch.name)
                out.append(arch)
    return out
