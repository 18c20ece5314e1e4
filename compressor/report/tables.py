"""Views of report.json and sweep.json as rows of strings: the terminal table, report.md and
sweep.md. Plain data in, strings out."""

from __future__ import annotations

from typing import Any

from compressor.units import MAC_UNIT

COLUMNS = ("model", "role", "top-1 %", "Δ top-1", "params", "GMACs", "latency ms", "CV %", "params ×", "GMACs ×", "latency ×")


def _threads_of(report: dict[str, Any], s: dict[str, Any] | None = None) -> Any:
    """The thread count a row was timed with: its own (merged reports) or the report's."""
    return (s or {}).get("latency_threads", report.get("latency", {}).get("threads"))


def columns(report: dict[str, Any]) -> list[str]:
    """``COLUMNS`` with the latency column saying its thread count (``latency ms (1 thread)``), or
    ``(threads per row)`` when merged runs were timed with different counts."""
    counts = {_threads_of(report)} | {_threads_of(report, s) for s in report["students"]}
    label = f"latency ms ({plural(int(next(iter(counts))), 'thread')})" if len(counts) == 1 and None not in counts \
        else "latency ms (threads per row)"
    return [label if c == "latency ms" else c for c in COLUMNS]


def _ms_cell(ms: float | None, threads: Any, mixed: bool) -> str:
    if not ms:
        return "–"
    return f"{ms:.3f}" + (f" ({threads}t)" if mixed else "")


def _cv_cell(cv: float | None) -> str:
    return "–" if cv is None else f"{100 * cv:.1f}"


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


def noisy_latency_note(report: dict[str, Any]) -> str:
    """The one advice for noisy latency rounds (empty when every student's rounds agree)."""
    if not (noisy := noisy_latency(report)):
        return ""
    return (f"Latency is noisy for {', '.join(noisy)}: the middle half of the rounds spans more than {NOISY_SPREAD}×: the machine was "
            "busy, or the thread count too high for a model this small; measure again on an idle machine (`atc profile "
            "--threads 1`) before trusting the latency columns.")


# A coefficient of variation above this across one setting's timed runs means the timings are not
# to be trusted (an idle machine stays within a few per cent).
NOISY_CV = 0.25


def noisy_profile_note(latencies: list[dict[str, Any]]) -> str:
    """The advice for ``atc profile`` timings that varied too much (empty when they did not)."""
    noisy = [f"{lat['runtime']} batch {lat['batch_size']} (CV {100 * lat['cv']:.0f}%)" for lat in latencies if lat["cv"] > NOISY_CV]
    if not noisy:
        return ""
    return (f"the timings of {', '.join(noisy)} vary by more than {100 * NOISY_CV:.0f}% of their mean: the machine was busy, or "
            "the thread count too high for a model this small; measure again on an idle machine (--threads 1, --min-time 3) "
            "before trusting them")


def published_name(report: dict[str, Any]) -> str | None:
    pub = report.get("published")
    return pub.get("name") if isinstance(pub, dict) else None


def rows(report: dict[str, Any]) -> list[list[str]]:
    """The trade-off table as strings: teacher first, then every student (the published one says so)."""
    t = report["teacher"]
    mixed = columns(report)[6].endswith("(threads per row)")
    pub = published_name(report)
    out = [[t["name"], "teacher", f"{t['top1']:.2f}" if t.get("top1") is not None else "–", "", _fmt_int(t["params"]),
            f"{t['gmacs']:.4f}", _ms_cell(t.get("latency_ms"), _threads_of(report), mixed), _cv_cell(t.get("latency_cv")),
            "1.00", "1.00", "1.00"]]
    for s in report["students"]:
        role = s.get("role", "student") + (" (published)" if s["name"] == pub else "")
        out.append([s["name"], role, f"{s['top1']:.2f}" if s.get("top1") is not None else "–",
                    f"{s['top1_delta']:+.2f}" if s.get("top1_delta") is not None else "",
                    _fmt_int(s["params"]), f"{s['gmacs']:.4f}", _ms_cell(s.get("latency_ms"), _threads_of(report, s), mixed),
                    _cv_cell(s.get("latency_cv")), f"{s['param_ratio']:.2f}", f"{s['mac_ratio']:.2f}", _speedup_cell(s)])
        if q := s.get("int8"):
            out.append([f"{s['name']} INT8", "student int8", f"{q['top1_int8']:.2f}", f"{q['top1_delta']:+.2f}", out[-1][4], out[-1][5],
                        _ms_cell(q.get("latency_ms"), _threads_of(report, s), mixed), "–", out[-1][8], out[-1][9],
                        f"{q['latency_speedup_vs_teacher']:.2f}"])
    return out


def int8_notes(report: dict[str, Any]) -> list[str]:
    """Per INT8 copy: the weights' range and why, and its top-1 agreement with the QDQ graph (a warning when
    onnxruntime on this CPU computes something else)."""
    out = []
    for s in report["students"]:
        if not (q := s.get("int8")):
            continue
        line = f"INT8 {s['name']}: {q.get('weights_why') or 'S8 8-bit weights'}"
        if a := q.get("agreement"):
            line += f"; its top-1 equals the QDQ graph's (onnx reference evaluator) on {a['agree']} of {a['images']} test images"
            if a["agree"] != a["images"]:
                line += ": onnxruntime on this CPU computes something other than the model's graph, so the INT8 accuracy is this CPU's"
        out.append(line)
    return out


def report_notes(report: dict[str, Any]) -> list[str]:
    """The sentences every view of a report carries under its table: which student was published and
    why, how far to trust the latency (noisy rounds, a busy machine), and what the INT8 figures mean."""
    out = []
    if pub := report.get("published"):
        out.append(f"Published (student.pt, student.onnx at the top of the output folder): {pub['name']}; {pub['reason']}.")
    if noisy_latency(report):
        out.append(noisy_latency_note(report))
    out += [n[0].upper() + n[1:] + ("" if n.endswith(".") else ".") for n in report.get("latency", {}).get("notes", [])]
    out += [n + "." for n in int8_notes(report)]
    return out


GPU_COLUMNS = ("model", "role", "runtime", "batch", "median ms", "img/s", "arithmetic", "what it is")


def gpu_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per model, runtime and batch size of the GPU timings (none without CUDA)."""
    out = []
    models = [(report["teacher"], "teacher")] + [(s, s.get("role", "student")) for s in report["students"]]
    for m, role in models:
        for run in (m.get("gpu_latency") or {}).get("runs", []):
            out.append([m["name"], role, run["runtime"], str(run["batch_size"]), f"{run['median_ms']:.3f}",
                        f"{run['images_per_s']:,.0f}", f"{run.get('precision', 'fp32')}, {run.get('memory_format', 'contiguous')}",
                        run.get("label", "")])
    return out


def graph_lines(report: dict[str, Any]) -> list[str]:
    """report.md's line on what each student's training step ran as (``distill.cuda_graphs``)."""
    said = []
    for s in report["students"]:
        g = (s.get("distill") or {}).get("cuda_graphs")
        if not g:
            continue
        if g["state"] == "captured":
            what = f"a CUDA graph ({plural(g['captures'], 'capture')}, {g['replays']:,} replays)"
        elif g["state"] == "failed":
            what = f"eager after a failed CUDA graph ({g['why']})"
        else:
            what = f"eager ({g['why']})" if g.get("why") else "eager"
        said.append(f"{s['name']}: {what}")
    return [f"Training step: {'; '.join(said)}.", ""] if said else []


def gpu_lines(report: dict[str, Any]) -> list[str]:
    """report.md's GPU section: the table when there are GPU timings, and the notes of what is missing."""
    lat = report.get("latency", {})
    notes = [f"Note: {n}." if not n.endswith(".") else f"Note: {n}" for n in lat.get("gpu_notes", [])]
    if not (table := gpu_rows(report)):
        return [*notes, ""] if notes else []
    gpu = lat.get("gpu", {})
    return ["## GPU latency", "", f"{gpu.get('device', 'CUDA')}; {gpu.get('timing', 'CUDA events after warm-up')}. "
            "PyTorch runs in the precision and memory format the students were trained in (fp32 convolutions use "
            "PyTorch's default TF32).", "",
            "| " + " | ".join(GPU_COLUMNS) + " |", "|" + "---|" * len(GPU_COLUMNS),
            *("| " + " | ".join(r) + " |" for r in table), "", *notes, *([""] if notes else [])]


def _term_lines(report: dict[str, Any]) -> list[str]:
    """Per student, its loss terms by name (the last epoch's training means, as weighted in the loss) and
    FitNet's hint pair."""
    out = []
    for s in report["students"]:
        if s.get("loss_terms"):
            terms = ", ".join(f"{k} {v:.4g}" for k, v in s["loss_terms"].items())
            out.append(f"- {s['name']} ({s['method']}): loss terms in the last epoch (training means, weighted): {terms}")
        if s.get("hint"):
            out.append(f"- {s['name']} hint pair: {s['hint']}; the regressor trained with the student and is not part of "
                       "the exported model, its parameter count or its latency")
    return ["", *out] if out else []


def markdown(report: dict[str, Any]) -> str:
    lat = report.get("latency", {})
    head = columns(report)
    lines = [f"# atc report: {report['teacher']['name']} → {', '.join(s['name'] for s in report['students'])}", "",
             f"Data: {report['data']['name']} ({report['data']['train']} train / {report['data']['test']} test images, "
             f"{report['data']['classes']} classes). Preset `{report['preset']}`, {plural(report['epochs'], 'epoch')}, method `{report['method']}`.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(report)]
    env = report.get("environment", {})
    notes = report["data"].get("notes") or []
    lines += _term_lines(report)
    solo = lat.get("teacher_solo_median_ms", lat.get("teacher_median_ms"))  # report_version 1 files before 0.3 used the old key
    lines += ["", "Top-1 is the test accuracy after the last epoch, not the best epoch's.",
              *([f"Data: {'; '.join(notes)}."] if notes else []),
              "", f"{MAC_UNIT}. Latency: {lat.get('runtime', 'ort-cpu')}, batch {lat.get('batch_size', 1)}, "
              f"{plural(lat['threads'], 'thread') if isinstance(lat.get('threads'), int) else '? threads'}, median of "
              f"{lat.get('rounds', '?')} interleaved teacher/student rounds; CV is the standard deviation over the mean of each "
              "model's timed runs in those rounds; latency × is the median per-round ratio, (min–max) over rounds"
              + (f"; the teacher timed alone beforehand: {solo:.3f} ms" if solo else "")
              + (f"; load average {_load_text(lat)}" if lat.get("load_average") else "") + ".", "",
              *[x for n in report_notes(report) for x in (n, "")],
              f"Measured on {env.get('cpu', '?')} ({env.get('cores', '?')} cores), torch {env.get('torch', '?')}, "
              f"onnxruntime {env.get('onnxruntime', '?')}.", "", *graph_lines(report), *gpu_lines(report)]
    return "\n".join(lines)


def _load_text(lat: dict[str, Any]) -> str:
    before, after = (lat.get("load_average") or [None, None])[:2]
    fmt = lambda v: "?" if v is None else f"{v:.1f}"  # noqa: E731
    return f"{fmt(before)} before, {fmt(after)} after, on {plural(lat.get('cores') or 0, 'core')}"


# ---------------------------------------------------------------- views of sweep.json


def plural(n: int, word: str) -> str:
    """``1 epoch``, ``3 epochs``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def fmt_optional(v: float | None, spec: str = ".2f") -> str:
    """``v`` formatted, or a dash when there is no value."""
    return "–" if v is None else format(v, spec)


def _mean_std(summary: dict[str, Any] | None, signed: bool = False) -> str:
    if not summary or summary.get("mean") is None:
        return "–"
    return f"{summary['mean']:{'+' if signed else ''}.2f} ± {summary['std']:.2f}"


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    keys = list(result["grid"])
    paired = any("vs_none" in c for c in result["cells"])
    head = keys + ["n", "top-1 mean ± std", *(["Δ vs none (paired) mean ± std"] if paired else []), "median", "per seed"]
    rows = []
    for c in result["cells"]:
        per = ", ".join(f"{r['top1']:.2f}" for r in c["runs"])
        vs = [_mean_std(c.get("vs_none"), signed=True) if c["params"].get("method") != "none" else "(reference)"] if paired else []
        rows.append([c["params"][k] for k in keys] + [str(c["n"]), _mean_std(c), *vs, fmt_optional(c["median"]), per])
    return head, rows


def sweep_markdown(result: dict[str, Any]) -> str:
    head, rows = table_rows(result)
    t = result["teacher"]
    lines = [f"# atc sweep: {t['name']} → {result['student']} ({result['method']})", "",
             f"Data: {result['data']['name']} ({result['data']['train']} train / {result['data']['test']} test images). "
             f"Preset `{result['preset']}`, {plural(result['epochs'], 'epoch')}, seeds {', '.join(map(str, result['seeds']))}. "
             f"Teacher top-1 {t['top1']:.2f}%.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Top-1 in %; std is the sample standard deviation over seeds. At β = 0 the attention mechanism has no "
              "effect, so those cells share one run per seed."]
    if "Δ vs none (paired) mean ± std" in head:
        lines += ["Δ vs none: the cell's top-1 minus the `method=none` cell's with the same other settings, seed by seed "
                  "(the same seed gives the same initial student and batch order), then mean ± sample std over seeds, "
                  "in points; a spread as large as the mean says the difference is not resolved by these seeds."]
    lines += [""]
    if result.get("failed"):
        lines += [f"**Runs that did not finish ({len(result['failed'])})**, left out of the table above; the same command with "
                  "`--resume` tries them again:", ""]
        lines += [f"- `{f['run']}` ({f['status']}): {f['error']}" for f in result["failed"]] + [""]
    return "\n".join(lines)
