"""Thinning plans: replay a derived student's plan (removed blocks, kept channels) on its teacher's architecture."""

from __future__ import annotations

from typing import Any, Mapping
from torch import nn
from compressor.errors import ModelError


PLAN_VERSION = 1

_CONV = nn.modules.conv._ConvNd


# --------------------------------------------------------------------------------------------
# Plans: derive, replay, describe


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def _out_channels(module: nn.Module) -> int | None:
    if isinstance(module, _CONV):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return None


def apply_plan(model: nn.Module, plan: Mapping[str, Any], input_size: tuple[int, int, int] | None = None) -> nn.Module:
    """Replay ``plan`` on ``model`` (the teacher architecture, in place): remove blocks, then keep the
    recorded channels of every layer. Returns ``model``. No tracing, so it is deterministic and fast."""
    from compressor import pruning

    if int(plan.get("version", 0)) > PLAN_VERSION:
        raise ModelError(f"this thinning plan has version {plan.get('version')}, newer than atc understands; upgrade atc")
    where = plan.get("name", "the student")
    if plan.get("base") is not None:  # derived from a derived teacher: rebuild that one first
        apply_plan(model, plan["base"], input_size)
    try:
        for name in plan.get("removed_blocks", []):
            model.get_submodule(name)
            _replace(model, name, nn.Identity())
        for name, dims in plan.get("kept", {}).items():
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
    for name, channels in plan.get("channels", {}).items():
        got = _out_channels(model.get_submodule(name))
        if got != channels:
            raise ModelError(f"thinning plan of {where}: layer {name} has {got} channels after replay, the plan says {channels}; "
                             "the teacher architecture changed since the student was derived")
    return model
