"""The one place atc touches Torch-Pruning.

atc uses Torch-Pruning for two things: its dependency graph (which layers' channels are coupled,
and how to rank a coupled group's channels), and its per-layer pruning functions (cut given
channels out of one layer, used to replay a thinning plan). Some of what atc needs is not public
API (``_helpers.to_plain_idxs``, ``pruner.function.PrunerBox``, ``ops.module2type``,
``ops.OPTYPE``), so every call goes through the small functions below, and
``check_torch_pruning()`` verifies that the installed version still has every name before
anything is thinned. A version outside ``TESTED`` that has all the names is used as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from compressor.errors import ModelError

TESTED = ">=1.5.2,<1.7"  # versions whose source and behaviour were checked against this module

# (module, dotted attribute) pairs atc calls; the private ones are the reason for this check
REQUIRED = (
    ("torch_pruning", "DependencyGraph.build_dependency"),
    ("torch_pruning", "DependencyGraph.get_all_groups"),
    ("torch_pruning", "DependencyGraph.get_pruning_group"),
    ("torch_pruning", "DependencyGraph.check_pruning_group"),
    ("torch_pruning", "DependencyGraph.is_out_channel_pruning_fn"),
    ("torch_pruning", "DependencyGraph.get_pruner_of_module"),
    ("torch_pruning.pruner.importance", "GroupMagnitudeImportance"),
    ("torch_pruning._helpers", "to_plain_idxs"),
    ("torch_pruning.pruner.function", "PrunerBox"),
    ("torch_pruning.pruner.function", "BasePruningFunc.prune_out_channels"),
    ("torch_pruning.pruner.function", "BasePruningFunc.prune_in_channels"),
    ("torch_pruning.pruner.function", "BasePruningFunc.get_out_channels"),
    ("torch_pruning.pruner.function", "BasePruningFunc.get_in_channels"),
    ("torch_pruning.ops", "module2type"),
    ("torch_pruning.ops", "OPTYPE.PARAMETER"),
    ("torch_pruning.ops", "TORCH_CONV"),
    ("torch_pruning.ops", "TORCH_LINEAR"),
)

_checked = False


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return "unknown"


def check_torch_pruning() -> str:
    """Verify that torch_pruning imports and has every name atc calls; return its version.

    Raises ``ModelError`` naming the installed version and the tested range otherwise."""
    import importlib

    fix = f"pip install 'torch-pruning{TESTED}'"
    try:
        importlib.import_module("torch_pruning")
    except ImportError:
        raise ModelError(f"torch-pruning is not installed, and thinning needs it; {fix}") from None
    for module_name, dotted in REQUIRED:
        try:
            obj: Any = importlib.import_module(module_name)
            for part in dotted.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            raise ModelError(f"torch-pruning {_version()} has no {module_name}.{dotted}, which atc uses; atc is tested "
                             f"with torch-pruning {TESTED}: {fix}") from None
    global _checked
    _checked = True
    return _version()


def _tp() -> Any:
    if not _checked:
        check_torch_pruning()
    import torch_pruning

    return torch_pruning


# --------------------------------------------------------------------------------------------
# The dependency graph: coupled channel groups


@dataclass
class Coupled:
    """One member of a channel group: a layer (or an operation) and the channels the group cuts in it."""

    module: nn.Module
    out: bool              # the group cuts the layer's output channels (else its input channels)
    parameter: bool        # a bare nn.Parameter, not a layer
    indices: list[int]     # channel positions, once the group was built for given indices (else [])


def dependency_graph(model: nn.Module, example: torch.Tensor) -> Any:
    """Torch-Pruning's dependency graph of ``model``, traced with one forward on ``example``."""
    tp = _tp()
    return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)


def channel_groups(graph: Any, ignored: Sequence[nn.Module] = ()) -> Iterator[Any]:
    """Every group of coupled channels whose root is a convolution or a linear layer."""
    from torch_pruning import ops

    yield from graph.get_all_groups(ignored_layers=list(ignored), root_module_types=[ops.TORCH_CONV, ops.TORCH_LINEAR])


def group_members(graph: Any, group: Any, indices: bool = False) -> list[Coupled]:
    """The layers and operations of ``group``, in its order; with ``indices``, the channels it cuts in each."""
    from torch_pruning import ops

    return [Coupled(dep.target.module, bool(graph.is_out_channel_pruning_fn(dep.handler)),
                    dep.target.type == ops.OPTYPE.PARAMETER, plain_indices(idxs) if indices else [])
            for dep, idxs in group]


def group_root(group: Any) -> tuple[nn.Module, Any]:
    """The layer a group was built from and the pruning function it was built for."""
    return group[0].dep.target.module, group[0].dep.handler


def group_importance(group: Any, p: int = 2) -> torch.Tensor | None:
    """One score per channel of the group: the group's Lp weight magnitude (None: nothing to score)."""
    _tp()
    from torch_pruning.pruner import importance

    return importance.GroupMagnitudeImportance(p=p)(group)


def pruning_group(graph: Any, root: nn.Module, handler: Any, indices: list[int]) -> Any | None:
    """The group that cutting ``indices`` from ``root`` drags along; None where the graph refuses it."""
    group = graph.get_pruning_group(root, handler, indices)
    return group if graph.check_pruning_group(group) else None


def plain_indices(idxs: Any) -> list[int]:
    """Torch-Pruning's index objects (which may carry a root mapping) as plain ints."""
    from torch_pruning import _helpers

    return [int(i) for i in _helpers.to_plain_idxs(idxs)]


# --------------------------------------------------------------------------------------------
# One layer at a time: replaying a plan


def layer_pruner(module: nn.Module, graph: Any | None = None) -> Any | None:
    """The pruning function for ``module``'s type (the graph's own choice where a graph is given);
    None where Torch-Pruning cannot thin that layer type."""
    if graph is not None:
        return graph.get_pruner_of_module(module)
    _tp()
    from torch_pruning import ops
    from torch_pruning.pruner import function

    return function.PrunerBox.get(ops.module2type(module))


def couples_in_and_out(pruner: Any) -> bool:
    """True for layers whose input and output channels are one (batch norm, depthwise convolution):
    Torch-Pruning gives them one function for both."""
    return getattr(pruner.prune_in_channels, "__func__", None) is getattr(pruner.prune_out_channels, "__func__", 0)


def channels(pruner: Any, module: nn.Module, out: bool) -> int | None:
    return pruner.get_out_channels(module) if out else pruner.get_in_channels(module)


def cut_channels(pruner: Any, module: nn.Module, out: bool, indices: list[int]) -> None:
    """Remove the channels at ``indices`` from ``module`` in place (output or input side)."""
    (pruner.prune_out_channels if out else pruner.prune_in_channels)(module, indices)
