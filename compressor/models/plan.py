"""Thinning plans: replay a derived student's plan (removed blocks, kept channels) on its teacher's architecture."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
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
class StageRow:
    """One stage of a derived student beside its teacher's: blocks kept of the teacher's (None where
    the stage is a resolution stage rather than a run of removable blocks) and width in channels."""

    stage: str
    blocks: int | None
    teacher_blocks: int | None
    width: int | None
    teacher_width: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | StageRow) -> StageRow:
        return d if isinstance(d, StageRow) else cls(**{f.name: d.get(f.name) for f in fields(cls)})


@dataclass
class SearchSummary:
    """What a ``--target-speedup`` search found: the target, what the chosen student achieves and
    whether that is within ``tolerance``, its width and block cap, every trial (``Trial.to_dict()``),
    and for a latency target the runtime it was timed on and, after the confirming measurement,
    its spread, rounds and medians."""

    target: float
    by: str
    achieved: float
    met: bool
    tolerance: float
    width: float
    max_blocks: int | None
    trials: list[dict[str, Any]]
    mac_ratio: float
    param_ratio: float
    runtime: str | None = None
    batch_size: int | None = None
    threads: int | None = None
    spread: list[float] | None = None
    rounds: int | None = None
    teacher_ms: float | None = None
    student_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """As stored in checkpoints and report.json: the latency keys only for a latency target, the
        confirming measurement's only when there was one."""
        d = asdict(self)
        if self.by != "latency":
            for k in ("runtime", "batch_size", "threads"):
                del d[k]
        if self.spread is None:
            for k in ("spread", "rounds", "teacher_ms", "student_ms"):
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | SearchSummary) -> SearchSummary:
        if isinstance(d, SearchSummary):
            return d
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ThinningPlan:
    """How a derived student differs from its teacher's architecture: blocks replaced by identities,
    and for every thinned layer the channel indices it keeps (per dimension, teacher-relative).
    ``channels`` (every layer's output count after replay) checks that a replay matches; ``stages``
    and ``search`` describe the student for reports. ``base`` is the plan of a teacher that was
    itself derived. Serialised with ``to_dict``/``from_dict`` into checkpoints."""

    name: str
    kept: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    removed_blocks: list[str] = field(default_factory=list)
    channels: dict[str, int] = field(default_factory=dict)
    teacher_arch: dict[str, Any] = field(default_factory=dict)
    width: dict[str, float] = field(default_factory=dict)
    max_blocks: int | None = None
    round_to: int = 8
    classifier: str | None = None
    stages: list[StageRow] = field(default_factory=list)
    search: SearchSummary | None = None
    base: ThinningPlan | None = None
    version: int = PLAN_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["stages"] = [row.to_dict() for row in self.stages]
        d["search"] = None if self.search is None else self.search.to_dict()
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
        values["stages"] = [StageRow.from_dict(row) for row in values.get("stages") or []]
        if values.get("search") is not None:
            values["search"] = SearchSummary.from_dict(values["search"])
        if values.get("base") is not None:
            values["base"] = cls.from_dict(values["base"])
        return cls(**values)

    def own(self) -> ThinningPlan:
        """This plan without its base: what turns the (derived) teacher itself into the student."""
        return replace(self, base=None)


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
