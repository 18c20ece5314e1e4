"""AT and KD against values worked out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from compressor import at_loss, attention_map, kd_loss
from compressor.distill.losses import Objective, distillation_terms


def test_attention_map_by_hand():
    # One sample, two channels, 1x2 spatial: channel means of a^2 are [(1+9)/2, (4+16)/2] = [5, 10].
    a = torch.tensor([[[[1.0, 2.0]], [[-3.0, 4.0]]]])
    q = attention_map(a, p=2)
    norm = math.sqrt(5**2 + 10**2)
    assert torch.allclose(q, torch.tensor([[5 / norm, 10 / norm]]))


def test_at_loss_by_hand():
    s = torch.tensor([[[[1.0, 0.0]]]])  # map [1, 0]
    t = torch.tensor([[[[0.0, 1.0]]]])  # map [0, 1]
    # code form: mean of squared differences = (1 + 1) / 2
    assert at_loss(s, t) == pytest.approx(1.0)
    # paper form: 1/2 * ||(1,-1)||_2 = sqrt(2)/2
    assert at_loss(s, t, form="paper") == pytest.approx(math.sqrt(2) / 2)


def test_at_loss_pools_larger_map():
    s = torch.ones(2, 3, 4, 4)
    t = torch.ones(2, 5, 8, 8)
    assert at_loss(s, t) == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_by_hand():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # softmax at T=1 → [0.75, 0.25]
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(s, t, T=1.0) == pytest.approx(expected, rel=1e-5)
    # T² scaling: logits scaled by T give the same distributions, loss × T².
    assert kd_loss(4 * s, 4 * t, T=4.0) == pytest.approx(16 * expected, rel=1e-5)


def test_kd_is_zero_for_identical_logits():
    x = torch.randn(8, 10)
    assert kd_loss(x, x.clone()) == pytest.approx(0.0, abs=1e-6)


def test_distillation_terms_mix():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    fs, ft = torch.randn(4, 3, 4, 4), torch.randn(4, 6, 4, 4)
    obj = Objective("at+kd", alpha=0.9, temperature=4, beta=1000)
    terms = distillation_terms(obj, s, y, t, [(fs, ft)])
    assert terms["ce_weighted"] == pytest.approx(0.1 * F.cross_entropy(s, y).item(), rel=1e-5)
    assert terms["kd"] == pytest.approx(0.9 * kd_loss(s, t).item(), rel=1e-5)
    assert terms["at"] == pytest.approx(1000 * at_loss(fs, ft).item(), rel=1e-5)
    assert terms["loss"] == pytest.approx((terms["ce_weighted"] + terms["kd"] + terms["at"]).item(), rel=1e-6)
    plain = distillation_terms(Objective("none"), s, y)
    assert set(plain) == {"ce", "loss"} and plain["ce"] == pytest.approx(F.cross_entropy(s, y).item())
