"""FitNet's hint and DKD against values worked out by hand, and against a re-derivation (written here) of
the formulas in RepDistiller's and mdistiller's public code on one batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from compressor.distill.losses import Objective, distillation_terms, dkd_loss, dkd_parts, hint_loss, kd_loss
from compressor.errors import ConfigError

# --- hint ------------------------------------------------------------------------------------------


def test_hint_loss_by_hand():
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert hint_loss(s, torch.zeros_like(s)) == pytest.approx((1 + 4 + 9 + 16) / 4)
    # two channels: the mean runs over every element, channels included
    s2 = torch.cat([s, s + 1], dim=1)
    assert hint_loss(s2, torch.zeros_like(s2)) == pytest.approx((1 + 4 + 9 + 16 + 4 + 9 + 16 + 25) / 8)


def test_hint_loss_pools_the_larger_map_as_at_does():
    s = torch.full((2, 3, 2, 2), 3.0)
    t = torch.ones(2, 3, 4, 4)  # the teacher's larger map is averaged to 2x2: still ones
    assert hint_loss(s, t) == pytest.approx(4.0)
    t[..., :2, :2] = 3.0  # one 2x2 block of the teacher becomes 3: that pooled cell meets the student's 3
    assert hint_loss(s, t) == pytest.approx((4 + 4 + 4 + 0) / 4)


def test_hint_loss_matches_repdistiller_and_mdistiller_mse():
    # Both compute nn.MSELoss() (mean reduction) between the regressed student map and the teacher map.
    torch.manual_seed(1)
    fs, ft = torch.randn(8, 32, 8, 8), torch.randn(8, 32, 8, 8)
    assert hint_loss(fs, ft) == pytest.approx(torch.nn.MSELoss()(fs, ft).item(), rel=1e-6)


# --- DKD -------------------------------------------------------------------------------------------


def test_dkd_parts_by_hand():
    s = torch.zeros(1, 3)  # student: uniform, so binary [1/3, 2/3] and non-target [1/2, 1/2]
    t = torch.log(torch.tensor([[4.0, 3.0, 1.0]]))  # teacher: [1/2, 3/8, 1/8]; binary [1/2, 1/2]; non-target [3/4, 1/4]
    y = torch.tensor([0])
    tckd, nckd = dkd_parts(s, t, y, T=1.0)
    assert tckd == pytest.approx(0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3)), rel=1e-5)
    assert nckd == pytest.approx(0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5), rel=1e-5)
    # the weights and T² scaling: logits scaled by T give the same distributions at temperature T
    assert dkd_loss(s, t, y, alpha=1.0, beta=8.0, T=1.0) == pytest.approx((tckd + 8 * nckd).item(), rel=1e-5)
    t4, n4 = dkd_parts(4 * s, 4 * t, y, T=4.0)
    assert (t4.item(), n4.item()) == pytest.approx((16 * tckd.item(), 16 * nckd.item()), rel=1e-5)


def test_dkd_is_a_decomposition_of_kd():
    # The DKD paper's eq. (the reason for the name): KD = TCKD + (1 − p_t of the target) · NCKD, per sample.
    torch.manual_seed(2)
    s, t = torch.randn(1, 10), torch.randn(1, 10) * 3
    y = torch.tensor([4])
    for T in (1.0, 4.0):
        tckd, nckd = dkd_parts(s, t, y, T)
        p_gt = F.softmax(t / T, dim=1)[0, 4].item()
        assert kd_loss(s, t, T).item() == pytest.approx((tckd + (1 - p_gt) * nckd).item(), rel=1e-4)


def test_dkd_is_zero_for_identical_logits_and_stays_finite_for_confident_ones():
    torch.manual_seed(3)
    z, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    assert [v.item() for v in dkd_parts(z, z.clone(), y)] == pytest.approx([0.0, 0.0], abs=1e-6)
    sharp = torch.full((2, 5), -40.0).scatter(1, torch.tensor([[1], [3]]), 40.0)  # p_gt = 1 − 1e-35 in fp32
    s = torch.randn(2, 5, requires_grad=True)
    tckd, nckd = dkd_parts(s, sharp, torch.tensor([1, 3]), T=1.0)
    (tckd + nckd).backward()
    assert torch.isfinite(tckd) and torch.isfinite(nckd) and torch.isfinite(s.grad).all()


def _mdistiller_dkd(logits_s, logits_t, target, alpha, beta, T):
    """mdistiller's ``dkd_loss`` as its code computes it (re-derived here): probabilities at T folded into
    [target, rest] with masks, ``log`` of the student's, ``kl_div(sum) · T² / batch``; the non-target term
    from softmaxes of the logits with 1000 subtracted at the target."""
    gt = torch.zeros_like(logits_s).scatter(1, target[:, None], 1.0)
    fold = lambda p: torch.stack([(p * gt).sum(1), (p * (1 - gt)).sum(1)], dim=1)  # noqa: E731
    ps, pt = fold(F.softmax(logits_s / T, 1)), fold(F.softmax(logits_t / T, 1))
    tckd = F.kl_div(torch.log(ps), pt, reduction="sum") * T**2 / target.shape[0]
    ls2 = F.log_softmax(logits_s / T - 1000.0 * gt, 1)
    pt2 = F.softmax(logits_t / T - 1000.0 * gt, 1)
    nckd = F.kl_div(ls2, pt2, reduction="sum") * T**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def test_dkd_matches_mdistiller_on_one_batch():
    torch.manual_seed(4)
    s, t, y = torch.randn(16, 10) * 2, torch.randn(16, 10) * 4, torch.randint(0, 10, (16,))
    for alpha, beta, T in ((1.0, 8.0, 4.0), (1.0, 0.5, 1.0), (0.3, 2.0, 2.0)):
        want = _mdistiller_dkd(s, t, y, alpha, beta, T).item()
        assert dkd_loss(s, t, y, alpha, beta, T).item() == pytest.approx(want, rel=1e-4)


# --- the objective -----------------------------------------------------------------------------------


@pytest.fixture
def batch():
    torch.manual_seed(5)
    return torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))


def test_fitnet_terms_full_ce_plus_weighted_hint(batch):
    s, t, y = batch
    rs, ft = torch.randn(4, 8, 4, 4), torch.randn(4, 8, 4, 4)
    terms = distillation_terms(Objective("fitnet", hint_weight=100.0), s, y, t, hint=(rs, ft))
    assert set(terms) == {"ce", "hint", "loss"}
    assert terms["ce"] == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert terms["hint"] == pytest.approx(100 * hint_loss(rs, ft).item(), rel=1e-6)
    assert terms["loss"] == pytest.approx((terms["ce"] + terms["hint"]).item(), rel=1e-6)
    with_kd = distillation_terms(Objective("fitnet+kd", alpha=0.9), s, y, t, hint=(rs, ft))
    assert set(with_kd) == {"ce_weighted", "kd", "hint", "loss"}
    assert with_kd["ce_weighted"] == pytest.approx(0.1 * F.cross_entropy(s, y).item(), rel=1e-5)
    with pytest.raises(ValueError, match="hint"):
        distillation_terms(Objective("fitnet"), s, y, t)


def test_dkd_terms_named_weighted_and_warmed_up(batch):
    s, t, y = batch
    obj = Objective("dkd", dkd_alpha=1.0, dkd_beta=8.0, dkd_temperature=4.0)
    terms = distillation_terms(obj, s, y, t)
    tckd, nckd = dkd_parts(s, t, y, 4.0)
    assert set(terms) == {"ce", "tckd", "nckd", "loss"}
    assert terms["ce"] == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)  # CE at weight 1, as mdistiller
    assert (terms["tckd"].item(), terms["nckd"].item()) == pytest.approx((tckd.item(), 8 * nckd.item()), rel=1e-5)
    warm = distillation_terms(obj, s, y, t, dkd_scale=torch.tensor(0.25))
    assert (warm["tckd"].item(), warm["nckd"].item()) == pytest.approx((0.25 * tckd.item(), 2 * nckd.item()), rel=1e-5)
    assert warm["ce"] == pytest.approx(terms["ce"].item())


def test_at_plus_dkd_has_both_families(batch):
    s, t, y = batch
    fs, ft = torch.randn(4, 3, 4, 4), torch.randn(4, 6, 4, 4)
    terms = distillation_terms(Objective("at+dkd", beta=1000.0), s, y, t, [(fs, ft)])
    assert set(terms) == {"ce", "tckd", "nckd", "at", "loss"}
    assert terms["loss"] == pytest.approx(sum(terms[k] for k in ("ce", "tckd", "nckd", "at")).item(), rel=1e-6)


@pytest.mark.parametrize("method", ["kd+dkd", "at+fitnet", "at+at", "none+kd", "crd"])
def test_objective_refuses_invalid_combinations_in_one_line(method):
    with pytest.raises(ConfigError) as err:
        Objective(method)
    assert "\n" not in str(err.value) and method in str(err.value)


def test_objective_flags_follow_the_method():
    o = Objective("fitnet+dkd")
    assert (o.uses_fitnet, o.uses_dkd, o.uses_at, o.uses_kd, o.needs_teacher) == (True, True, False, False, True)
    assert not Objective("none").needs_teacher
