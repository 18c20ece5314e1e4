"""Parameter and multiply-add counts.

FLOP convention: fvcore counts one fused multiply-add as one flop, so its "flops" are MACs; atc
reports GMACs and shows GFLOPs = 2 x GMACs beside them. fvcore also counts BatchNorm and pooling,
which torchvision's published operation counts leave out (+0.2-0.55 % on ResNets, +4 % on
MobileNetV2/EfficientNet-B0).

Counting traces one zero image on the model's own device (a model on ``meta``, which fvcore
cannot trace, is counted on an uninitialised CPU copy: the counts depend on shapes only)."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from compressor.device import example_input, model_device
from compressor.errors import ModelError
from compressor.units import MAC_UNIT  # noqa: F401  (re-exported: the unit of every count here)

# The operators torchvision's published "_ops" figures count (BatchNorm, pooling and activations left out).
CONV_LINEAR_OPS = ("conv", "linear", "addmm", "matmul", "bmm", "einsum")


def count_params(model: nn.Module) -> dict[str, int]:
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


@dataclass
class MacCount:
    gmacs: float
    by_module: dict[str, float]  # module name → GMACs (fvcore's module tree)
    skipped_ops: dict[str, int]  # operator → times fvcore skipped it
    conv_linear_gmacs: float = 0.0  # convolutions and matrix products only: how torchvision's published counts are made

    @property
    def gflops(self) -> float:
        return 2 * self.gmacs


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> MacCount:
    """fvcore multiply-adds for one image of ``input_size`` (C, H, W)."""
    if isinstance(model, torch.jit.ScriptModule):
        # fvcore names operators by hooking every submodule; TorchScript modules refuse hooks.
        raise ModelError("TorchScript models cannot be profiled (fvcore needs module hooks); "
                         "profile the eager checkpoint or a state_dict with --arch instead")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import trips torch.jit deprecation warnings
        from fvcore.nn import FlopCountAnalysis

    if model_device(model).type == "meta":  # fvcore cannot trace meta tensors; counts depend on shapes only
        model = copy.deepcopy(model).to_empty(device="cpu")
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(model, example_input(model, input_size))  # on the model's device
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            total = analysis.total()
            by_module = {k: v / 1e9 for k, v in analysis.by_module().items()}
            skipped = dict(analysis.unsupported_ops())
            conv_linear = sum(v for op, v in analysis.by_operator().items() if op in CONV_LINEAR_OPS)
    finally:
        model.train(was_training)
    return MacCount(total / 1e9, by_module, skipped, conv_linear / 1e9)
