"""The typed entries of a compress run's measurements, one per model: what the measure step
(``compressor.measure``) produces and the report (``compressor.report``) renders. Plain data: this
module imports nothing that trains, exports or times."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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
    weights: str | None = None  # "S8 8-bit" or "S8 7-bit (reduce_range)", chosen for this CPU
    weights_why: str | None = None
    agreement: dict[str, Any] | None = None  # {"agree", "images"}: onnxruntime's top-1 = the QDQ graph's (reference evaluator)


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
    latency_ms: float  # median of the interleaved rounds
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
    distill: dict[str, Any] | None = None  # how it was trained: {"cuda_graphs": GraphStatus.to_dict()}
    loss_terms: dict[str, float] | None = None  # the last epoch's training mean of each weighted loss term, by name
    hint: str | None = None  # FitNet: the hint pair and its regressor (trained with the student, not part of it)
    latency_cv: float | None = None  # the student's coefficient of variation over all its timed runs
    teacher_latency_cv: float | None = None  # the teacher's, in the same interleaved rounds

    def to_dict(self) -> dict[str, Any]:
        return _without_none(asdict(self), ("derived", "int8", "gpu_latency", "distill", "loss_terms", "hint"))


@dataclass
class TeacherEntry:
    name: str
    params: int
    gmacs: float
    gflops: float
    top1: float
    latency_ms: float  # interleaved with the (last) student, like the students' figures
    gpu_latency: dict[str, Any] | None = None  # GpuLatency.to_dict(), with CUDA only
    gmacs_conv_linear: float | None = None  # convolutions and matrix products alone (torchvision's convention)
    latency_cv: float | None = None  # over all its timed runs in those rounds

    def to_dict(self) -> dict[str, Any]:
        return _without_none(asdict(self), ("gpu_latency",))


@dataclass
class Measurements:
    """What the measure step found: one entry per model, the latency section of the report (runtime,
    batch size, threads, rounds, the teacher timed alone, the load average and cores, notes, and the
    GPU keys) and the machine."""

    teacher: TeacherEntry
    students: list[StudentEntry]
    latency: dict[str, Any]
    environment: dict[str, Any]
