"""ModelSpec: what a checkpoint stores to rebuild a model without pickled code: the registry family
and its builder's keyword arguments (``timm:NAME`` is family ``timm`` with ``{"name": NAME}``,
``tv:NAME`` family ``torchvision``), the classes, the input, the normalisation and, for a derived
student, its thinning plan."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from compressor.errors import CheckpointError, ModelError
from compressor.models.plan import ThinningPlan, apply_plan
from compressor.models.registry import Arch, parse_arch
from compressor.models.trust import NO_TRUST, Trust


@dataclass
class ModelSpec:
    """What it takes to rebuild a model and feed it: architecture, classes, input, normalisation."""

    family: str
    arch_kwargs: dict[str, Any]
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    input_size: tuple[int, int, int] = (3, 32, 32)
    mean: list[float] | None = None  # None: not known (plain state_dict); taken from the data
    std: list[float] | None = None
    plan: ThinningPlan | None = None  # thinning plan of a derived student, when there is one

    def __post_init__(self):
        if self.plan is not None and not isinstance(self.plan, ThinningPlan):  # read from a checkpoint
            self.plan = ThinningPlan.from_dict(self.plan)

    @property
    def arch(self) -> Arch:
        return Arch(self.family, self.arch_kwargs)

    @property
    def name(self) -> str:
        return self.arch.name if self.plan is None else self.plan.name

    def build(self) -> nn.Module:
        model = self.arch.build(self.num_classes)
        if self.plan is not None:
            model = apply_plan(model, self.plan, self.input_size)
        return model

    @classmethod
    def for_arch(cls, name: str, num_classes: int, **extra: Any) -> "ModelSpec":
        arch = parse_arch(name)
        return cls(arch.family, dict(arch.kwargs), num_classes, **extra)

    @classmethod
    def from_stored(cls, raw: Any, where: str, trust: Trust = NO_TRUST) -> "ModelSpec":
        """The spec a checkpoint stores, checked field by field (a problem names ``where`` and the
        field) and admitted by ``trust`` (``models/trust.py``) before anything is built from it."""
        if not isinstance(raw, dict):
            raise _bad(where, "spec", f"must be a dict, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}  # fields of a newer atc are left out
        for name in ("family", "arch_kwargs", "num_classes"):
            if name not in values:
                raise _bad(where, name, "is missing")
        if not isinstance(values["family"], str):
            raise _bad(where, "family", f"must be a string, got {values['family']!r}")
        classes = values["num_classes"]
        if not _whole(classes, 1):
            raise _bad(where, "num_classes", f"must be a whole number of at least 1, got {classes!r}")
        names = values.get("class_names") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) not in (0, classes):
            raise _bad(where, "class_names", f"must be a list of {classes} names, got {_short(names)}")
        size = values.get("input_size", (3, 32, 32))
        if not isinstance(size, (list, tuple)) or len(size) != 3 or not all(_whole(v, 1) for v in size):
            raise _bad(where, "input_size", f"must be [channels, height, width], got {_short(size)}")
        for name in ("mean", "std"):
            v = values.get(name)
            if v is not None and not (isinstance(v, (list, tuple)) and len(v) == size[0]
                                      and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
                raise _bad(where, name, f"must be {size[0]} finite numbers or null, got {_short(v)}")
        if values.get("std") is not None and min(values["std"]) <= 0:
            raise _bad(where, "std", f"must be positive, got {_short(values['std'])}")
        plan = values.get("plan")
        if plan is not None and not isinstance(plan, dict):
            raise _bad(where, "plan", f"must be a dict or null, got {type(plan).__name__}")
        arch = trust.admit(Arch(values["family"], values["arch_kwargs"]), where)
        values.update(arch_kwargs=dict(arch.kwargs), input_size=tuple(int(v) for v in size),
                      class_names=list(names))
        try:
            return cls(**values)
        except (TypeError, ValueError, ModelError) as exc:  # a plan with fields of the wrong kind
            raise _bad(where, "plan", f"is damaged ({exc})") from None


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(where: str, name: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{where}: spec field {name!r} {problem}; the file is damaged or not made by this atc, re-save it with atc")
