"""Attention mechanisms against values computed by hand; gradient AT; paper vs code forms; β schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compressor.config import load_config, parse_attention
from compressor.distill.loop import beta_at, objective_from, train_one_epoch
from compressor.distill.losses import (
    Objective,
    at_distance,
    at_loss,
    attention_map,
    distillation_terms,
    flip_symmetry_loss,
    gradient_at_loss,
    input_gradient,
)
from compressor.distill.runtime import Teacher
from compressor.errors import ConfigError

# One sample, two channels, a 1×2 map: channel 0 = [1, -2], channel 1 = [3, 0].
A = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])


@pytest.mark.parametrize("p, reduce, raw", [
    (1, "mean", [(1 + 3) / 2, (2 + 0) / 2]),          # [2, 1]
    (2, "mean", [(1 + 9) / 2, (4 + 0) / 2]),          # [5, 2]
    (4, "mean", [(1 + 81) / 2, (16 + 0) / 2]),        # [41, 8]
    (2, "max", [9, 4]),                               # max over channels of A²
    (4, "max", [81, 16]),
])
def test_attention_map_by_hand(p, reduce, raw):
    norm = math.sqrt(sum(v * v for v in raw))
    got = attention_map(A, p, reduce)
    assert got.shape == (1, 2)
    assert got[0].tolist() == pytest.approx([v / norm for v in raw], abs=1e-6)


def test_sum_p_numbers_written_out():
    # p = 2: [5, 2] / sqrt(29) = [0.928477, 0.371391]; p = 4: [41, 8] / sqrt(1745) = [0.981495, 0.191511]
    assert attention_map(A, 2)[0].tolist() == pytest.approx([0.928477, 0.371391], abs=1e-6)
    assert attention_map(A, 4)[0].tolist() == pytest.approx([0.981491, 0.191510], abs=1e-6)
    assert attention_map(A, 2, "max")[0].tolist() == pytest.approx([9 / math.sqrt(97), 4 / math.sqrt(97)], abs=1e-6)


def test_code_and_paper_forms_differ_as_specified():
    qs = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    qt = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    # code: mean over all elements of the squared difference = (1 + 1 + 0 + 0) / 4
    assert float(at_distance(qs, qt, "code")) == pytest.approx(0.5)
    # paper eq. 2: β/2 · ||Q_s − Q_t||_2 per sample, batch mean = (0.5·√2 + 0) / 2
    assert float(at_distance(qs, qt, "paper")) == pytest.approx(0.5 * math.sqrt(2) / 2)


def test_at_loss_and_beta_in_the_total():
    s = torch.tensor([[[[1.0, 0.0]]]])  # maps [1, 0]
    t = torch.tensor([[[[0.0, 2.0]]]])  # maps [0, 1]
    assert float(at_loss(s, t, 2, "code")) == pytest.approx(1.0)
    assert float(at_loss(s, t, 2, "paper")) == pytest.approx(0.5 * math.sqrt(2))
    logits, y = torch.zeros(1, 3), torch.tensor([0])
    terms = distillation_terms(Objective("at", beta=250.0), logits, y, pairs=[(s, t), (s, t)])
    assert float(terms["at"]) == pytest.approx(500.0)
    assert float(terms["ce"]) == pytest.approx(math.log(3))
    assert float(terms["loss"]) == pytest.approx(500.0 + math.log(3))


def test_spatial_mismatch_pools_the_larger_map():
    s = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])  # pooled to 1×1: 4
    t = torch.tensor([[[[2.0]]]])
    assert float(at_loss(s, t)) == pytest.approx(0.0)  # one cell: both maps normalise to [1]


def test_gradient_at_loss_by_hand():
    js = torch.tensor([[3.0, 4.0]])  # normalised [0.6, 0.8]
    jt = torch.tensor([[0.0, 2.0]])  # normalised [0, 1]
    assert float(gradient_at_loss(js, jt, "code")) == pytest.approx((0.36 + 0.04) / 2)
    assert float(gradient_at_loss(js, jt, "paper")) == pytest.approx(0.5 * math.sqrt(0.4))
    # scale does not matter: only the direction of J is compared
    assert float(gradient_at_loss(10 * js, jt)) == pytest.approx(0.2)


def test_flip_symmetry_by_hand():
    j = torch.tensor([[[[1.0, 3.0]]]])  # normalised [1, 3]/√10, flipped [3, 1]/√10, difference [-2, 2]/√10
    assert float(flip_symmetry_loss(j, "code")) == pytest.approx(0.4)
    assert float(flip_symmetry_loss(j, "paper")) == pytest.approx(0.5 * math.sqrt(0.8))
    assert float(flip_symmetry_loss(torch.tensor([[[[2.0, 2.0]]]]))) == pytest.approx(0.0)


def test_input_gradient_of_a_linear_model():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
    x = torch.zeros(1, 1, 1, 2, requires_grad=True)
    j, logits = input_gradient(model, x, torch.tensor([0]))
    # logits 0 → softmax [.5, .5]; dL/dlogits = [-.5, .5]; dL/dx = Wᵀ [-.5, .5] = [-0.5, -1.5]
    assert j.flatten().tolist() == pytest.approx([-0.5, -1.5])
    assert logits.shape == (1, 2)


def test_gradient_terms_need_input_grads():
    obj = Objective("at", beta=10.0, gradient=True, flip_beta=2.0)
    js, jt = torch.tensor([[[[3.0, 4.0]]]]), torch.tensor([[[[0.0, 2.0]]]])
    terms = distillation_terms(obj, torch.zeros(1, 2), torch.tensor([1]), input_grads=(js, jt))
    assert float(terms["at"]) == pytest.approx(10 * 0.2)
    # flip of [3, 4] is [4, 3]: normalised difference [-0.2, 0.2], mean square 0.04
    assert float(terms["flip"]) == pytest.approx(2 * 0.04)
    with pytest.raises(ValueError):
        distillation_terms(obj, torch.zeros(1, 2), torch.tensor([1]))


def _tiny_net(seed: int, width: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))


def test_gradient_at_alone_decreases_with_double_backprop():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    teacher, student = _tiny_net(1, 8).eval().requires_grad_(False), _tiny_net(2, 16)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    xg = x.clone().requires_grad_(True)
    jt, _ = input_gradient(teacher, xg, y)
    losses = []
    for _ in range(30):
        js, _ = input_gradient(student, xg, y, create_graph=True)
        loss = gradient_at_loss(js, jt.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # unit vectors in 192 dimensions with no relation have a mean squared difference near 2/192 = 0.0104
    assert losses[0] == pytest.approx(2 / 192, rel=0.1)
    assert losses[-1] < 0.55 * losses[0], losses


def test_train_one_epoch_with_gradient_at():
    from compressor.data.images import DeviceBatches

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (32,), generator=g)
    batches = DeviceBatches(x, y, 16, [0.5] * 3, [0.25] * 3, torch.device("cpu"), True)
    teacher, student = _tiny_net(1, 8).eval().requires_grad_(False), _tiny_net(2, 4)
    before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    obj = Objective("at", beta=1000.0, gradient=True, flip_beta=10.0)
    stats = train_one_epoch(student, batches, opt, obj, 1, Teacher(teacher), amp=None)
    means = stats.means()
    assert stats.seen == 32 and means["train_at"] > 0 and means["train_flip"] > 0
    assert means["train_loss"] == pytest.approx(means["train_ce"] + means["train_at"] + means["train_flip"], rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_config_maps_mechanisms_to_the_objective():
    obj = objective_from(load_config("demo", ["distill.attention=max-p", "distill.p=4", "distill.at_form=paper"]))
    assert (obj.reduce, obj.p, obj.form, obj.gradient) == ("max", 4.0, "paper", False)
    obj = objective_from(load_config("demo", ["distill.attention=gradient", "distill.flip_beta=5"]))
    assert obj.gradient and obj.flip_beta == 5.0
    assert parse_attention("sum-p:4") == ("sum-p", 4.0)
    assert parse_attention("max-p") == ("max-p", None)
    assert parse_attention("gradient") == ("gradient", None)
    for bad in ("mean-p", "sum-p:0", "sum-p:x", "gradient:2"):
        with pytest.raises(ConfigError):
            parse_attention(bad)


def test_beta_schedule_constant_and_decay():
    cfg = load_config("demo", ["train.epochs=4", "distill.beta=1000"])
    assert [beta_at(cfg, e) for e in range(4)] == [1000.0] * 4
    cfg = load_config("demo", ["train.epochs=4", "distill.beta=1000", "distill.beta_schedule=decay"])
    assert [beta_at(cfg, e) for e in range(4)] == [1000.0, 750.0, 500.0, 250.0]
