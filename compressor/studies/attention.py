"""Looking at attention: map grids, teacher/student agreement per stage, and object localisation.

For every AT stage (the teacher/student pairs ``attention.find_pairs`` chooses) over a test set:

- **AT distance**: the code-form AT loss ``mean((Q_s − Q_t)²)`` without β, averaged over images;
- **spatial correlation**: the Pearson correlation between the teacher's and the student's
  attention map of the same image (after pooling the larger map to the smaller), averaged over
  images; 1 means the same spatial pattern up to scale;
- **localisation** (data with object masks, e.g. ``shapes``): the share of a network's attention
  mass that falls on object pixels. A map cell's mass is spread evenly over the image pixels it
  covers, so the score is ``Σ_cells mass · (object fraction of the cell)``. ``chance`` is the
  object's share of the image: what a uniform map scores. Early layers respond to edges, half of
  which lie just outside the object; ``dilate`` grows the mask by a few pixels to count them.

Maps are those of the mechanism in use: ``sum-p`` (channel mean of ``|A|^p``), ``max-p`` (channel
max) or ``gradient`` (the same channel mean of ``|∂L/∂x|^p``, one map at input resolution).

Device rule: images, masks and the example that pairing runs on are moved to the device the
models run on: the ``device`` passed, or else the teacher's (``model_device``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compressor import fileio
from compressor.device import model_device, pick_device
from compressor.distill.losses import at_distance, attention_map, input_gradient, match_spatial
from compressor.errors import DataError
from compressor.events import SILENT, Reporter
from compressor.load import check_compatible, load_data, load_teacher_and_data, normalization
from compressor.models.checkpoint import load_model
from compressor.options import RunOptions
from compressor.pair import AttentionPair, find_pairs, find_stages, select_pairs, tapped

# ---------------------------------------------------------------- pure functions on maps


def spatial_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Pearson correlation of two batches of maps (B×…); a constant map scores 0."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    denom = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return ((a * b).sum(1) / denom).float()


def mass_inside(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each map's mass (B×h×w, non-negative) on the object pixels of ``masks`` (B×H×W)."""
    mass = maps.flatten(1).double()
    mass = mass / mass.sum(1, keepdim=True).clamp_min(1e-30)
    frac = F.adaptive_avg_pool2d(masks.double().unsqueeze(1), maps.shape[-2:]).flatten(1)
    return (mass * frac).sum(1).float()


def dilate(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow boolean masks (B×H×W) by ``pixels`` in every direction (a square structuring element)."""
    if pixels <= 0:
        return masks
    k = 2 * pixels + 1
    return F.max_pool2d(masks.float().unsqueeze(1), k, stride=1, padding=pixels).squeeze(1) > 0


def spatial_maps(acts: torch.Tensor, p: float = 2, reduce: str = "mean") -> torch.Tensor:
    """Normalised attention maps of activations (B×C×H×W) in their spatial shape (B×H×W)."""
    return attention_map(acts, p, reduce).view(acts.shape[0], *acts.shape[-2:])  # type: ignore[arg-type]


# ---------------------------------------------------------------- maps of a model


@dataclass
class Net:
    """A model with its name and input normalisation."""

    name: str
    model: nn.Module
    mean: Sequence[float]
    std: Sequence[float]

    def prepare(self, x_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
        m = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        s = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return (x_uint8.to(device).float() / 255 - m) / s


def stage_activations(net: Net, x_uint8: torch.Tensor, y: torch.Tensor, modules: Sequence[str], gradient: bool,
                      device: torch.device | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-stage tensors to take maps of (activations, or the input gradient) and the logits; the
    images go to ``device`` (default: the model's)."""
    device = device if device is not None else model_device(net.model)
    x = net.prepare(x_uint8, device)
    if gradient:
        x.requires_grad_(True)
        j, logits = input_gradient(net.model, x, y.to(device))
        return [j.detach()], logits.detach()
    with tapped(net.model, modules) as taps, torch.no_grad():
        logits = net.model(x)
        acts = taps.take(modules)
    return acts, logits


# ---------------------------------------------------------------- the analysis


@dataclass
class StageResult:
    label: str
    teacher_module: str
    student_module: str | None
    resolution: tuple[int, int]
    at_distance: float | None = None
    correlation: float | None = None
    teacher_localization: float | None = None
    student_localization: float | None = None
    chance: float | None = None  # a uniform map's score: the object's share of the image
    position_prior: float | None = None  # a map that ignores the image: where objects lie on average in training


@dataclass
class AttentionResult:
    attention: str
    p: float
    data: str
    test_images: int
    teacher: dict[str, Any]
    student: dict[str, Any] | None
    stages: list[StageResult] = field(default_factory=list)
    png: str | None = None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def attention_stages(teacher: Net, student: Net | None, example: torch.Tensor, layers: str, gradient: bool) -> list[tuple[str, str | None, str]]:
    """(label, teacher module, student module) per stage; the gradient mechanism has one, the input."""
    if gradient:
        return [("input gradient", "input", "input" if student else None)]
    if student is not None:
        pairs = find_pairs(student.model, teacher.model, example, layers)
        return [(p.teacher.module if p.teacher.module == p.student.module else f"{p.teacher.module}/{p.student.module}",
                 p.teacher.module, p.student.module) for p in pairs]
    stages = find_stages(teacher.model, example)
    chosen = select_pairs([AttentionPair(s, s) for s in stages], layers)
    return [(p.teacher.module, p.teacher.module, None) for p in chosen]


def analyze(teacher: Net, student: Net | None, x: torch.Tensor, y: torch.Tensor, *, masks: torch.Tensor | None = None,
            prior: torch.Tensor | None = None, attention: str = "sum-p", p: float = 2.0, layers: str = "all", batch_size: int = 200,
            device: torch.device | None = None, reporter: Reporter = SILENT) -> AttentionResult:
    """Per-stage AT distance, spatial correlation and (with ``masks``) localisation over ``x`` (uint8 N×C×H×W).

    ``prior`` (H×W, e.g. the mean training mask) is scored like an attention map that never looks
    at the image: a network localises only where it beats that. The models run on ``device`` (moved
    there when given; default: the teacher's device, where the student joins it)."""
    device = device if device is not None else model_device(teacher.model)
    gradient, reduce = attention == "gradient", "max" if attention == "max-p" else "mean"
    nets = [n for n in (teacher, student) if n is not None]
    for n in nets:
        n.model.to(device).eval()
    example = teacher.prepare(x[:1], device)
    stages = attention_stages(teacher, student, example, layers, gradient)
    t_mods = [s[1] for s in stages]
    s_mods = [s[2] for s in stages]
    k = len(stages)
    sums = {key: [0.0] * k for key in ("dist", "corr", "tloc", "sloc", "chance", "prior")}
    correct = {n.name: 0 for n in nets}
    res: list[tuple[int, int]] = [(0, 0)] * k
    total = len(y)
    reporter.task(f"attention over {total} test images", -(-total // batch_size))
    for lo in range(0, total, batch_size):
        xb, yb = x[lo:lo + batch_size], y[lo:lo + batch_size]
        t_acts, t_logits = stage_activations(teacher, xb, yb, t_mods, gradient, device)
        correct[teacher.name] += int((t_logits.argmax(1).cpu() == yb).sum())
        s_acts: list[torch.Tensor] = []
        if student is not None:
            s_acts, s_logits = stage_activations(student, xb, yb, [m for m in s_mods if m], gradient, device)
            correct[student.name] += int((s_logits.argmax(1).cpu() == yb).sum())
        mb = masks[lo:lo + batch_size].to(device) if masks is not None else None
        for i in range(k):
            tq = spatial_maps(t_acts[i].float(), p, reduce)
            res[i] = tuple(tq.shape[-2:])  # type: ignore[assignment]
            if mb is not None:
                sums["tloc"][i] += float(mass_inside(tq, mb).sum())
                sums["chance"][i] += float(mb.float().flatten(1).mean(1).sum())
                if prior is not None:
                    pm = F.adaptive_avg_pool2d(prior.to(device).double()[None, None], res[i])[0, 0]
                    sums["prior"][i] += float(mass_inside(pm.expand(len(yb), *pm.shape), mb).sum())
            if student is not None:
                sq = spatial_maps(s_acts[i].float(), p, reduce)
                if mb is not None:
                    sums["sloc"][i] += float(mass_inside(sq, mb).sum())
                a_s, a_t = match_spatial(s_acts[i].float(), t_acts[i].float())
                qs, qt = attention_map(a_s, p, reduce), attention_map(a_t, p, reduce)  # type: ignore[arg-type]
                sums["dist"][i] += float(at_distance(qs, qt, "code")) * len(yb)
                sums["corr"][i] += float(spatial_correlation(qs, qt).sum())
        reporter.advance(1)
    reporter.done()
    out = []
    for i, (label, tm, sm) in enumerate(stages):
        r = StageResult(label, tm, sm, res[i])
        if student is not None:
            r.at_distance, r.correlation = sums["dist"][i] / total, sums["corr"][i] / total
        if masks is not None:
            r.teacher_localization, r.chance = sums["tloc"][i] / total, sums["chance"][i] / total
            r.position_prior = sums["prior"][i] / total if prior is not None else None
            if student is not None:
                r.student_localization = sums["sloc"][i] / total
        out.append(r)
    acc = {n: 100.0 * c / max(total, 1) for n, c in correct.items()}
    return AttentionResult(attention, p, "", total, {"name": teacher.name, "top1": acc[teacher.name]},
                           {"name": student.name, "top1": acc[student.name]} if student else None, out)


def pick_images(n_total: int, n: int) -> list[int]:
    """``n`` test indices spread evenly over the test set (sorted folders: one from each part)."""
    n = max(1, min(n, n_total))
    return sorted({int(i) for i in torch.linspace(0, n_total - 1, n).round().tolist()})


MAP_CMAP = "viridis"  # perceptually uniform: equal steps in value look like equal steps in colour


def _label(names: Sequence[str], k: int) -> str:
    return str(names[k]) if names and k < len(names) else str(k)


def maps_figure(teacher: Net, student: Net | None, x: torch.Tensor, y: torch.Tensor, result: AttentionResult,
                class_names: Sequence[str] = (), device: torch.device | None = None, overlay: bool = False):
    """Rows of images; columns: the input (true and predicted classes beside it), then per stage the
    teacher's map and the student's. Maps are drawn cell by cell (nearest, no smoothing: an 8×8 map
    shows 8×8 cells), each scaled to its own maximum so one colour bar serves all; ``overlay`` draws
    them over the image in grey instead of alone. Each model runs on ``device``, or on its own."""
    from matplotlib.figure import Figure

    gradient, reduce = result.attention == "gradient", "max" if result.attention == "max-p" else "mean"
    t_mods = [s.teacher_module for s in result.stages]
    s_mods = [s.student_module for s in result.stages if s.student_module]
    t_acts, t_logits = stage_activations(teacher, x, y, t_mods, gradient, device)
    cols: list[tuple[str, torch.Tensor]] = []
    s_acts, s_logits = (stage_activations(student, x, y, s_mods, gradient, device) if student else ([], None))
    for i, st in enumerate(result.stages):
        h, w = st.resolution
        cols.append((f"teacher\n{st.teacher_module} {h}×{w}", spatial_maps(t_acts[i].float(), result.p, reduce).cpu()))
        if student is not None:
            sq = spatial_maps(s_acts[i].float(), result.p, reduce).cpu()
            extra = f"\nr={st.correlation:.2f}" if st.correlation is not None else ""
            cols.append((f"student\n{st.student_module} {sq.shape[-2]}×{sq.shape[-1]}{extra}", sq))
    t_pred = t_logits.argmax(1).cpu()
    s_pred = s_logits.argmax(1).cpu() if s_logits is not None else None
    n, ncol = len(y), 1 + len(cols)
    fig = Figure(figsize=(1.45 * ncol + 1.6, 1.45 * n + 0.7), layout="constrained")
    axes = fig.subplots(n, ncol, squeeze=False)
    image = None
    for r in range(n):
        img = x[r].permute(1, 2, 0).numpy()
        grey = img.mean(-1) if img.shape[-1] > 1 else img[..., 0]
        ax = axes[r][0]
        ax.imshow(img if img.shape[-1] == 3 else grey, cmap=None if img.shape[-1] == 3 else "gray", interpolation="nearest")
        said = [("teacher", int(t_pred[r]))] + ([("student", int(s_pred[r]))] if s_pred is not None else [])
        ax.set_ylabel("\n".join([f"true: {_label(class_names, int(y[r]))}"] + [f"{who}: {_label(class_names, k)}" for who, k in said]),
                      fontsize=6, rotation=0, ha="right", va="center",
                      color="tab:red" if any(k != int(y[r]) for _, k in said) else "black")  # red: a model got it wrong
        h, w = grey.shape
        for c, (title, maps) in enumerate(cols, start=1):
            m = maps[r].numpy()
            m = m / max(float(m.max()), 1e-12)
            cell = axes[r][c]
            if overlay:
                cell.imshow(grey, cmap="gray", interpolation="nearest", extent=(0, w, h, 0))
                image = cell.imshow(m, cmap=MAP_CMAP, interpolation="nearest", vmin=0, vmax=1, alpha=0.6, extent=(0, w, h, 0))
            else:
                image = cell.imshow(m, cmap=MAP_CMAP, interpolation="nearest", vmin=0, vmax=1)
            if r == 0:
                cell.set_title(title, fontsize=6)
        if r == 0:
            ax.set_title("input", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    mech = result.attention + ("" if gradient and result.p == 1 else f" (p={result.p:g})")
    who = f"teacher {teacher.name}" + (f" → student {student.name}" if student else "")
    fig.suptitle(f"attention maps, {mech}: {who}" + (" (over the image)" if overlay else ""), fontsize=8)
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes.flat), fraction=0.04, pad=0.01, shrink=min(1.0, 4 / max(n, 1)))
        bar.set_label("attention ÷ the map's maximum", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    return fig


def plot_grid(path: str | Path, teacher: Net, student: Net | None, x: torch.Tensor, y: torch.Tensor,
              result: AttentionResult, class_names: Sequence[str] = (), device: torch.device | None = None,
              overlay: bool = False) -> None:
    """Write ``maps_figure`` as a PNG."""
    fig = maps_figure(teacher, student, x, y, result, class_names, device, overlay)
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=130, format="png")


@dataclass(frozen=True)
class AttentionOptions:
    """What ``atc attention`` looks at: ``images`` rows in the map grid, ``test_images`` for the
    per-stage numbers (0: all), the mechanism (``attention``, ``p``, ``layers``; None: the preset's,
    p = 1 for gradient), and with ``localization`` the share of attention on the object, masks
    grown by ``dilate_px``; ``overlay`` draws the maps over the images."""

    images: int = 8
    test_images: int = 2000
    attention: str | None = None
    p: float | None = None
    layers: str | None = None
    localization: bool = False
    dilate_px: int = 0
    overlay: bool = False  # draw the maps over the image (grey) instead of alone


def attention_report(teacher_path: str | Path, data_spec: str | Path, out_png: str | Path, cfg, *, student_path: str | Path | None = None,
                     view: AttentionOptions = AttentionOptions(), options: RunOptions = RunOptions(),
                     reporter: Reporter = SILENT) -> AttentionResult:
    """``atc attention``: load the models and data, compute the per-stage numbers, write the map grid.
    From ``options``: ``device`` and how to read the checkpoints (``arch``, ``trust``)."""
    images, test_images, localization, dilate_px = view.images, view.test_images, view.localization, view.dilate_px
    attention = view.attention or cfg.distill.attention
    p = view.p if view.p is not None else (1.0 if attention == "gradient" else cfg.distill.p)
    layers = view.layers or cfg.distill.at_layers
    data = load_data(data_spec, cfg, reporter=reporter)
    masks = getattr(data, "test_masks", None)
    if localization and masks is None:
        raise DataError("--localization needs data with object masks; pass --data shapes (the generated shapes dataset)")
    loaded = load_teacher_and_data(teacher_path, data_spec, cfg, options, reporter=reporter, data=data)
    teacher, student = Net(loaded.spec.name, loaded.model, *loaded.mean_std), None
    if student_path is not None:
        model, spec, _ = load_model(student_path, trust=loaded.trust)
        check_compatible(spec, data, "student")
        student = Net(spec.name, model, *normalization(spec, data))
    if student is not None and student.name == teacher.name:
        teacher.name, student.name = f"{teacher.name} (teacher)", f"{student.name} (student)"
    dev = pick_device(options.device)
    sel = pick_images(len(data.test_y), test_images or len(data.test_y))  # spread over the (often class-sorted) test set
    prior = dilate(data.train_masks, dilate_px).float().mean(0) if localization else None
    result = analyze(teacher, student, data.test_x[sel], data.test_y[sel], masks=dilate(masks[sel], dilate_px) if localization else None,
                     prior=prior, attention=attention, p=p, layers=layers, device=dev, reporter=reporter)
    result.data = data.name
    idx = pick_images(len(data.test_y), images)
    plot_grid(out_png, teacher, student, data.test_x[idx], data.test_y[idx], result, data.class_names, dev, view.overlay)
    result.png = str(out_png)
    return result
