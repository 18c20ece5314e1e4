"""Loss and accuracy curves of a teacher and its students side by side (``curves.png``).

Each model's per-epoch history is the list of records ``fit`` writes to ``metrics.jsonl``
(``train_loss``, ``train_top1``, ``test_loss``, ``test_top1``). A student's training loss is its
whole objective (CE plus the weighted KD and AT terms), so it is not on the same scale as the
teacher's plain cross-entropy; the test loss is plain cross-entropy for every model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from compressor import fileio
from compressor.report.tables import plural


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (higher x, higher y)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front


def plot_tradeoff(report: dict[str, Any], path: str | Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    t, studs = report["teacher"], report["students"]
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "latency_speedup", "latency speed-up over teacher (×, measured)"),
                           (axes[1], "gmacs", "GMACs per image (fvcore multiply-adds)")):
        pts = [(s.get(key) or 0.0, s.get("top1") or 0.0) for s in studs]
        teacher_pt = (1.0 if key == "latency_speedup" else t["gmacs"], t.get("top1") or 0.0)
        everyone = pts + [teacher_pt]
        # Better is faster (higher speed-up) or cheaper (fewer GMACs), and more accurate.
        front = pareto_front([(x if key == "latency_speedup" else -x, y) for x, y in everyone])
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c="tab:blue", label="students", zorder=3)
        for s, (x, y) in zip(studs, pts):
            ax.annotate(f"{s['name']} ({s.get('method', '')})", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        fp = sorted(everyone[i] for i in front)
        if len(fp) > 1:
            ax.plot([p[0] for p in fp], [p[1] for p in fp], "--", c="tab:orange", label="Pareto front", zorder=2)
        ax.scatter([teacher_pt[0]], [teacher_pt[1]], marker="*", s=160, c="tab:red", label=f"teacher {t['name']}", zorder=4)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        if key == "gmacs":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(0.15)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{report['data']['name']}: accuracy vs cost")
    fig.tight_layout()
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")


History = Sequence[dict]


def curve(history: History, key: str) -> tuple[list[float], list[float]]:
    """The (epochs, values) of ``key`` in a training history; epochs without a value are left out."""
    pts = [(float(r.get("epoch", i + 1)), float(r[key])) for i, r in enumerate(history) if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(path: str | Path, teacher: tuple[str, History] | None, students: Sequence[tuple[str, History]]) -> None:
    """Two panels (loss, top-1) with train solid and test dashed, one colour per model.

    ``teacher`` and every student are ``(label, history)``; a model with an empty history is left out.
    """
    import matplotlib
    from matplotlib.figure import Figure

    models = ([(f"teacher {teacher[0]}", teacher[1])] if teacher else []) + [(f"student {n}", h) for n, h in students]
    models = [(n, h) for n, h in models if h]
    fig = Figure(figsize=(12.5, 4.2))
    axes = fig.subplots(1, 2)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, history) in enumerate(models):
        c = colors[i % len(colors)]
        for ax, metric in ((axes[0], "loss"), (axes[1], "top1")):
            for split, style in (("train", "-"), ("test", "--")):
                xs, ys = curve(history, f"{split}_{metric}")
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


def plot_sweep(result: dict[str, Any], path: str | Path) -> None:
    """Top-1 (mean ± std over seeds) against β on a log axis, one line per setting of the other keys."""
    from matplotlib.figure import Figure

    keys = list(result["grid"])
    xkey = "beta" if "beta" in keys else keys[0]
    others = [k for k in keys if k != xkey]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for c in result["cells"]:
        groups.setdefault(tuple(c["params"][k] for k in others), []).append(c)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    numeric = xkey == "beta"
    labels = result["grid"][xkey]
    baselines: dict[str, dict[str, Any]] = {}
    dodge = 10 ** 0.03  # spread overlapping error bars a little along the log axis
    for gi, (g, cs) in enumerate(groups.items()):
        name = ", ".join(f"{k}={v}" for k, v in zip(others, g)) or result["method"]
        pts = []
        for c in cs:
            if c["mean"] is None:
                continue
            x = float(c["params"][xkey]) if numeric else labels.index(c["params"][xkey])
            if numeric and x <= 0:
                baselines[json.dumps([r["dir"] for r in c["runs"]])] = {"cell": c, "name": name}
                continue
            pts.append((x * dodge ** (gi - (len(groups) - 1) / 2) if numeric and len(groups) > 1 else x, c["mean"], c["std"]))
        pts.sort()
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=name)
    colors = ["0.35", "tab:gray", "tab:brown", "tab:olive"]
    for bi, b in enumerate(baselines.values()):
        c = b["cell"]
        shared = len(baselines) == 1
        lab = f"{'β' if xkey == 'beta' else xkey} = 0 (no AT): {c['mean']:.2f}%" + ("" if shared else f" [{b['name']}]")
        ax.axhline(c["mean"], ls="--", color=colors[bi % len(colors)], label=lab)
        if c["std"]:
            ax.axhspan(c["mean"] - c["std"], c["mean"] + c["std"], color=colors[bi % len(colors)], alpha=0.12)
    t = result["teacher"]
    if numeric:
        ax.set_xscale("log")
        ax.set_xlabel("β (AT weight, log scale)")
    else:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels)
        ax.set_xlabel(xkey)
    ax.set_ylabel(f"student top-1 (%), mean ± std over {len(result['seeds'])} seed(s)")
    ax.set_title(f"{result['data']['name']}: {t['name']} (top-1 {t['top1']:.2f}%) → {result['student']} "
                 f"({result['method']}, {plural(result['epochs'], 'epoch')})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
