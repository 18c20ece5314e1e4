"""Derive a student from any traceable CNN: fewer channels and fewer blocks, as a replayable plan.

Thinner: Torch-Pruning's dependency graph groups the layers whose channels are coupled (a
residual sum ties every block output of a stage to the stem; a depthwise convolution ties its
input to its output), ranks each group's channels by weight magnitude (group L2 norm) and keeps
``width × channels`` of them, rounded to a multiple of ``round_to`` (8 by default; each
group's rounding error is carried to the next, so the model's size follows the width smoothly
instead of in steps). The classifier's outputs are never touched. Width can differ per stage
(``{"layer4": 0.5}``: a module-name prefix).

Shallower: a *stage* is a run of consecutive blocks of one class in a sequential container,
where every block after the first keeps its input shape (a residual stage, a stage of
inverted-residual blocks). A block is a module with two or more convolutions. The last blocks
of a stage are replaced by ``nn.Identity`` until at most ``max_blocks`` (never fewer than one)
remain; every other module keeps its name, so attention pairing by name still works.

The plan is plain data: removed block names and, for every layer that lost channels, the indices
it kept (per dimension, relative to the teacher). ``apply_plan`` replays it on a freshly built
teacher architecture, deterministically and without tracing, so a derived student's checkpoint
(spec + plan + state_dict) loads with ``torch.load(weights_only=True)``. Replayed on the trained
teacher itself, the plan yields the student with the teacher's surviving weights (``inherit``).

Device rule: every traced forward runs on an input made on the traced model's own device
(``_example``), so a teacher on CUDA is traced on CUDA. Ranking and surgery work on a CPU copy
(``cpu_copy``): the teacher stays where it is and students come back on the CPU.
"""

from __future__ import annotations

import copy
import logging
import math
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from compressor.device import cpu_copy, random_input
from compressor.errors import ConfigError, ModelError
from compressor.models.plan import CONV_TYPES, StageRow, ThinningPlan, apply_plan, out_channels_of, replace_module
from compressor.quiet import quiet

ROUND_TO = 8


def _example(input_size: tuple[int, int, int], model: nn.Module) -> torch.Tensor:
    """The seeded trace input, on ``model``'s device (device rule: see ``compressor.device``)."""
    return random_input(model, input_size)


# --------------------------------------------------------------------------------------------
# Traceability


def _failing_module(model: nn.Module, exc: BaseException) -> str | None:
    """The innermost module of ``model`` whose ``forward`` is on the exception's traceback."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            owner = frame.f_locals.get("self")
            if id(owner) in names and frame.f_code.co_name == "forward":
                found = names[id(owner)] or f"the model ({type(owner).__name__})"
        exc = exc.__cause__ or exc.__context__
    return found


def check_traceable(model: nn.Module, input_size: tuple[int, int, int]) -> None:
    """Raise ``ModelError`` naming the module whose forward cannot be traced (data-dependent control flow).

    torch.fx is tried first (fast); only if it fails is ``torch.export`` asked, which accepts
    shape-dependent Python that fx rejects. Either succeeding is enough for thinning and ONNX export.
    """
    import torch.fx

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.fx.symbolic_trace(model)
        return
    except Exception as fx_exc:  # any failure: ask the exporter before blaming the model
        first = fx_exc
    was_training = model.training
    model.eval()
    try:
        with quiet(TRACE_LOGGERS, logging.CRITICAL, stderr=True):
            torch.export.export(model, (_example(input_size, model),), strict=False)
        return
    except Exception as exc:
        where = _failing_module(model, exc) or _failing_module(model, first) or type(model).__name__
        text = str(exc).strip()
        why = ("its forward branches on tensor values (data-dependent control flow)" if "data-dependent" in text
               else f"{text.splitlines()[0][:100] if text else type(exc).__name__}")
        raise ModelError(f"{where} cannot be traced: {why}; pass --student NAME with a zoo architecture "
                         "instead of deriving a student from this model") from exc
    finally:
        model.train(was_training)


# torch.export logs whole graphs when it gives up on a model; the one-line error is enough.
TRACE_LOGGERS = ("torch", "torch.fx", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")


# --------------------------------------------------------------------------------------------
# One recorded forward: who ran, in which order, on what shapes


@dataclass
class _Call:
    count: int = 0
    inp: torch.Tensor | None = None
    out: torch.Tensor | None = None

    @property
    def single(self) -> bool:
        return self.count == 1 and self.inp is not None and self.out is not None

    @property
    def keeps_shape(self) -> bool:
        return self.single and tuple(self.inp.shape) == tuple(self.out.shape)


def _record_calls(model: nn.Module, example: torch.Tensor) -> dict[str, _Call]:
    calls: dict[str, _Call] = {}
    handles = []
    for name, module in model.named_modules():
        def pre(mod, args, kwargs, name=name):
            c = calls.setdefault(name, _Call())
            c.count += 1
            c.inp = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) else None

        def post(mod, args, kwargs, output, name=name):
            calls[name].out = output if isinstance(output, torch.Tensor) else None

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    except Exception as exc:
        raise ModelError(f"a forward pass on input {tuple(example.shape[1:])} failed ({str(exc).splitlines()[0][:120]}); "
                         "check --input-size") from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls


def classifier_name(model: nn.Module, input_size: tuple[int, int, int], calls: dict[str, _Call] | None = None) -> str:
    """The last convolution or linear layer to run: the classifier whose outputs stay."""
    calls = calls if calls is not None else _record_calls(model, _example(input_size, model))
    order = [n for n in calls if n and isinstance(model.get_submodule(n), (CONV_TYPES, nn.Linear))]  # hooks ran in forward order
    if not order:
        raise ModelError(f"{type(model).__name__} has no convolution or linear layer to thin; pass --student NAME")
    return order[-1]


# --------------------------------------------------------------------------------------------
# Depth: stages of repeated, shape-keeping blocks


@dataclass(frozen=True)
class BlockStage:
    """Consecutive blocks of one class; every block after the first keeps its input shape."""

    name: str
    blocks: tuple[str, ...]

    def removed(self, max_blocks: int | None, min_blocks: int = 1) -> list[str]:
        if max_blocks is None:
            return []
        return list(self.blocks[max(min_blocks, max_blocks, 1):])


def _n_convs(module: nn.Module) -> int:
    return sum(isinstance(m, CONV_TYPES) for m in module.modules())


def _is_block(module: nn.Module, call: _Call | None) -> bool:
    return (call is not None and call.single and type(module) not in (nn.Sequential, nn.ModuleList)
            and any(True for _ in module.children()) and _n_convs(module) >= 2)


def _runs_in_order(container: nn.Module) -> bool:
    if isinstance(container, nn.ModuleList):
        return True  # checked below by chaining each block's input to its predecessor's output
    return isinstance(container, nn.Sequential) and type(container).forward is nn.Sequential.forward


def block_stages(model: nn.Module, input_size: tuple[int, int, int], calls: dict[str, _Call] | None = None) -> list[BlockStage]:
    """The stages whose trailing blocks can be removed, in forward order."""
    calls = calls if calls is not None else _record_calls(model, _example(input_size, model))
    stages: list[BlockStage] = []

    def visit(module: nn.Module, prefix: str) -> None:
        children = [(f"{prefix}.{n}" if prefix else n, c) for n, c in module.named_children()]
        members: set[str] = set()
        if _runs_in_order(module):
            run: list[str] = []
            previous: tuple[str, nn.Module] | None = None

            def close() -> None:
                if len(run) >= 2:
                    first, last = run[0].rsplit(".", 1)[-1], run[-1].rsplit(".", 1)[-1]
                    whole = len(run) == len(children)
                    stages.append(BlockStage(prefix if whole and prefix else f"{prefix}[{first}-{last}]", tuple(run)))
                    members.update(run)

            for name, child in children:
                call = calls.get(name)
                if not _is_block(child, call):
                    close()
                    run, previous = [], None
                    continue
                chained = (previous is not None and type(previous[1]) is type(child)
                           and calls[previous[0]].out is call.inp)
                if chained and call.keeps_shape:
                    run.append(name)
                else:
                    close()
                    run = [name]
                previous = (name, child)
            close()
        for name, child in children:
            if name not in members:
                visit(child, name)

    visit(model, "")
    return stages


# --------------------------------------------------------------------------------------------
# Width: Torch-Pruning groups, magnitude importance, kept indices


def _width_for(names: list[str], widths: Mapping[str, float]) -> float:
    """Per-stage widths: the most specific key that prefixes most of the group's layers; else the default."""
    votes: dict[str, int] = {}
    for n in names:
        keys = [k for k in widths if k and (n == k or n.startswith(k + "."))]
        if keys:
            best = max(keys, key=len)
            votes[best] = votes.get(best, 0) + 1
    if votes:
        return widths[max(votes, key=lambda k: (votes[k], -list(widths).index(k)))]
    return widths.get("", 1.0)


def keep_count(channels: int, width: float, round_to: int = ROUND_TO) -> int:
    """Channels kept: ``width × channels`` rounded to the nearest multiple of ``round_to``, at least
    ``round_to`` (or all of them, where a layer has fewer)."""
    if width >= 1.0:
        return channels
    step = max(1, round_to)
    keep = int(math.floor(channels * width / step + 0.5)) * step
    return max(min(step, channels), min(keep, channels))


def parse_widths(width: float | str | Mapping[str, float]) -> dict[str, float]:
    """``0.5`` → every stage at half width; ``"0.75,layer4=0.5"`` or ``{"": 0.75, "layer4": 0.5}``: per
    stage (module-name prefix), the bare number for the rest (1 when absent)."""
    if isinstance(width, str):
        out: dict[str, float] = {}
        for item in (i.strip() for i in width.split(",") if i.strip()):
            key, sep, value = item.rpartition("=")
            try:
                out[key.strip() if sep else ""] = float(value)
            except ValueError:
                raise ConfigError(f"--width-ratio {width!r} must look like 0.5 or 0.75,layer4=0.5") from None
        width = out
    widths = {"": float(width)} if isinstance(width, (int, float)) else {str(k): float(v) for k, v in width.items()}
    if not widths:
        raise ConfigError("--width-ratio is empty; use e.g. 0.5")
    for k, v in widths.items():
        if not 0 < v <= 1:
            raise ConfigError(f"--width-ratio {v:g}{' for ' + k if k else ''} must lie in (0, 1]; use e.g. 0.5")
    return widths


@dataclass
class _Group:
    root: nn.Module
    handler: Any
    members: list[str]   # layers whose output channels the group holds
    ch_groups: int       # grouped convolutions keep their group count; channels go per group
    order: list[int]     # channel positions (within one group), least important first


class Thinner:
    """One teacher at one depth: blocks removed, Torch-Pruning's dependency graph built and every
    channel group ranked once; ``student(width)`` then costs a copy and a replay, not a trace."""

    def __init__(self, teacher: nn.Module, input_size: tuple[int, int, int], max_blocks: int | None = None, *,
                 min_blocks: int = 1, round_to: int = ROUND_TO, teacher_arch: Mapping[str, Any] | None = None,
                 check: bool = True):
        from compressor import pruning

        if max_blocks is not None and max_blocks < 1:
            raise ConfigError(f"--blocks-per-stage must be at least 1, got {max_blocks}")
        if check:
            check_traceable(teacher, input_size)
        self.teacher, self.input_size, self.max_blocks, self.round_to = teacher, tuple(input_size), max_blocks, round_to
        self.teacher_arch = dict(teacher_arch or {})
        base = cpu_copy(teacher)  # eval: tracing must not touch batch-norm statistics; the teacher stays where it is
        calls = _record_calls(base, _example(input_size, base))
        self.stages = block_stages(base, input_size, calls)
        self.removed = [b for s in self.stages for b in s.removed(max_blocks, min_blocks)]
        self.classifier = classifier_name(base, input_size, calls)
        for b in self.removed:
            replace_module(base, b, nn.Identity())
        self.base = base
        modules = dict(base.named_modules())
        self._names = {id(m): n for n, m in modules.items()}
        pruning.check_torch_pruning()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.graph = pruning.dependency_graph(base, _example(input_size, base))
        except Exception as exc:
            raise ModelError(f"Torch-Pruning could not trace {type(teacher).__name__} ({str(exc).splitlines()[0][:120]}); "
                             "pass --student NAME with a zoo architecture") from exc
        self.groups: list[_Group] = []
        with torch.no_grad():
            for group in pruning.channel_groups(self.graph, ignored=[modules[self.classifier]]):
                members, ch_groups = [], 1
                for c in pruning.group_members(self.graph, group):
                    m = c.module
                    if c.parameter:
                        raise ModelError(f"{type(teacher).__name__} has a bare nn.Parameter tied to channels, which "
                                         "thinning does not support; pass --student NAME")
                    if isinstance(m, CONV_TYPES) and 1 < m.groups < m.out_channels:
                        ch_groups = max(ch_groups, m.groups)
                    if c.out and isinstance(m, (CONV_TYPES, nn.Linear)):
                        members.append(self._names.get(id(m), ""))
                imp = pruning.group_importance(group, p=2)
                if imp is None:
                    continue
                imp = imp.view(ch_groups, -1).mean(0) if ch_groups > 1 else imp
                order = torch.argsort(imp.cpu(), stable=True).tolist()
                self.groups.append(_Group(*pruning.group_root(group), members, ch_groups, order))

    def kept(self, width: float | str | Mapping[str, float]) -> dict[str, dict[str, list[int]]]:
        """Indices each thinned layer keeps, per dimension ("out"/"in"), relative to the teacher."""
        from compressor import pruning

        widths = parse_widths(width)
        for key in widths:
            if key and not any(n == key or n.startswith(key + ".") for n in self._names.values()):
                stages = ", ".join(s.name for s in self.stages) or "the top-level module names"
                raise ConfigError(f"--width-ratio names {key!r}, which is no module of {type(self.teacher).__name__}; "
                                  f"use module-name prefixes such as {stages}")
        gone: dict[tuple[str, str], set[int]] = {}
        sizes: dict[tuple[str, str], int] = {}
        carry = 0.0  # rounding error handed on to the next group, so the total follows the width smoothly
        for g in self.groups:
            per_group, width_g = len(g.order), _width_for(g.members, widths)
            if width_g >= 1.0:
                continue
            wanted = per_group * width_g
            keep = keep_count(per_group, max(0.0, wanted + carry) / per_group, self.round_to if g.ch_groups == 1 else 1)
            carry += wanted - keep
            if keep >= per_group:
                continue
            pruned = sorted(i + k * per_group for k in range(g.ch_groups) for i in g.order[: per_group - keep])
            group = pruning.pruning_group(self.graph, g.root, g.handler, pruned)
            if group is None:
                continue
            for c in pruning.group_members(self.graph, group, indices=True):
                name = self._names.get(id(c.module))
                if name is None:
                    continue  # an operation node (add, cat, flatten): no weights
                pruner = pruning.layer_pruner(c.module, self.graph)
                out = pruning.couples_in_and_out(pruner) or c.out
                dim = "out" if out else "in"
                sizes[(name, dim)] = pruning.channels(pruner, c.module, out)
                gone.setdefault((name, dim), set()).update(c.indices)
        kept: dict[str, dict[str, list[int]]] = {}
        for (name, dim), removed in sorted(gone.items()):
            kept.setdefault(name, {})[dim] = [i for i in range(sizes[(name, dim)]) if i not in removed]
        return kept

    def plan(self, width: float | str | Mapping[str, float], name: str | None = None) -> ThinningPlan:
        widths = parse_widths(width)
        label = f"w{widths.get('', 1.0):.3g}" + ("s" if any(widths) else "")
        if self.removed:
            label += f"-b{self.max_blocks}"
        return ThinningPlan(name=name or f"{self.teacher_arch.get('name') or type(self.teacher).__name__}-{label}",
                            kept=self.kept(widths), removed_blocks=list(self.removed), teacher_arch=dict(self.teacher_arch),
                            width=widths, max_blocks=self.max_blocks, round_to=self.round_to, classifier=self.classifier)

    def _check_runs(self, model: nn.Module) -> None:
        try:
            with torch.no_grad():
                model.eval()(_example(self.input_size, model))
        except Exception as exc:
            where = _failing_module(model, exc) or "a layer"
            raise ModelError(f"Torch-Pruning could not follow the channel dependencies of {type(self.teacher).__name__} "
                             f"(the thinned model fails in {where}: {str(exc).splitlines()[0][:80]}); keep the width "
                             "(--width-ratio 1) or pass --student NAME") from None

    def student(self, width: float | str | Mapping[str, float], name: str | None = None,
                describe: bool = True) -> tuple[nn.Module, ThinningPlan]:
        """The thinned student with the teacher's surviving weights, and its plan."""
        plan = self.plan(width, name)
        model = apply_plan(copy.deepcopy(self.base), plan)
        self._check_runs(model)
        plan.channels = {n: c for n, m in model.named_modules() if (c := out_channels_of(m)) is not None}
        if describe:
            plan.stages = describe_stages(self.teacher, model, self.input_size, self.stages)
        return model, plan


def thin(teacher: nn.Module, input_size: tuple[int, int, int], width: float | str | Mapping[str, float] = 0.5,
         max_blocks: int | None = None, *, min_blocks: int = 1, round_to: int = ROUND_TO,
         teacher_arch: Mapping[str, Any] | None = None, name: str | None = None,
         check: bool = True) -> tuple[nn.Module, ThinningPlan]:
    """Thin (and shorten) a copy of ``teacher``; return the student, holding the teacher's surviving
    weights, and the plan that rebuilds it. ``teacher`` itself is not changed."""
    thinner = Thinner(teacher, input_size, max_blocks, min_blocks=min_blocks, round_to=round_to,
                      teacher_arch=teacher_arch, check=check)
    return thinner.student(width, name)


def inherit(teacher: nn.Module, plan: ThinningPlan | Mapping[str, Any]) -> nn.Module:
    """The student of ``plan`` with ``teacher``'s surviving weights (``teacher`` is not changed). ``teacher``
    is the model the plan was derived from: a derived teacher's own plan (``base``) is already in it."""
    return apply_plan(cpu_copy(teacher), ThinningPlan.from_dict(plan).own())


def _channels_of(model: nn.Module, input_size: tuple[int, int, int], names: list[str]) -> dict[str, int]:
    calls = _record_calls(model, _example(input_size, model))
    return {n: int(calls[n].out.shape[1]) for n in names if n in calls and calls[n].out is not None and calls[n].out.dim() >= 2}


def describe_stages(teacher: nn.Module, student: nn.Module, input_size: tuple[int, int, int],
                    stages: list[BlockStage] | None = None) -> list[StageRow]:
    """Per-stage depth and width, teacher vs student: block stages where the model has them, else
    the resolution stages that attention transfer uses."""
    stages = stages if stages is not None else block_stages(teacher, input_size)
    if stages:
        rows = []
        kept_blocks = {n for n, m in student.named_modules() if not isinstance(m, nn.Identity)}
        heads = [s.blocks[0] for s in stages]  # a stage's first block sets its width; the others keep it
        t_ch, s_ch = _channels_of(teacher, input_size, heads), _channels_of(student, input_size, heads)
        for s in stages:
            rows.append(StageRow(s.name, sum(b in kept_blocks for b in s.blocks), len(s.blocks), s_ch.get(s.blocks[0]),
                                 t_ch.get(s.blocks[0])))
        return rows
    from compressor.pair import find_stages

    s_st, t_st = find_stages(student, _example(input_size, student)), find_stages(teacher, _example(input_size, teacher))
    by_name = {s.module: s for s in s_st}
    return [StageRow(t.module, None, None, by_name[t.module].shape[0] if t.module in by_name else None, t.shape[0]) for t in t_st]
