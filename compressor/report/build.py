"""Trade-off reports: typed entries for the teacher, each student and its INT8 copy, assembled
into a ``Report`` whose ``to_dict()`` is report.json; report.md, the terminal table and
tradeoff.png are views of that JSON (``tables``, ``plots``).

Building a report measures: every student is exported (ONNX parity checked) and timed against
the teacher in interleaved onnxruntime rounds; the teacher is exported once for all of them.
Export and CPU latency work from CPU copies of the models (``to_onnx``), so the caller's models
stay on whatever device they are.

With CUDA present, every model is also timed on the GPU (``profiling.latency.gpu_latency``: torch
CUDA at batch 1 and a throughput batch, timed with CUDA events after warm-up; onnxruntime's CUDA
provider too when onnxruntime-gpu is installed). Those figures go to each entry's ``gpu_latency``;
the CPU figures keep their keys. Without CUDA the entries have no ``gpu_latency`` and
``latency["gpu_notes"]`` says why.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from compressor import __version__, fileio
from compressor.config import Config
from compressor.data.images import ImageData
from compressor.derive.candidates import Candidate
from compressor.distill.loop import DistilledStudent
from compressor.errors import AtcError
from compressor.events import SILENT, Reporter
from compressor.export.int8 import int8_with_evaluation
from compressor.export.onnx import export_checked, to_onnx
from compressor.models.spec import ModelSpec
from compressor.profiling.counts import count_macs, count_params
from compressor.profiling.latency import (
    GPU_BATCH_SIZES,
    Latency,
    Timing,
    compare_latency,
    environment,
    gpu_latency,
    gpu_status,
    measure_latency,
)
from compressor.report.plots import plot_tradeoff
from compressor.report.tables import markdown

REPORT_VERSION = 1
UNITS = {"gmacs": "fvcore multiply-adds, one multiply-add = one flop; GFLOPs = 2 x GMACs", "latency": "milliseconds"}


def _without_none(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """Optional keys appear in report.json only when they have a value."""
    return {k: v for k, v in d.items() if not (k in keys and v is None)}


@dataclass
class Int8Entry:
    path: str
    top1_fp32: float
    top1_int8: float
    speedup: float  # INT8 vs the student's own FP32 ONNX
    spread: list[float]
    fp32_ms: float
    int8_ms: float
    calibration_images: int
    top1_delta: float  # INT8 top-1 minus the teacher's
    latency_speedup_vs_teacher: float
    latency_ms: float


@dataclass
class StudentEntry:
    name: str
    method: str
    params: int
    gmacs: float
    gflops: float
    top1: float
    top1_delta: float
    param_ratio: float
    mac_ratio: float
    latency_ms: float
    latency_speedup: float
    latency_speedup_spread: list[float]
    latency_speedup_quartiles: list[float]
    checkpoint: str
    onnx: str
    onnx_parity_max_abs_diff: dict[str, float]
    onnx_parity_max_rel_diff: dict[str, float]
    train_seconds: float | None
    epochs: int
    attention_pairs: list[str]
    init: str | None
    role: str = "student"
    derived: dict[str, Any] | None = None  # width, removed blocks, stages and the search of a derived student
    int8: Int8Entry | None = None
    gpu_latency: dict[str, Any] | None = None  # GpuLatency.to_dict(), with CUDA only
    gmacs_conv_linear: float | None = None  # convolutions and matrix products alone (torchvision's convention)

    def to_dict(self) -> dict[str, Any]:
        return _without_none(asdict(self), ("derived", "int8", "gpu_latency"))


@dataclass
class TeacherEntry:
    name: str
    params: int
    gmacs: float
    gflops: float
    top1: float
    latency_ms: float
    gpu_latency: dict[str, Any] | None = None  # GpuLatency.to_dict(), with CUDA only
    gmacs_conv_linear: float | None = None  # convolutions and matrix products alone (torchvision's convention)

    def to_dict(self) -> dict[str, Any]:
        return _without_none(asdict(self), ("gpu_latency",))


@dataclass
class Report:
    command: str
    preset: str
    method: str
    epochs: int
    config: dict[str, Any]
    data: dict[str, Any]
    latency: dict[str, Any]
    teacher: TeacherEntry
    students: list[StudentEntry]
    environment: dict[str, Any] = field(default_factory=environment)
    atc_version: str = __version__
    report_version: int = REPORT_VERSION
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    units: dict[str, str] = field(default_factory=lambda: dict(UNITS))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["teacher"] = self.teacher.to_dict()
        d["students"] = [s.to_dict() for s in self.students]
        return d


def build_report(teacher: nn.Module, t_spec: ModelSpec, t_top1: float, results: list[DistilledStudent],
                 candidates: list[Candidate], data: ImageData, cfg: Config, method: str, out: Path,
                 threads: int | None, reporter: Reporter = SILENT, command: str = "", int8: bool = False,
                 gpu: bool | None = None) -> Report:
    """Export and time every student against the teacher (one teacher export serves them all); with
    CUDA (``gpu``: None = detect) also time every model on the GPU."""
    with tempfile.TemporaryDirectory() as tmp:
        t_onnx = to_onnx(teacher, t_spec.input_size, Path(tmp) / "teacher.onnx")
        t_count = count_macs(teacher, t_spec.input_size)
        t_params, t_macs = count_params(teacher)["total"], t_count.gmacs
        reporter.info("measuring teacher latency (onnxruntime CPU, batch 1)")
        t_lat = measure_latency(teacher, t_spec.input_size, "ort-cpu", 1, threads, Timing(min_time_s=0.5), onnx_path=t_onnx)
        students, rounds, t_ms = [], 0, t_lat.median_ms
        for res, cand in zip(results, candidates):
            entry, speed = _student_entry(teacher, t_onnx, t_spec, t_top1, res, cand, cfg, method, out, threads, reporter)
            rounds, t_ms = speed.rounds, speed.teacher_ms
            if int8:
                entry.int8 = _int8_entry(t_onnx, res, out / entry.onnx, data, t_spec, t_top1, threads, out, reporter)
            students.append(entry)
        models = [(t_spec.name, teacher, t_onnx)] + [(s.name, r.model, r.dir / "student.onnx") for s, r in zip(students, results)]
        gpu_entries, gpu_meta = gpu_figures(models, t_spec.input_size, threads, cuda=gpu, reporter=reporter)
    t_gpu, *s_gpu = gpu_entries or [None] * (1 + len(students))
    for s, g in zip(students, s_gpu):
        s.gpu_latency = g
    return Report(
        command=command, preset=cfg.preset, method=method, epochs=cfg.train.epochs, config=cfg.to_dict(),
        data={"name": data.name, "train": len(data.train_y), "test": len(data.test_y), "classes": data.num_classes,
              "input_size": list(data.input_size), "source_channels": list(data.source_channels),
              "resized_from": list(data.resized_from) if data.resized_from else None, "notes": list(data.notes)},
        latency={"runtime": "ort-cpu", "batch_size": 1, "threads": t_lat.threads, "rounds": rounds,
                 "teacher_median_ms": t_lat.median_ms, "teacher_cv": t_lat.cv, **gpu_meta},
        teacher=TeacherEntry(t_spec.name, t_params, t_macs, 2 * t_macs, t_top1, t_ms, t_gpu, t_count.conv_linear_gmacs),
        students=students)


def gpu_figures(models: list[tuple[str, nn.Module, Path | None]], input_size: tuple[int, int, int], threads: int | None = None,
                *, cuda: bool | None = None, ort_cuda: bool | None = None,
                measure: Callable[..., Latency] | None = None, device_name: str | None = None,
                reporter: Reporter = SILENT) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """GPU latency of each ``(name, model, onnx file)``: ``([gpu_latency entry per model], latency-section keys)``.

    Without CUDA the list is empty and the section holds ``gpu_notes`` saying why; with CUDA it
    holds ``gpu`` (device, runtimes, batch sizes) and the notes of what was left out. ``cuda``,
    ``ort_cuda``, ``measure`` and ``device_name`` stand in for the machine in tests."""
    runtimes, notes = gpu_status(cuda, ort_cuda)
    if not runtimes:
        return [], {"gpu_notes": notes}  # in report.json and report.md; a CPU run's log stays as it was
    entries: list[dict[str, Any]] = []
    device = device_name
    for name, model, onnx_path in models:
        reporter.info(f"{name}: GPU latency ({', '.join(runtimes)}; batch {', '.join(map(str, GPU_BATCH_SIZES))})")
        g = gpu_latency(model, input_size, onnx_path, GPU_BATCH_SIZES, runtimes=runtimes, threads=threads, measure=measure,
                        device_name=device_name)
        device = g.device
        notes += [n for n in g.notes if n not in notes]
        entries.append({k: v for k, v in g.to_dict().items() if k != "notes"})  # notes: once, in the latency section
    for n in notes:
        reporter.info(n)
    return entries, {"gpu": {"device": device, "runtimes": runtimes, "batch_sizes": list(GPU_BATCH_SIZES),
                             "timing": "CUDA events after warm-up (torch); I/O binding on the GPU (onnxruntime)"},
                     "gpu_notes": notes}


def _student_entry(teacher: nn.Module, t_onnx: Path, t_spec: ModelSpec, t_top1: float, res: DistilledStudent, cand: Candidate,
                   cfg: Config, method: str, out: Path, threads: int | None, reporter: Reporter):
    onnx_path = res.dir / "student.onnx"
    parity = export_checked(res.model, res.spec, onnx_path)
    reporter.info(f"{cand.name}: exported {onnx_path} (max |ORT - torch| {parity.worst:.1e}, relative {parity.worst_rel:.1e}); "
                  "timing against the teacher")
    speed = compare_latency(teacher, res.model, t_spec.input_size, "ort-cpu", 1, threads, teacher_onnx=t_onnx,
                            student_onnx=onnx_path)
    top1 = res.metrics["top1"]
    entry = StudentEntry(
        name=cand.name, method=method, params=cand.params, gmacs=cand.gmacs, gflops=2 * cand.gmacs, top1=top1,
        top1_delta=top1 - t_top1, param_ratio=cand.param_ratio, mac_ratio=cand.mac_ratio, latency_ms=speed.student_ms,
        latency_speedup=speed.speedup, latency_speedup_spread=list(speed.spread),
        latency_speedup_quartiles=list(speed.quartiles), checkpoint=str((res.dir / "student.pt").relative_to(out)),
        onnx=str(onnx_path.relative_to(out)), onnx_parity_max_abs_diff={str(k): v for k, v in parity.max_abs_diff.items()},
        onnx_parity_max_rel_diff={str(k): v for k, v in parity.max_rel_diff.items()},
        train_seconds=res.metrics.get("train_seconds"), epochs=cfg.train.epochs,
        attention_pairs=res.metrics.get("pairs", []), init=res.metrics.get("init"),
        gmacs_conv_linear=cand.gmacs_conv_linear)
    if res.spec.plan is not None:  # a derived student: its shape and, after a search, target vs achieved
        plan = res.spec.plan
        entry.derived = {"width": plan.width, "removed_blocks": plan.removed_blocks, "stages": plan.stages,
                         "search": {k: v for k, v in (plan.search or {}).items() if k != "trials"} or None}
    return entry, speed


def _int8_entry(t_onnx: Path, res: DistilledStudent, onnx_path: Path, data: ImageData, t_spec: ModelSpec, t_top1: float,
                threads: int | None, out: Path, reporter: Reporter) -> Int8Entry:
    spec = res.spec
    q_path = onnx_path.with_name("student.int8.onnx")
    reporter.info(f"{spec.name}: INT8 static quantization (QDQ, U8 activations, S8 per-channel weights)")
    r = int8_with_evaluation(onnx_path, q_path, data, spec.mean, spec.std, spec.input_size, threads=threads)
    vs_teacher = compare_latency(None, None, t_spec.input_size, "ort-cpu", 1, threads, teacher_onnx=t_onnx, student_onnx=q_path)
    return Int8Entry(path=str(q_path.relative_to(out)), top1_fp32=r.top1_fp32, top1_int8=r.top1_int8, speedup=r.speedup,
                     spread=list(r.spread), fp32_ms=r.fp32_ms, int8_ms=r.int8_ms, calibration_images=r.calibration_images,
                     top1_delta=r.top1_int8 - t_top1, latency_speedup_vs_teacher=vs_teacher.speedup,
                     latency_ms=vs_teacher.student_ms)


def write_report(out_dir: str | Path, report: Report | dict[str, Any]) -> None:
    out_dir = Path(out_dir)
    data = report.to_dict() if isinstance(report, Report) else report
    fileio.write_json(out_dir / "report.json", data)
    fileio.write_text(out_dir / "report.md", markdown(data))
    plot_tradeoff(data, out_dir / "tradeoff.png")


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
