"""The pictures of a run: ``tradeoff.png`` (accuracy against measured speed-up and against
multiply-adds saved), ``curves.png`` (per-epoch loss terms and accuracy) and ``sweep.png``.

Both panels of the trade-off read the same way: better is up (more accurate) and to the right
(faster, or fewer multiply-adds than the teacher), the teacher at 1×. The latency speed-up is drawn
with its spread over the interleaved rounds (min–max) as error bars, and the published student
(report.json's ``published``) is ringed.

Each model's per-epoch history is the list of records ``fit`` writes to ``metrics.jsonl``
(``train_loss`` = the whole objective, ``train_<term>`` for each loss term, ``train_top1``,
``test_loss`` = plain cross-entropy, ``test_top1``). The curves give every quantity its own panel
(log scale where it is positive), so a student's whole objective (CE plus weighted KD and AT)
is never drawn against the teacher's cross-entropy on one axis; a table beside them gives the
final accuracies.

The ``*_figure`` functions build a matplotlib ``Figure`` (no global backend switch); tests
read its axes, the ``plot_*`` functions write the PNG.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from compressor import fileio
from compressor.report.pick import pareto_front
from compressor.report.tables import plural

__all__ = ["pareto_front", "plot_tradeoff", "tradeoff_figure", "plot_curves", "curves_figure", "plot_sweep"]


def _save(fig, path: str | Path, dpi: int) -> None:
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def _ratio_label(v: float, _pos: int = 0) -> str:
    return f"{v:g}×" if v > 0 else ""


def _ratio_axis(ax, values: list[float]) -> None:
    """An axis of ratios (teacher = 1×): linear with plain ticks, or log with 1-2-5 ticks when they span
    more than 20×; every tick labelled as ``N×``."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    lo, hi = min(values), max(values)
    if lo > 0 and hi / lo > 20:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(FuncFormatter(_ratio_label))


def _published_name(report: dict[str, Any]) -> str | None:
    pub = report.get("published")
    return pub.get("name") if isinstance(pub, dict) else None


def tradeoff_figure(report: dict[str, Any]):
    """Top-1 against measured latency speed-up (left) and against the multiply-add reduction (right)."""
    from matplotlib.figure import Figure

    t, studs = report["teacher"], report["students"]
    published = _published_name(report)
    fig = Figure(figsize=(12, 4.8))
    axes = fig.subplots(1, 2)
    panels = ((axes[0], "latency_speedup", "measured latency speed-up over the teacher (ORT CPU, batch 1; bars: min–max over rounds)"),
              (axes[1], "mac_ratio", "multiply-adds saved: teacher GMACs ÷ student GMACs (fvcore)"))
    for ax, key, label in panels:
        pts = [(float(s.get(key) or 0.0), float(s.get("top1") or 0.0)) for s in studs]
        teacher_pt = (1.0, float(t.get("top1") or 0.0))
        everyone = pts + [teacher_pt]
        fp = sorted(everyone[i] for i in pareto_front(everyone))
        if len(fp) > 1:
            ax.plot([p[0] for p in fp], [p[1] for p in fp], "--", c="tab:orange", lw=1.2, label="Pareto front", zorder=2)
        if key == "latency_speedup":
            lo = [max(x - (s.get("latency_speedup_spread") or [x, x])[0], 0.0) for s, (x, _) in zip(studs, pts)]
            hi = [max((s.get("latency_speedup_spread") or [x, x])[1] - x, 0.0) for s, (x, _) in zip(studs, pts)]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], xerr=[lo, hi], fmt="o", c="tab:blue", ecolor="tab:blue",
                        elinewidth=1.2, capsize=4, label="students", zorder=3)
        else:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], c="tab:blue", label="students", zorder=3)
        for s, (x, y) in zip(studs, pts):
            detail = f"{s['gmacs']:.3g} GMACs" if key == "mac_ratio" and s.get("gmacs") else f"{s.get('latency_ms') or 0:.3f} ms"
            ax.annotate(f"{s['name']} ({s.get('method', '')})\n{detail}", (x, y), textcoords="offset points", xytext=(6, 5),
                        fontsize=7)
            if (q := s.get("int8")) and key == "latency_speedup":
                ax.scatter([q["latency_speedup_vs_teacher"]], [q["top1_int8"]], marker="D", facecolors="none",
                           edgecolors="tab:purple", zorder=3, label="INT8 copies" if s is studs[0] else None)
        for s, (x, y) in zip(studs, pts):
            if s["name"] == published:
                ax.scatter([x], [y], s=260, facecolors="none", edgecolors="tab:green", linewidths=2.2, zorder=5,
                           label=f"published: {published}")
        ax.scatter([teacher_pt[0]], [teacher_pt[1]], marker="*", s=180, c="tab:red", zorder=4,
                   label=f"teacher {t['name']} ({t.get('gmacs', 0):.3g} GMACs)" if key == "mac_ratio" else f"teacher {t['name']}")
        _ratio_axis(ax, [p[0] for p in everyone if p[0] > 0] or [1.0])
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("top-1 accuracy (%, test)")
        ax.margins(x=0.18, y=0.15)
        if ax.get_xscale() == "linear":
            ax.set_xlim(left=max(ax.get_xlim()[0], 0.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_title("better: up and right (faster, more accurate)", fontsize=9)
    axes[1].set_title("better: up and right (cheaper, more accurate)", fontsize=9)
    fig.suptitle(f"{report['data']['name']}: accuracy vs cost")
    fig.tight_layout()
    return fig


def plot_tradeoff(report: dict[str, Any], path: str | Path) -> None:
    _save(tradeoff_figure(report), path, 120)


History = Sequence[dict]


def curve(history: History, key: str) -> tuple[list[float], list[float]]:
    """The (epochs, values) of ``key`` in a training history; epochs without a value are left out."""
    pts = [(float(r.get("epoch", i + 1)), float(r[key])) for i, r in enumerate(history) if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


# train_<key> entries of metrics.jsonl that are not loss terms
_NOT_TERMS = ("loss", "top1")


def loss_terms(models: Sequence[tuple[str, History]]) -> list[str]:
    """The loss-term names that appear as ``train_<term>`` in any history, in first-seen order."""
    terms: list[str] = []
    for _, history in models:
        for record in history:
            for key in record:
                if key.startswith("train_") and key[6:] not in _NOT_TERMS and key[6:] not in terms:
                    terms.append(key[6:])
    return terms


def _loss_panel(ax, models, key: str, title: str, colors) -> None:
    shown = []
    for i, (_, history) in enumerate(models):
        xs, ys = curve(history, key)
        if xs:
            ax.plot(xs, ys, "-", color=colors[i % len(colors)], marker="o" if len(xs) < 3 else None, ms=3)
            shown += ys
    if shown and min(shown) > 0:
        ax.set_yscale("log")
    if not shown:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.4")
    ax.set_title(title, fontsize=9)


def curves_figure(teacher: tuple[str, History] | None, students: Sequence[tuple[str, History]]):
    """One panel per quantity (whole objective, each loss term, test cross-entropy, top-1) and a table of
    final accuracies; one colour per model."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    models = ([(f"teacher {teacher[0]}", teacher[1])] if teacher else []) + [(f"student {n}", h) for n, h in students]
    models = [(n, h) for n, h in models if h]
    terms = loss_terms(models)
    panels = [("train_loss", "train: whole objective (sum of the terms)")]
    panels += [(f"train_{t}", f"train term: {t}") for t in terms]
    panels += [("test_loss", "test: cross-entropy")]
    n_plots = len(panels) + 1  # + top-1
    ncol = min(4, n_plots + 2)
    nrow = math.ceil((n_plots + 2) / ncol)  # the table takes the rest of the last row, at least two cells
    fig = Figure(figsize=(3.6 * ncol, 3.0 * nrow + 0.5))
    grid = fig.add_gridspec(nrow, ncol)
    axes = [fig.add_subplot(grid[i // ncol, i % ncol]) for i in range(n_plots)]
    table_ax = fig.add_subplot(grid[nrow - 1, n_plots % ncol if n_plots // ncol == nrow - 1 else 0:])
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes, panels):
        _loss_panel(ax, models, key, title, colors)
    acc = axes[len(panels)]
    for i, (_, history) in enumerate(models):
        for split, style in (("test", "-"), ("train", ":")):
            xs, ys = curve(history, f"{split}_top1")
            if xs:
                acc.plot(xs, ys, style, color=colors[i % len(colors)], marker="o" if len(xs) < 3 else None, ms=3)
    acc.set_title("top-1 % (test solid, train dotted)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
    table_ax.axis("off")
    if models:
        rows = [[name, _last(h, "test_top1"), _last(h, "train_top1"), str(len(h))] for name, h in models]
        tab = table_ax.table(cellText=rows, colLabels=["model", "test top-1 %", "train top-1 %", "epochs"],
                             bbox=(0.0, 0.0, 1.0, min(0.1 * (len(rows) + 1), 0.6)), cellLoc="left", colLoc="left",
                             colWidths=[0.5, 0.19, 0.19, 0.12])
        tab.auto_set_font_size(False)
        tab.set_fontsize(7)
        for i in range(len(models)):
            tab[i + 1, 0].get_text().set_color(colors[i % len(colors)])
        table_ax.set_title("final accuracy (after the last epoch)", fontsize=9)
        handles = [Line2D([], [], color=colors[i % len(colors)], label=name) for i, (name, _) in enumerate(models)]
        table_ax.legend(handles=handles, fontsize=7, loc="upper center", frameon=False)
    else:
        axes[0].text(0.5, 0.5, "no training history recorded", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle("training and test curves, one panel per quantity (log scale for losses)")
    fig.tight_layout()
    return fig


def _last(history: History, key: str) -> str:
    values = [r[key] for r in history if r.get(key) is not None]
    return f"{values[-1]:.2f}" if values else "–"


def plot_curves(path: str | Path, teacher: tuple[str, History] | None, students: Sequence[tuple[str, History]]) -> None:
    """``teacher`` and every student are ``(label, history)``; a model with an empty history is left out."""
    _save(curves_figure(teacher, students), path, 110)


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
