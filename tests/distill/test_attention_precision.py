"""Attention maps in float32 whatever the autocast dtype: under bf16 autocast only the activation is
bf16; |A|^p, the channel mean and the normalisation run on a float32 copy. Shown on the CPU with bf16
autocast (CUDA autocast leaves float32 abs/pow/mean in float32 too)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from compressor.distill.losses import at_loss, attention_map


class _Dtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.inputs: dict[str, set[torch.dtype]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        for a in args:
            if isinstance(a, torch.Tensor):
                self.inputs.setdefault(name, set()).add(a.dtype)
        return func(*args, **(kwargs or {}))


def _activation() -> torch.Tensor:
    """A bf16 activation as autocast's convolution gives it: wide dynamic range across channels."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 64, 3, padding=1)
    x = torch.randn(4, 16, 8, 8) * torch.logspace(-2, 1, 16).view(1, 16, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = conv(x)
    assert a.dtype == torch.bfloat16
    return a


def _bf16_map(a: torch.Tensor, p: float = 2) -> torch.Tensor:
    """The map as it was computed before: abs, pow and mean in the activation's dtype, float afterwards."""
    return F.normalize(a.abs().pow(p).mean(1).flatten(1).float(), dim=1)


def test_the_map_is_float32_and_agrees_with_the_float32_reference_under_bf16_autocast():
    a = _activation()
    reference = attention_map(a.float())  # the same activation values, no autocast
    seen = _Dtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16), seen:
        q = attention_map(a)
    assert q.dtype == torch.float32
    for op in ("abs", "pow", "mean"):
        assert seen.inputs[op] == {torch.float32}, (op, seen.inputs[op])
    assert torch.allclose(q, reference, rtol=0, atol=1e-6)
    # the premise: in bf16 the map is off by orders of magnitude more
    assert (_bf16_map(a) - reference).abs().max() > 100 * (q - reference).abs().max().clamp_min(1e-9)


def test_max_p_and_odd_p_maps_are_float32_too():
    a = _activation()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = [attention_map(a, p=3), attention_map(a, p=1, reduce="max")]
    assert [m.dtype for m in maps] == [torch.float32] * 2
    assert torch.allclose(maps[0], attention_map(a.float(), p=3), atol=1e-6)
    assert torch.allclose(maps[1], attention_map(a.float(), p=1, reduce="max"), atol=1e-6)


def test_the_at_loss_term_under_autocast_matches_float32_and_keeps_its_gradient_path():
    a = _activation().detach().requires_grad_(True)
    t = (_activation() * 0.5 + 0.1).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = at_loss(a, t)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, at_loss(a.float(), t.float()), rtol=1e-5, atol=0)
    loss.backward()
    assert a.grad is not None and a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad).all()
