"""Thinning plans: replay a derived student's plan (removed blocks, kept channels) on its teacher's architecture."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from torch import nn

from compressor.errors import ModelError

PLAN_VERSION = 1

CONV_TYPES = nn.modules.conv._ConvNd


# --------------------------------------------------------------------------------------------
# Plans: derive, replay, describe


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def out_channels_of(module: nn.Module) -> int | None:
    if isinstance(module, CONV_TYPES):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return None


@dataclass
class ThinningPlan:
    """How a derived student differs from its teacher's architecture: blocks replaced by identities,
    and for every thinned layer the channel indices it keeps (per dimension, teacher-relative).
    ``channels`` (every layer's output count after replay) checks that a replay matches; ``stages``
    and ``search`` describe the student for reports. ``base`` is the plan of a teacher that was
    itself derived. Serialised with ``to_dict``/``from_dict`` into checkpoints; it can also be read
    like that dict (``plan["kept"]``)."""

    name: str
    kept: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    removed_blocks: list[str] = field(default_factory=list)
    channels: dict[str, int] = field(default_factory=dict)
    teacher_arch: dict[str, Any] = field(default_factory=dict)
    width: dict[str, float] = field(default_factory=dict)
    max_blocks: int | None = None
    round_to: int = 8
    classifier: str | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    search: dict[str, Any] | None = None
    base: ThinningPlan | None = None
    version: int = PLAN_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["base"] = None if self.base is None else self.base.to_dict()
        return {k: v for k, v in d.items() if not (k in ("base", "search") and v is None)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | ThinningPlan) -> ThinningPlan:
        if isinstance(d, ThinningPlan):
            return d
        if int(d.get("version", 0)) > PLAN_VERSION:
            raise ModelError(f"this thinning plan has version {d.get('version')}, newer than atc understands; upgrade atc")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values.setdefault("name", "the student")
        if values.get("base") is not None:
            values["base"] = cls.from_dict(values["base"])
        return cls(**values)

    def own(self) -> ThinningPlan:
        """This plan without its base: what turns the (derived) teacher itself into the student."""
        return replace(self, base=None)

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        value = getattr(self, key)
        return value.to_dict() if isinstance(value, ThinningPlan) else value

    def get(self, key: str, default: Any = None) -> Any:
        try:
            value = self[key]
        except KeyError:
            return default
        return default if value is None else value


def apply_plan(model: nn.Module, plan: ThinningPlan | Mapping[str, Any], input_size: tuple[int, int, int] | None = None) -> nn.Module:
    """Replay ``plan`` on ``model`` (the teacher architecture, in place): remove blocks, then keep the
    recorded channels of every layer. Returns ``model``. No tracing, so it is deterministic and fast."""
    from compressor import pruning

    plan = ThinningPlan.from_dict(plan)
    where = plan.name
    if plan.base is not None:  # derived from a derived teacher: rebuild that one first
        apply_plan(model, plan.base, input_size)
    try:
        for name in plan.removed_blocks:
            model.get_submodule(name)
            replace_module(model, name, nn.Identity())
        for name, dims in plan.kept.items():
            module = model.get_submodule(name)
            pruner = pruning.layer_pruner(module)
            if pruner is None:
                raise ModelError(f"thinning plan of {where}: layer {name} ({type(module).__name__}) cannot be thinned")
            for dim, keep in dims.items():
                size = pruning.channels(pruner, module, dim == "out")
                if size is None or (keep and max(keep) >= size):
                    raise ModelError(f"thinning plan of {where} does not fit layer {name}; was the teacher architecture changed?")
                keep_set = set(keep)
                pruned = [i for i in range(size) if i not in keep_set]
                if pruned:
                    pruning.cut_channels(pruner, module, dim == "out", pruned)
    except AttributeError as exc:
        raise ModelError(f"thinning plan of {where} names a layer this architecture lacks ({exc}); "
                         "was the teacher architecture or its file changed?") from None
    for name, channels in plan.channels.items():
        got = out_channels_of(model.get_submodule(name))
        if got != channels:
            raise ModelError(f"thinning plan of {where}: layer {name} has {got} channels after replay, the plan says {channels}; "
                             "the teacher architecture changed since the student was derived")
    return model
