"""The distillation objective as small pure functions.

AT (Zagoruyko & Komodakis 2017): the attention map of an activation ``A`` (B×C×H×W) is the
channel mean of ``|A|^p``, flattened per sample and L2-normalised. Per tapped pair the loss is
``mean((Q_s - Q_t)^2)`` (the public reference code, ``form="code"``); the paper's eq. 2 uses
``β/2 · ||Q_s - Q_t||_2`` per sample (``form="paper"``). The total is ``β · Σ_pairs``.
Max-p (``reduce="max"``) takes the channel max of ``|A|^p`` instead of the mean.

β in the paper form follows the paper's rule (section 4.1: "10³ divided by number of elements in
attention map and batch size for each layer"): ``distillation_terms`` weights each pair's
batch-mean distance by ``β / (H·W)``, H×W being the pair's (matched) map size, so with the
default β = 1000 each pair gets the paper's 10³/(H·W·batch) on a batch sum. The batch mean
does the division by the batch size. The code form needs no such factor: its mean already
divides by H·W and the batch. So one β means the same in both forms, and at β = 1000 the two
terms are of the same order (the paper form's per-pair term is about ``1/(2‖d‖)`` times the code
form's, ``d`` a sample's map difference, ‖d‖ ≤ √2) instead of ``H·W/(2‖d‖)`` times. Gradient AT
divides by the elements of one sample's input gradient (C·H·W) the same way.

Gradient-based AT (section 3.2): ``J = ∂L/∂x`` for teacher and student; the same distance on the
per-sample L2-normalised ``J``, trained with double backpropagation; optionally the student's
horizontal-flip term ``||J − flip(J)||`` weighted by its own β.

KD (Hinton et al. 2015): ``KL(softmax(t/T) || softmax(s/T)) · T²``, averaged over the batch,
mixed as ``α·KD + (1-α)·CE``.

FitNet hints (Romero et al. 2015): ``mean((r(S) − T)²)`` over every element of one stage's output, ``r``
the learned regressor (``compressor.distill.hints``), the mean of ``nn.MSELoss`` as RepDistiller's
``HintLoss`` and mdistiller's FitNet use it; added to the full CE with its own weight (100).

DKD (Zhao et al. 2022): KD split at temperature T into the target-class term TCKD (KL between the
binary distributions ``[p_gt, 1 − p_gt]`` of teacher and student) and the non-target term NCKD (KL
between the distributions over the non-target classes alone, renormalised), each batch-mean × T²;
the objective is ``CE + w·(α·TCKD + β·NCKD)``, ``w`` the warm-up factor ``min(epoch / warm-up, 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from compressor.config import parse_method

AtForm = Literal["code", "paper"]

Reduce = Literal["mean", "max"]


def attention_map(a: torch.Tensor, p: float = 2, reduce: Reduce = "mean") -> torch.Tensor:
    """Normalised spatial attention of ``a`` (B×C×H×W) → B×(H·W); ``reduce='max'`` is max-p.

    The map uses ``|A|^p`` for every p, the paper's definition (its F_sum^p is Σ_c |A_c|^p).
    For even p this equals ``A^p``; for odd p (e.g. p = 1, 3) peer reimplementations differ:
    RepDistiller and mdistiller compute ``f.pow(p)`` without the absolute value, i.e. the signed
    ``A^p``, which lets positive and negative activations cancel. After a ReLU (most tapped
    points) activations are non-negative and both agree; before a ReLU (e.g. WRN's teacher maps,
    taken before the final BN-ReLU) they do not, so odd-p results are not comparable with those
    implementations.

    The map is computed in float32 from a float32 copy of ``a`` (autocast leaves abs, pow and mean of a
    float32 tensor in float32 on CUDA and the CPU alike), so under bf16 autocast only the activation
    itself is bf16.
    """
    a = a if a.dtype == torch.float32 else a.float()  # fp32 whatever the autocast dtype: a bf16 |A|^p and mean lose detail
    energy = a.abs().pow(p)
    pooled = energy.mean(1) if reduce == "mean" else energy.amax(1)
    return F.normalize(pooled.flatten(1), dim=1)


def match_spatial(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two feature maps to the smaller one's height and width."""
    hs, ht = s.shape[-2:], t.shape[-2:]
    if hs == ht:
        return s, t
    size = (min(hs[0], ht[0]), min(hs[1], ht[1]))
    return F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)


def at_distance(qs: torch.Tensor, qt: torch.Tensor, form: AtForm = "code") -> torch.Tensor:
    """Distance between two batches of normalised maps, *without* β."""
    if form == "code":
        return (qs - qt).pow(2).mean()
    return 0.5 * (qs - qt).norm(p=2, dim=1).mean()


def at_loss(s: torch.Tensor, t: torch.Tensor, p: float = 2, form: AtForm = "code", reduce: Reduce = "mean") -> torch.Tensor:
    """AT loss of one student/teacher activation pair (β not applied)."""
    s, t = match_spatial(s, t)
    return at_distance(attention_map(s, p, reduce), attention_map(t, p, reduce), form)


def pair_weight(form: AtForm, s: torch.Tensor, t: torch.Tensor) -> float:
    """The factor a pair's AT distance is weighted by besides β: 1 for the code form; for the paper
    form, 1 / (number of elements of one sample's matched attention map), the paper's β rule."""
    if form == "code":
        return 1.0
    if s.dim() == 4:  # activations: the map is H×W of the smaller of the two
        return 1.0 / (min(s.shape[-2], t.shape[-2]) * min(s.shape[-1], t.shape[-1]))
    return 1.0 / max(1, s[0].numel())  # input gradients: C×H×W per sample


def input_gradient(model, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``J = ∂L/∂x`` with ``L`` the summed cross-entropy (so each sample's gradient ignores the batch size).

    ``create_graph=True`` keeps the graph for double backpropagation through a student; the teacher's
    gradient is a plain one. ``x`` must require grad. Returns the gradient and the logits.
    """
    logits = model(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), x, create_graph=create_graph)
    return grad, logits


def gradient_at_loss(js: torch.Tensor, jt: torch.Tensor, form: AtForm = "code") -> torch.Tensor:
    """Gradient-based AT: distance between per-sample L2-normalised input gradients (β not applied)."""
    return at_distance(F.normalize(js.flatten(1).float(), dim=1), F.normalize(jt.flatten(1).float(), dim=1), form)


def flip_symmetry_loss(j: torch.Tensor, form: AtForm = "code") -> torch.Tensor:
    """The paper's horizontal-flip term ``||J − flip(J)||`` on the normalised input gradient (β not applied)."""
    return gradient_at_loss(j, j.flip(-1), form)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Hinton KD: batch-mean KL(teacher ‖ student) at temperature T, times T²."""
    log_s = F.log_softmax(student_logits.float() / T, dim=1)
    p_t = F.softmax(teacher_logits.float() / T, dim=1)
    return F.kl_div(log_s, p_t, reduction="batchmean") * T * T


def hint_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """FitNet's hint: the mean squared difference over every element, in fp32; ``s`` is the student's
    stage output already through the regressor, pooled like AT where the sizes still differ."""
    s, t = match_spatial(s, t)
    return (s.float() - t.float()).pow(2).mean()


def _log_binary(z: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """log [p_gt, 1 − p_gt] of softmax(z) per sample (B×2), from log-sum-exps, never log(1 − p)."""
    whole = z.logsumexp(1)
    others = z.masked_fill(gt, float("-inf")).logsumexp(1)
    return torch.stack([(z * gt).sum(1) - whole, others - whole], dim=1)


def dkd_parts(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
              T: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's (TCKD, NCKD), unweighted: each a batch-mean KL(teacher ‖ student) at temperature T, times T²."""
    zs, zt = student_logits.float() / T, teacher_logits.float() / T
    gt = torch.zeros_like(zs, dtype=torch.bool).scatter_(1, targets[:, None], True)  # not one_hot: it reads the labels' range on the host
    bs, bt = _log_binary(zs, gt), _log_binary(zt, gt)
    tckd = (bt.exp() * (bt - bs)).sum(1).mean()
    ls, lt = (z.masked_fill(gt, float("-inf")).log_softmax(1) for z in (zs, zt))
    nckd = (lt.exp() * torch.where(gt, 0.0, lt - ls)).sum(1).mean()  # the target entry (-inf − -inf) left out
    return tckd * T * T, nckd * T * T


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, T: float = 4.0) -> torch.Tensor:
    """DKD: ``α·TCKD + β·NCKD`` (no warm-up, no CE)."""
    tckd, nckd = dkd_parts(student_logits, teacher_logits, targets, T)
    return alpha * tckd + beta * nckd


@dataclass(frozen=True)
class Objective:
    """Which terms the loss has and their weights. ``method`` joins at most one feature term (at, fitnet)
    and one logit term (kd, dkd) with ``+``, or is ``none`` (``compressor.config.parse_method``)."""

    method: str = "at+kd"
    alpha: float = 0.9
    temperature: float = 4.0
    beta: float = 1000.0
    p: float = 2.0
    form: AtForm = "code"
    reduce: Reduce = "mean"
    gradient: bool = False  # gradient-based AT on input gradients instead of activation maps
    flip_beta: float = 0.0  # weight of the student's flip-symmetry term (gradient AT only)
    hint_weight: float = 100.0  # FitNet
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_temperature: float = 4.0
    hint_only: bool = False  # FitNet's stage 1: the hint alone trains the student's lower half (and the regressor)

    def __post_init__(self) -> None:
        parse_method(self.method)  # an invalid combination fails here, in one line

    @cached_property
    def parts(self) -> tuple[str, ...]:  # read every step: parsed once
        return parse_method(self.method)

    @property
    def uses_kd(self) -> bool:
        return "kd" in self.parts

    @property
    def uses_at(self) -> bool:
        return "at" in self.parts

    @property
    def uses_fitnet(self) -> bool:
        return "fitnet" in self.parts

    @property
    def uses_dkd(self) -> bool:
        return "dkd" in self.parts

    @property
    def needs_teacher(self) -> bool:
        return bool(self.parts)


def distillation_terms(obj: Objective, student_logits: torch.Tensor, targets: torch.Tensor,
                       teacher_logits: torch.Tensor | None = None,
                       pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
                       beta: float | None = None,
                       input_grads: tuple[torch.Tensor, torch.Tensor] | None = None,
                       hint: tuple[torch.Tensor, torch.Tensor] | None = None,
                       dkd_scale: float | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every weighted loss term by name plus their sum under ``"loss"``: ``ce``, and as the method asks
    ``kd``, ``tckd`` and ``nckd`` (DKD), ``at`` (and ``flip``), ``hint`` (FitNet). Each term is its part
    of the objective (``kd`` = α·KD, ``at`` = β·ΣAT, …). The cross-entropy is ``ce`` where it enters as
    it is and ``ce_weighted`` = (1−α)·CE beside KD, so that a ``ce`` in metrics, the dry run and the
    curves is always the plain cross-entropy (the teacher's, a student without KD, the test loss).

    ``beta`` overrides ``obj.beta`` for schedules that change it during training. With
    ``obj.gradient`` the AT term uses ``input_grads = (J_student, J_teacher)`` instead of ``pairs``.
    ``hint`` is FitNet's ``(regressed student stage output, teacher stage output)``; ``dkd_scale`` DKD's
    warm-up factor (1 when None), a number or a device scalar.
    """
    if obj.hint_only:
        if hint is None:
            raise ValueError("FitNet's stage 1 needs hint=(regressed student stage output, teacher stage output)")
        h = obj.hint_weight * hint_loss(*hint)
        return {"hint": h, "loss": h}
    ce = F.cross_entropy(student_logits.float(), targets)
    terms: dict[str, torch.Tensor] = {}
    if obj.uses_kd:
        assert teacher_logits is not None
        terms["ce_weighted"] = (1 - obj.alpha) * ce
        terms["kd"] = obj.alpha * kd_loss(student_logits, teacher_logits, obj.temperature)
    else:
        terms["ce"] = ce
    if obj.uses_dkd:
        assert teacher_logits is not None
        tckd, nckd = dkd_parts(student_logits, teacher_logits, targets, obj.dkd_temperature)
        w = 1.0 if dkd_scale is None else dkd_scale
        terms["tckd"] = w * obj.dkd_alpha * tckd
        terms["nckd"] = w * obj.dkd_beta * nckd
    if obj.uses_at:
        b = obj.beta if beta is None else beta
        if obj.gradient:
            if input_grads is None:
                raise ValueError("gradient-based AT needs input_grads=(J_student, J_teacher)")
            w = pair_weight(obj.form, input_grads[0], input_grads[1])
            terms["at"] = b * w * gradient_at_loss(input_grads[0], input_grads[1], obj.form)
            if obj.flip_beta:
                terms["flip"] = obj.flip_beta * w * flip_symmetry_loss(input_grads[0], obj.form)
        else:
            at_sum = sum(pair_weight(obj.form, s, t) * at_loss(s, t, obj.p, obj.form, obj.reduce) for s, t in pairs)
            terms["at"] = b * at_sum if pairs else ce.new_zeros(())
    if obj.uses_fitnet:
        if hint is None:
            raise ValueError("FitNet needs hint=(regressed student stage output, teacher stage output)")
        terms["hint"] = obj.hint_weight * hint_loss(*hint)
    terms["loss"] = sum(terms.values())
    return terms
