"""Where attention is taken: automatic teacher/student pairing and activation taps.

One traced forward on an example input records, in completion order, every module whose
output is a 4-D feature map. For each spatial resolution the *last* module to finish at that
resolution is the stage output (normalisation, activation, pooling and dropout layers are
skipped, so for a WRN this is each group's output before the final BN-ReLU). A module that
returns a tuple or list (the KD literature's CIFAR ResNet blocks return ``(out, preact)``) counts
by its first tensor, and its stage says so. Teacher and student stages are aligned from the
deepest one; where their resolutions differ the AT loss pools the larger map to the smaller.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from compressor.device import model_device
from compressor.errors import ConfigError, ModelError
from compressor.models.outputs import logits_of, pick_logits

_NOT_A_STAGE = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.ReLU, nn.ReLU6, nn.SiLU,
                nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.GELU, nn.Identity, nn.Dropout, nn.Dropout2d,
                nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def first_tensor(output: object) -> object:
    """A module's output as a stage sees it: a tuple's or list's first element (recursively), else the output."""
    while isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output


@dataclass(frozen=True)
class Stage:
    module: str
    shape: tuple[int, ...]  # C, H, W of one sample
    from_tuple: bool = False  # the module returns a tuple or list; the stage is its first tensor

    @property
    def resolution(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def describe(self) -> str:
        return f"{self.module}{'[0]' if self.from_tuple else ''} {'×'.join(map(str, self.shape))}"


@dataclass(frozen=True)
class AttentionPair:
    student: Stage
    teacher: Stage

    def describe(self) -> str:
        text = f"{self.student.describe()}  ↔  {self.teacher.describe()}"
        if self.student.from_tuple or self.teacher.from_tuple:
            text += "  ([0]: the first tensor of the module's tuple output)"
        return text


def find_stages(model: nn.Module, example: torch.Tensor) -> list[Stage]:
    """Stage outputs of ``model``, highest resolution first (one forward on ``example``'s first sample,
    moved to ``model``'s device, so a student and a teacher on different devices pair from one example)."""
    finished: list[tuple[str, tuple[int, ...], bool]] = []
    handles = []
    for name, module in model.named_modules():
        if not name or isinstance(module, _NOT_A_STAGE):
            continue

        def record(mod, inputs, output, name=name):
            tensor = first_tensor(output)
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 4:
                finished.append((name, tuple(tensor.shape[1:]), tensor is not output))

        handles.append(module.register_forward_hook(record))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example[:1].to(model_device(model)))  # device rule: the input follows the model
    except Exception as exc:  # the user's model failed on a plain forward
        raise ModelError(f"a forward pass on input {tuple(example.shape[1:])} failed ({exc}); check --input-size") from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    last_at: dict[tuple[int, int], Stage] = {}
    for name, shape, from_tuple in finished:
        if shape[1] > 1 or shape[2] > 1:
            last_at.pop((shape[1], shape[2]), None)  # re-insert so dict order follows completion
            last_at[(shape[1], shape[2])] = Stage(name, shape, from_tuple)
    stages = list(last_at.values())
    return sorted(stages, key=lambda s: -(s.shape[1] * s.shape[2]))


def pair_stages(student: Sequence[Stage], teacher: Sequence[Stage]) -> list[AttentionPair]:
    """Align stages from the deepest one, as many as the network with fewer stages has."""
    n = min(len(student), len(teacher))
    if n == 0:
        raise ModelError("no spatial feature maps found to transfer attention between; use --method kd or none")
    return [AttentionPair(s, t) for s, t in zip(student[len(student) - n:], teacher[len(teacher) - n:])]


def select_pairs(pairs: list[AttentionPair], layers: str = "all") -> list[AttentionPair]:
    """``all``, ``lastN`` (the N deepest pairs) or a comma list of student or teacher module names."""
    if layers == "all":
        return pairs
    if layers.startswith("last") and layers[4:].isdigit():
        n = int(layers[4:])
        if not 1 <= n <= len(pairs):
            raise ConfigError(f"--at-layers {layers}: there are {len(pairs)} attention pairs; use last1..last{len(pairs)}")
        return pairs[-n:]
    wanted = [w.strip() for w in layers.split(",") if w.strip()]
    chosen = [p for p in pairs if p.student.module in wanted or p.teacher.module in wanted]
    known = [p.student.module for p in pairs]
    if len(chosen) != len(wanted):
        raise ConfigError(f"--at-layers {layers}: choose from all, lastN or the stage names {', '.join(known)}")
    return chosen


def find_pairs(student: nn.Module, teacher: nn.Module, example: torch.Tensor, layers: str = "all") -> list[AttentionPair]:
    return select_pairs(pair_stages(find_stages(student, example), find_stages(teacher, example)), layers)


def hint_pair(pairs: Sequence[AttentionPair], stage: str = "middle") -> AttentionPair:
    """FitNet's hint pair among all stage pairs (highest resolution first, not narrowed by ``at_layers``):
    ``middle`` (the middle one; of an even count the deeper of the two middle ones, so a network's
    middle resolution stage as RepDistiller's hint layer 2 of three groups), an index (0-based, negative
    from the deepest) or a student or teacher stage's module name."""
    if not pairs:
        raise ModelError("no spatial feature maps found to give a hint between; use --method kd, dkd or none")
    text = str(stage).strip()
    if text == "middle":
        return pairs[len(pairs) // 2]
    if text.lstrip("-").isdigit():
        i = int(text)
        if not -len(pairs) <= i < len(pairs):
            raise ConfigError(f"distill.fitnet_stage {text}: there are {len(pairs)} stage pairs; use 0..{len(pairs) - 1} or middle")
        return pairs[i]
    chosen = [p for p in pairs if text in (p.student.module, p.teacher.module)]
    if not chosen:
        names = ", ".join(p.student.module for p in pairs)
        raise ConfigError(f"distill.fitnet_stage {text}: choose middle, a pair index or a stage name ({names})")
    return chosen[0]


class Taps:
    """Forward hooks that keep the latest output of named modules during training."""

    def __init__(self, model: nn.Module, module_names: Sequence[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._handles = []
        for name in module_names:
            def keep(mod, inputs, output, name=name):
                self.outputs[name] = first_tensor(output)
            self._handles.append(modules[name].register_forward_hook(keep))

    def take(self, names: Sequence[str]) -> list[torch.Tensor]:
        out = [self.outputs[n] for n in names]
        self.outputs.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextlib.contextmanager
def tapped(model: nn.Module, module_names: Sequence[str]) -> Iterator[Taps]:
    taps = Taps(model, module_names)
    try:
        yield taps
    finally:
        taps.remove()


# --- logits and stage outputs from one forward, for the training step ----------------------------


class StageOutputs(nn.Module):
    """``model`` called so that it returns ``(logits, [outputs of the named stages])``.

    Built by ``stage_outputs``: either an FX graph from torchvision's ``create_feature_extractor``
    (``traced``; no hooks, so ``torch.compile`` sees one graph) or forward hooks (``Taps``) on the
    model itself. Either way the parameters are the model's own: optimizer, ``state_dict``,
    checkpoints and export keep using ``model``, never this wrapper. ``caller`` runs the hooked
    forward in place of ``model`` (e.g. ``model`` inside ``DistributedDataParallel``)."""

    def __init__(self, model: nn.Module, names: Sequence[str], graph: nn.Module | None = None, caller: nn.Module | None = None):
        super().__init__()
        self.model, self.names, self.graph, self.caller = model, list(names), graph, caller
        self.taps = Taps(model, self.names) if graph is None and self.names else None

    @property
    def traced(self) -> bool:
        return self.graph is not None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.graph is not None:
            out = self.graph(x)
            # the graph skips forward hooks: a model that returns (logits, …) gives its whole output here
            return logits_of(out["logits"]), [first_tensor(out[f"stage{i}"]) for i in range(len(self.names))]
        logits = (self.caller or self.model)(x)
        return logits, self.taps.take(self.names) if self.taps is not None else []

    def remove(self) -> None:
        """Remove the hooks, if any (the traced graph has none)."""
        if self.taps is not None:
            self.taps.remove()


def stage_outputs(model: nn.Module, names: Sequence[str], example: torch.Tensor | None = None,
                  trace: bool = True) -> tuple[StageOutputs, str | None]:
    """``model`` returning its logits and the outputs of the stage modules ``names`` in one forward.

    With ``trace`` the forward is an FX graph (``create_feature_extractor``) that shares the model's
    parameters; it is used only when it traces and, on ``example`` (one sample is enough), gives the
    same logits and stage outputs as the model with hooks. Otherwise (an untraceable user model,
    data-dependent control flow) the hooks are used. Returns the wrapper and a one-line note saying
    why tracing was not used (None when it was, or was not asked for)."""
    names = list(names)
    if not trace or not names:
        return StageOutputs(model, names), None
    try:
        graph = _feature_graph(model, names)
        if example is not None and not _agrees(model, graph, names, example):
            raise ValueError("its outputs differ from the model's")
    except Exception as exc:  # FX cannot trace every model; hooks work on all of them
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        return StageOutputs(model, names), (f"{type(model).__name__}: attention maps taken with forward hooks "
                                            f"(FX tracing failed: {reason})")
    return StageOutputs(model, names, graph), None


def _feature_graph(model: nn.Module, names: Sequence[str]) -> nn.Module:
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    train_nodes, eval_nodes = get_graph_node_names(model)
    if train_nodes[-1] != eval_nodes[-1]:
        raise ValueError("the train and eval graphs end in different nodes")
    return create_feature_extractor(model, return_nodes={**{n: f"stage{i}" for i, n in enumerate(names)}, train_nodes[-1]: "logits"})


def _agrees(model: nn.Module, graph: nn.Module, names: Sequence[str], example: torch.Tensor) -> bool:
    """Traced and hooked forwards agree on ``example`` (eval mode, no gradients, state left as it was)."""
    was_training = model.training
    try:
        model.eval(), graph.eval()
        with torch.no_grad(), tapped(model, names) as taps:
            ref_logits = model(example)
            ref_maps = taps.take(names)
            out = graph(example)
    finally:
        model.train(was_training), graph.train(was_training)
    got = [pick_logits(out["logits"])] + [first_tensor(out[f"stage{i}"]) for i in range(len(names))]
    want = [ref_logits] + ref_maps
    return all(isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
               for a, b in zip(got, want))
