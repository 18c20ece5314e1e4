"""Trade-off reports: report.json (the data), report.md and the terminal table (views of it),
and tradeoff.png (top-1 against measured speed-up and against GMACs, Pareto front marked).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compressor import fileio
from compressor.errors import AtcError
from compressor.profiling import MAC_UNIT

REPORT_VERSION = 1
COLUMNS = ("model", "role", "top-1 %", "Δ top-1", "params", "GMACs", "latency ms", "params ×", "GMACs ×", "latency ×")


def _fmt_int(n: int) -> str:
    return f"{n:,}"


# When the middle half of the rounds' ratios spans more than this factor, the CPU was shared
# with other work (an idle machine stays within a few per cent): say so beside the figure.
NOISY_SPREAD = 1.25


def _speedup_cell(student: dict[str, Any]) -> str:
    if not student.get("latency_speedup"):
        return "–"
    text = f"{student['latency_speedup']:.2f}"
    if spread := student.get("latency_speedup_spread"):
        text += f" ({spread[0]:.2f}–{spread[1]:.2f})"
    return text


def noisy_latency(report: dict[str, Any]) -> list[str]:
    """Students whose interleaved rounds' interquartile ratios differ by more than ``NOISY_SPREAD`` times."""
    return [s["name"] for s in report["students"]
            if (q := s.get("latency_speedup_quartiles")) and q[0] > 0 and q[1] / q[0] > NOISY_SPREAD]


def rows(report: dict[str, Any]) -> list[list[str]]:
    """The trade-off table as strings: teacher first, then every student."""
    t = report["teacher"]
    out = [[t["name"], "teacher", f"{t['top1']:.2f}" if t.get("top1") is not None else "–", "", _fmt_int(t["params"]),
            f"{t['gmacs']:.4f}", f"{t['latency_ms']:.3f}" if t.get("latency_ms") else "–", "1.00", "1.00", "1.00"]]
    for s in report["students"]:
        out.append([s["name"], s.get("role", "student"), f"{s['top1']:.2f}" if s.get("top1") is not None else "–",
                    f"{s['top1_delta']:+.2f}" if s.get("top1_delta") is not None else "",
                    _fmt_int(s["params"]), f"{s['gmacs']:.4f}", f"{s['latency_ms']:.3f}" if s.get("latency_ms") else "–",
                    f"{s['param_ratio']:.2f}", f"{s['mac_ratio']:.2f}",
                    _speedup_cell(s)])
        if q := s.get("int8"):
            out.append([f"{s['name']} INT8", "student int8", f"{q['top1_int8']:.2f}", f"{q['top1_delta']:+.2f}", out[-1][4], out[-1][5],
                        f"{q['latency_ms']:.3f}", out[-1][7], out[-1][8], f"{q['latency_speedup_vs_teacher']:.2f}"])
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (higher x, higher y)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front


def markdown(report: dict[str, Any]) -> str:
    lat = report.get("latency", {})
    lines = [f"# atc report: {report['teacher']['name']} → {', '.join(s['name'] for s in report['students'])}", "",
             f"Data: {report['data']['name']} ({report['data']['train']} train / {report['data']['test']} test images, "
             f"{report['data']['classes']} classes). Preset `{report['preset']}`, {report['epochs']} epochs, method `{report['method']}`.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(report)]
    env = report.get("environment", {})
    lines += ["", f"{MAC_UNIT}. Latency: {lat.get('runtime', 'ort-cpu')}, batch {lat.get('batch_size', 1)}, "
              f"{lat.get('threads', '?')} threads, median of {lat.get('rounds', '?')} interleaved teacher/student rounds; "
              f"latency × is the median per-round ratio, (min–max) over rounds.", "",
              *([f"Latency is noisy for {', '.join(noisy)}: the middle half of the rounds spans more than {NOISY_SPREAD}×: the machine was "
                 "busy, or the thread count too high for a model this small; measure again on an idle machine (`atc profile "
                 "--threads 1`) before trusting the latency columns.", ""]
                if (noisy := noisy_latency(report)) else []),
              f"Measured on {env.get('cpu', '?')} ({env.get('cores', '?')} cores), torch {env.get('torch', '?')}, "
              f"onnxruntime {env.get('onnxruntime', '?')}.", ""]
    return "\n".join(lines)


def write_report(out_dir: str | Path, report: dict[str, Any]) -> None:
    out_dir = Path(out_dir)
    fileio.write_json(out_dir / "report.json", report)
    fileio.write_text(out_dir / "report.md", markdown(report))
    plot_tradeoff(report, out_dir / "tradeoff.png")


def read_report(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise AtcError(f"{run_dir} holds no report.json; pass the --out folder of an atc compress run")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AtcError(f"{path} is not valid JSON ({exc.msg}); re-run atc compress to rebuild it") from exc


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of the same teacher → one report with all their students."""
    base = dict(reports[0])
    names = {r["teacher"]["name"] for r in reports}
    if len(names) > 1:
        raise AtcError(f"the runs have different teachers ({', '.join(sorted(names))}); report them separately")
    base["students"] = [s for r in reports for s in r["students"]]
    return base


def plot_tradeoff(report: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    t, studs = report["teacher"], report["students"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
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
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.margins(0.15)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{report['data']['name']}: accuracy vs cost")
    fig.tight_layout()
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
