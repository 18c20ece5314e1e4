"""FitNet's regressor: its shapes, that it learns, and that it stays out of the student."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor import create_model
from compressor.distill.hints import HintRegressor
from compressor.distill.losses import hint_loss
from compressor.pair import find_pairs


@pytest.mark.parametrize("s_shape, t_shape, out, learned", [
    ((16, 16, 16), (32, 16, 16), (32, 16, 16), True),    # channels differ: 1x1 conv + BN
    ((16, 32, 32), (32, 16, 16), (32, 16, 16), True),    # a larger student map is pooled first
    ((32, 8, 8), (32, 16, 16), (32, 8, 8), False),       # a larger teacher map is pooled by hint_loss
    ((32, 16, 16), (32, 16, 16), (32, 16, 16), False),   # same shape: nothing to learn
])
def test_regressor_shapes(s_shape, t_shape, out, learned):
    reg = HintRegressor(s_shape, t_shape)
    y = reg(torch.randn(3, *s_shape))
    assert tuple(y.shape) == (3, *out) == (3, *reg.out_shape)
    assert (reg.num_parameters() > 0) == learned
    hint_loss(y, torch.randn(3, *t_shape))  # every case meets the teacher's map


def test_regressor_is_a_1x1_conv_and_bn_as_repdistillers_convreg_at_equal_size():
    # RepDistiller's ConvReg for equal sizes: Conv2d(kernel 1+sH-tH = 1) then BN (then ReLU, left out here).
    torch.manual_seed(0)
    reg = HintRegressor((8, 4, 4), (16, 4, 4))
    conv, bn = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
    conv.weight.data.copy_(reg.proj[0].weight.data)
    x = torch.randn(5, 8, 4, 4)
    assert torch.allclose(reg(x), bn(conv(x)), atol=1e-6)
    assert reg.describe() == "1×1 conv 8→16 + BN (160 parameters)"  # 8·16 weights + 2·16 BN


def test_always_mode_learns_where_channels_match():
    reg = HintRegressor((32, 16, 16), (32, 16, 16), mode="always")
    assert reg.num_parameters() == 32 * 32 + 2 * 32
    assert HintRegressor((32, 16, 16), (32, 16, 16)).describe().startswith("identity")


def test_regressor_gets_gradients_and_learns_the_hint():
    torch.manual_seed(0)
    reg = HintRegressor((8, 4, 4), (16, 4, 4))
    fs = torch.randn(32, 8, 4, 4)
    ft = torch.einsum("oc,bchw->bohw", torch.randn(16, 8), fs)  # a map a 1x1 conv can reach
    opt = torch.optim.SGD(reg.parameters(), lr=0.1, momentum=0.9)
    first = None
    for _ in range(60):
        loss = hint_loss(reg(fs), ft)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reg.parameters())
        opt.step()
    assert loss.item() < 0.5 * first


def test_regressor_stays_out_of_the_student():
    torch.manual_seed(0)
    student, teacher = create_model("wrn-16-1", num_classes=10), create_model("wrn-16-2", num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    pair = find_pairs(student, teacher, x)[1]  # the middle stage: group1, 32 → 64 channels at 16×16
    keys, count = list(student.state_dict()), sum(p.numel() for p in student.parameters())
    reg = HintRegressor(pair.student.shape, pair.teacher.shape)
    opt = torch.optim.SGD([*student.parameters(), *reg.parameters()], lr=0.1)
    feats = {}
    student.get_submodule(pair.student.module).register_forward_hook(lambda m, i, o: feats.update(s=o))
    teacher.get_submodule(pair.teacher.module).register_forward_hook(lambda m, i, o: feats.update(t=o))
    with torch.no_grad():
        teacher(x)
    logits = student(x)
    (F.cross_entropy(logits, torch.arange(4)) + 100 * hint_loss(reg(feats["s"]), feats["t"])).backward()
    before = reg.proj[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(reg.proj[0].weight, before)  # the regressor trained with the student ...
    assert list(student.state_dict()) == keys  # ... and is no part of it
    assert sum(p.numel() for p in student.parameters()) == count == 175_066
    assert not any(m is reg or m is reg.proj for m in student.modules())


def test_hint_pair_is_the_middle_stage_or_the_one_named():
    from compressor.errors import ConfigError, ModelError
    from compressor.pair import AttentionPair, Stage, hint_pair

    def pairs(n):
        return [AttentionPair(Stage(f"s{i}", (8, 2 ** (n - i), 2 ** (n - i))), Stage(f"t{i}", (16, 2 ** (n - i), 2 ** (n - i))))
                for i in range(n)]

    three, four = pairs(3), pairs(4)
    assert hint_pair(three) is three[1]  # WRN's three groups: the middle one (RepDistiller's hint layer 2)
    assert hint_pair(four) is four[2] and hint_pair(pairs(1)) == pairs(1)[0]
    assert hint_pair(three, "0") is three[0] and hint_pair(three, "-1") is three[2]
    assert hint_pair(three, "s2") is three[2] and hint_pair(three, "t0") is three[0]
    with pytest.raises(ConfigError, match="there are 3 stage pairs"):
        hint_pair(three, "3")
    with pytest.raises(ConfigError, match=r"choose middle, a pair index or a stage name \(s0, s1, s2\)"):
        hint_pair(three, "group9")
    with pytest.raises(ModelError, match="no spatial feature maps"):
        hint_pair([])
