"""ModelSpec: what a checkpoint stores to rebuild a model without pickled code: the registry family
and its builder's keyword arguments (``timm:NAME`` is family ``timm`` with ``{"name": NAME}``,
``tv:NAME`` family ``torchvision``), the classes, the input, the normalisation and, for a derived
student, its thinning plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from compressor.models.plan import ThinningPlan, apply_plan
from compressor.models.registry import Arch, parse_arch


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
