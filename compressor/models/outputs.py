"""What a model's forward returns, made into logits.

Models of the KD literature often return more than logits: mdistiller's CIFAR classes return
``(logits, feats)``, RepDistiller's ``(feats, logits)`` only when asked, torchvision's GoogLeNet and
Inception a named tuple in training mode, Hugging Face-style heads a dict with ``logits``. atc uses a
tuple's or list's first element when it is an N×classes tensor, a dict's ``logits`` entry, and refuses
anything else in one line. ``ensure_logits`` is the one check every command runs on a model it did not
build from its own zoo (teacher load, student build, train and export input checks).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressor.errors import ModelError

_HOOKED = "_atc_returns_logits"  # set on a module once its forward hook maps outputs to logits


def _kind(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"a {'×'.join(map(str, output.shape)) or 'scalar'} tensor"
    if isinstance(output, dict):
        return f"a dict with keys {', '.join(map(str, list(output)[:4]))}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)}"
    return f"a {type(output).__name__}"


def pick_logits(output: Any) -> torch.Tensor | None:
    """The logits in ``output``: itself when it is a tensor, a tuple's/list's first element, a dict's
    ``logits``; None when there are none where atc looks."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    return None


def logits_of(output: Any, name: str = "the model") -> torch.Tensor:
    logits = pick_logits(output)
    if logits is None:
        raise ModelError(f"{name} returns {_kind(output)}; atc needs its logits: a tensor, a tuple or list with the logits "
                         "first, or a dict with a 'logits' entry (wrap its forward to return one of those)")
    return logits


def _to_logits(module: nn.Module, inputs: Any, output: Any) -> torch.Tensor:
    return logits_of(output, type(module).__name__)


def ensure_logits(model: nn.Module, example: torch.Tensor, name: str = "the model") -> str | None:
    """Make ``model(x)`` return logits: run it once on ``example`` (eval mode, no gradients, its mode
    restored); when it returns a tuple, list or dict holding logits, register a forward hook that
    returns them and say so in the note returned; raise one line when the output has no logits or
    is not N×classes. None when the forward already returns logits."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            output = model(example)
    finally:
        model.train(was_training)
    logits = logits_of(output, name)
    if logits.dim() != 2 or logits.shape[0] != example.shape[0]:
        raise ModelError(f"{name} returns {_kind(logits)} for a batch of {example.shape[0]}; atc needs N×classes logits "
                         "(a classifier's output before softmax)")
    if logits is output:
        return None
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(f"{name} is TorchScript and returns {_kind(output)}; TorchScript modules take no hooks, so save its "
                         "state_dict and load it with --arch NAME")
    if not getattr(model, _HOOKED, False):
        model.register_forward_hook(_to_logits)
        setattr(model, _HOOKED, True)
    where = "its 'logits' entry" if isinstance(output, dict) else "its first element"
    return f"{name} returns {_kind(output)}; atc uses {where} ({_kind(logits)}) as the logits"
