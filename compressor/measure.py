"""The measure step: the teacher and every distilled student exported, checked, counted and timed,
returned as typed entries (``compressor.entries.Measurements``) for the report to render.

Every student is exported to ONNX (parity with torch checked) and timed against the teacher in
interleaved onnxruntime rounds; the teacher is exported once for all of them. Export and CPU
latency work from CPU copies of the models (``to_onnx``), so the caller's models stay on whatever
device they are. With ``int8`` each student is also quantized (static QDQ, calibrated on training
images) and its INT8 accuracy and latency join its entry.

With CUDA present, every model is also timed on the GPU (``profiling.latency.gpu_latency``: PyTorch
at the precision and memory format the students were trained in, at batch 1 and a throughput
batch, as the eager forward and as a replayed CUDA graph; onnxruntime's CUDA provider too when a
one-op model truly runs on it). Those figures go to each entry's ``gpu_latency``; the CPU figures
keep their keys. Without CUDA the entries have no ``gpu_latency`` and ``latency["gpu_notes"]`` says
why. A GPU timing that fails is a note, never an error after training.

Each student's entry also says what its training step ran as (``distill.cuda_graphs``, from
``DistilledStudent.cuda_graphs``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compressor import fileio
from compressor.data.images import ImageData
from compressor.derive.candidates import Candidate
from compressor.device import Speed, threads_note
from compressor.distill.student import DistilledStudent
from compressor.entries import Int8Entry, Measurements, StudentEntry, TeacherEntry
from compressor.events import SILENT, Reporter
from compressor.export.int8 import int8_weights, int8_with_evaluation
from compressor.export.onnx import export_checked, to_onnx
from compressor.models.spec import ModelSpec
from compressor.profiling.counts import count_macs, count_params
from compressor.profiling.latency import (
    GPU_BATCH_SIZES,
    GpuFormat,
    Latency,
    SpeedUp,
    Timing,
    compare_latency,
    environment,
    gpu_latency,
    gpu_status,
    load_note,
    measure_latency,
    trained_format,
    usable_cores,
)


def measure(teacher: nn.Module, t_spec: ModelSpec, t_top1: float, students: list[DistilledStudent], candidates: list[Candidate],
            out: Path, *, threads: int | None = None, int8_data: ImageData | None = None, gpu: bool | None = None,
            speed: Speed | None = None, reporter: Reporter = SILENT) -> Measurements:
    """Export and time every student against the teacher (one teacher export serves them all); with
    ``int8_data`` (the training images that calibrate it) also quantize each student; with CUDA
    (``gpu``: None = detect) also time every model on the GPU, in the precision and memory format a
    run with ``speed`` trains in (None: fp32, contiguous). Paths in the entries are relative to ``out``."""
    with fileio.scratch_dir() as tmp:
        t_onnx = to_onnx(teacher, t_spec.input_size, tmp / "teacher.onnx")
        t_count = count_macs(teacher, t_spec.input_size)
        t_params, t_macs = count_params(teacher)["total"], t_count.gmacs
        if note := threads_note(threads):
            reporter.info(f"note: {note}")
        reporter.info("measuring teacher latency alone (onnxruntime CPU, batch 1)")
        t_lat = measure_latency(teacher, t_spec.input_size, "ort-cpu", 1, threads, Timing(min_time_s=0.5), onnx_path=t_onnx)
        entries, speeds = [], []
        reporter.task("export, check and time each student against the teacher", len(students))
        for res, cand in zip(students, candidates):
            entry, timed = student_entry(teacher, t_onnx, t_spec, t_top1, res, cand, out, threads, reporter)  # not ``speed``: the run's
            if int8_data is not None:
                entry.int8 = int8_entry(t_onnx, res, out / entry.onnx, int8_data, t_spec, t_top1, threads, out, reporter)
            entries.append(entry)
            speeds.append(timed)
            reporter.advance(1)
        reporter.done()
        models = [(t_spec.name, teacher, t_onnx)] + [(s.name, r.model, r.dir / "student.onnx") for s, r in zip(entries, students)]
        fmt = trained_format(speed) if speed is not None and torch.cuda.is_available() else GpuFormat()
        gpu_entries, gpu_meta = gpu_figures(models, t_spec.input_size, threads, cuda=gpu, reporter=reporter, fmt=fmt)
    t_gpu, *s_gpu = gpu_entries or [None] * (1 + len(entries))
    for s, g in zip(entries, s_gpu):
        s.gpu_latency = g
    last = speeds[-1] if speeds else None
    latency = {"runtime": "ort-cpu", "batch_size": 1, "threads": t_lat.threads, "rounds": last.rounds if last else 0,
               **machine_load(speeds), "teacher_solo_median_ms": t_lat.median_ms, "teacher_solo_cv": t_lat.cv, **gpu_meta}
    t_entry = TeacherEntry(t_spec.name, t_params, t_macs, 2 * t_macs, t_top1, last.teacher_ms if last else t_lat.median_ms, t_gpu,
                           t_count.conv_linear_gmacs, last.teacher_cv if last else t_lat.cv)
    return Measurements(t_entry, entries, latency, environment())


def machine_load(speeds: list[SpeedUp]) -> dict[str, Any]:
    """The report's load keys: the 1-minute load average before the first round and after the last,
    the usable cores, and the note when the load exceeded them (``notes``, empty otherwise)."""
    if not speeds:
        return {"load_average": [None, None], "cores": usable_cores(), "notes": []}
    before = [s.load[0] for s in speeds if s.load[0] is not None]
    after = [s.load[1] for s in speeds if s.load[1] is not None]
    load = [before[0] if before else None, max(after) if after else None]
    note = load_note(tuple(load) + tuple(before), speeds[0].cores)
    return {"load_average": load, "cores": speeds[0].cores, "notes": [note] if note else []}


def gpu_figures(models: list[tuple[str, nn.Module, Path | None]], input_size: tuple[int, int, int], threads: int | None = None,
                *, cuda: bool | None = None, ort_cuda: bool | None = None,
                measure: Callable[..., Latency] | None = None, device_name: str | None = None,
                reporter: Reporter = SILENT, fmt: GpuFormat = GpuFormat()) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """GPU latency of each ``(name, model, onnx file)``: ``([gpu_latency entry per model], latency-section keys)``;
    the PyTorch runtimes in ``fmt`` (precision, memory format).

    Without CUDA the list is empty and the section holds ``gpu_notes`` saying why; with CUDA it
    holds ``gpu`` (device, runtimes, batch sizes, format) and the notes of what was left out. ``cuda``,
    ``ort_cuda``, ``measure`` and ``device_name`` stand in for the machine in tests."""
    runtimes, notes = gpu_status(cuda, ort_cuda)
    if not runtimes:
        return [], {"gpu_notes": notes}  # in report.json and report.md; a CPU run's log stays as it was
    entries: list[dict[str, Any]] = []
    device = device_name
    for name, model, onnx_path in models:
        reporter.info(f"{name}: GPU latency ({', '.join(runtimes)}; batch {', '.join(map(str, GPU_BATCH_SIZES))})")
        g = gpu_latency(model, input_size, onnx_path, GPU_BATCH_SIZES, runtimes=runtimes, threads=threads, measure=measure,
                        device_name=device_name, fmt=fmt)
        device = g.device
        notes += [n for n in g.notes if n not in notes]
        entries.append({k: v for k, v in g.to_dict().items() if k != "notes"})  # notes: once, in the latency section
    for n in notes:
        reporter.info(n)
    return entries, {"gpu": {"device": device, "runtimes": runtimes, "batch_sizes": list(GPU_BATCH_SIZES),
                             "precision": fmt.precision, "memory_format": fmt.memory_format,
                             "timing": "CUDA events around one call after warm-up (torch-cuda: the eager forward, launches "
                                       "included; torch-cuda-graph: one CUDA-graph replay); I/O binding on the GPU "
                                       "(onnxruntime, fp32)"},
                     "gpu_notes": notes}


def final_terms(history: list[dict[str, float]]) -> dict[str, float] | None:
    """The last epoch's training mean of every loss term (``train_ce``, ``train_hint``, ``train_tckd``, …) by term
    name, the total last; None without a history."""
    if not history:
        return None
    last = history[-1]
    terms = {k[len("train_"):]: float(v) for k, v in last.items() if k.startswith("train_") and k != "train_top1"}
    return {**{k: v for k, v in terms.items() if k != "loss"}, **({"loss": terms["loss"]} if "loss" in terms else {})}


def student_entry(teacher: nn.Module, t_onnx: Path, t_spec: ModelSpec, t_top1: float, res: DistilledStudent, cand: Candidate,
                  out: Path, threads: int | None, reporter: Reporter = SILENT) -> tuple[StudentEntry, SpeedUp]:
    """One student exported (parity checked) and timed against the teacher's ONNX file."""
    onnx_path = res.dir / "student.onnx"
    parity = export_checked(res.model, res.spec, onnx_path)
    reporter.info(f"{cand.name}: exported {onnx_path} (max |ORT - torch| {parity.worst:.1e}, relative {parity.worst_rel:.1e}); "
                  "timing against the teacher")
    speed = compare_latency(teacher, res.model, t_spec.input_size, "ort-cpu", 1, threads, teacher_onnx=t_onnx,
                            student_onnx=onnx_path)
    entry = StudentEntry(
        name=cand.name, method=res.method, params=cand.params, gmacs=cand.gmacs, gflops=2 * cand.gmacs, top1=res.top1,
        top1_delta=res.top1 - t_top1, param_ratio=cand.param_ratio, mac_ratio=cand.mac_ratio, latency_ms=speed.student_ms,
        latency_speedup=speed.speedup, latency_speedup_spread=list(speed.spread),
        latency_speedup_quartiles=list(speed.quartiles), checkpoint=str((res.dir / "student.pt").relative_to(out)),
        onnx=str(onnx_path.relative_to(out)), onnx_parity_max_abs_diff={str(k): v for k, v in parity.max_abs_diff.items()},
        onnx_parity_max_rel_diff={str(k): v for k, v in parity.max_rel_diff.items()},
        train_seconds=res.train_seconds, epochs=res.epochs, attention_pairs=res.pairs, init=res.init,
        gmacs_conv_linear=cand.gmacs_conv_linear, distill={"cuda_graphs": res.cuda_graphs} if res.cuda_graphs else None,
        loss_terms=final_terms(res.history), hint=res.hint, latency_cv=speed.student_cv, teacher_latency_cv=speed.teacher_cv)
    if res.spec.plan is not None:  # a derived student: its shape and, after a search, target vs achieved
        plan = res.spec.plan
        search = plan.search.to_dict() if plan.search is not None else {}
        entry.derived = {"width": plan.width, "removed_blocks": plan.removed_blocks, "stages": [r.to_dict() for r in plan.stages],
                         "search": {k: v for k, v in search.items() if k != "trials"} or None}
    return entry, speed


def int8_entry(t_onnx: Path, res: DistilledStudent, onnx_path: Path, data: ImageData, t_spec: ModelSpec, t_top1: float,
               threads: int | None, out: Path, reporter: Reporter = SILENT) -> Int8Entry:
    """The student's INT8 copy (static QDQ, calibrated on ``data``'s training images): its top-1 and its latency."""
    spec = res.spec
    q_path = onnx_path.with_name("student.int8.onnx")
    weights = int8_weights()
    reporter.info(f"{spec.name}: INT8 static quantization (QDQ, U8 activations, {weights.label} per-channel weights), its top-1, "
                  "its agreement with the QDQ graph and its latency")
    r = int8_with_evaluation(onnx_path, q_path, data, spec.mean, spec.std, spec.input_size, threads=threads, weights=weights,
                             reporter=reporter)
    vs_teacher = compare_latency(None, None, t_spec.input_size, "ort-cpu", 1, threads, teacher_onnx=t_onnx, student_onnx=q_path)
    agreement = {"agree": r.agreement.agree, "images": r.agreement.images} if r.agreement else None
    return Int8Entry(path=str(q_path.relative_to(out)), top1_fp32=r.top1_fp32, top1_int8=r.top1_int8, speedup=r.speedup,
                     spread=list(r.spread), fp32_ms=r.fp32_ms, int8_ms=r.int8_ms, calibration_images=r.calibration_images,
                     top1_delta=r.top1_int8 - t_top1, latency_speedup_vs_teacher=vs_teacher.speedup,
                     latency_ms=vs_teacher.student_ms, weights=weights.label, weights_why=weights.why, agreement=agreement)
