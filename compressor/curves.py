"""Loss and accuracy curves of a teacher and its students side by side (``curves.png``).

Each model's per-epoch history is the list of records ``fit`` writes to ``metrics.jsonl``
(``train_loss``, ``train_top1``, ``test_loss``, ``test_top1``). A student's training loss is its
whole objective (CE plus the weighted KD and AT terms), so it is not on the same scale as the
teacher's plain cross-entropy; the test loss is plain cross-entropy for every model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from compressor import fileio

History = Sequence[dict]


def _series(history: History, key: str) -> tuple[list[float], list[float]]:
    pts = [(float(r.get("epoch", i + 1)), float(r[key])) for i, r in enumerate(history) if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(path: str | Path, teacher: tuple[str, History] | None, students: Sequence[tuple[str, History]]) -> None:
    """Two panels (loss, top-1) with train solid and test dashed, one colour per model.

    ``teacher`` and every student are ``(label, history)``; a model with an empty history is left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = ([(f"teacher {teacher[0]}", teacher[1])] if teacher else []) + [(f"student {n}", h) for n, h in students]
    models = [(n, h) for n, h in models if h]
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, history) in enumerate(models):
        c = colors[i % len(colors)]
        for ax, metric in ((axes[0], "loss"), (axes[1], "top1")):
            for split, style in (("train", "-"), ("test", "--")):
                xs, ys = _series(history, f"{split}_{metric}")
                if xs:
                    ax.plot(xs, ys, style, color=c, marker="o" if len(xs) < 3 else None, ms=3,
                            label=f"{name} {split}")
    axes[0].set_ylabel("loss (train: whole objective; test: cross-entropy)")
    axes[1].set_ylabel("top-1 accuracy (%)")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if not models:
        axes[0].text(0.5, 0.5, "no training history recorded", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle("training (solid) and test (dashed) curves")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    if models:
        handles, labels = axes[1].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(0.8, 0.5))
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
