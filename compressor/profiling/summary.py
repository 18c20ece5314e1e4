"""One model's profile: parameters, fvcore GMACs (and GFLOPs = 2 x GMACs) and latency on each
runtime and batch size asked for — the data behind ``atc profile``.

With CUDA present (and no CUDA runtime asked for explicitly) the profile also holds
``gpu_latency``: torch-CUDA latency at batch 1 and a throughput batch, and onnxruntime's CUDA
provider when onnxruntime-gpu is installed (``latency.gpu_latency``); ``gpu_notes`` says what is
missing and why. Counting and timing leave the caller's model where it is.

An ONNX file (``profile_onnx``, e.g. the ``student.int8.onnx`` atc writes) is timed with onnxruntime
alone; its parameters are the elements of its weight tensors, and it has no fvcore count (fvcore
counts PyTorch modules), so ``gmacs`` is None there."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from compressor.device import threads_note
from compressor.errors import ConfigError
from compressor.profiling.counts import MAC_UNIT, count_macs, count_params
from compressor.profiling.latency import GPU_BATCH_SIZES, Latency, Timing, environment, gpu_latency, gpu_status, measure_latency


@dataclass
class Profile:
    model: str
    input_size: list[int]
    params: dict[str, int]
    gmacs: float | None  # None for an ONNX file
    gflops: float | None
    skipped_ops: dict[str, int]
    latency: list[Latency]
    mac_unit: str = MAC_UNIT
    environment: dict[str, Any] = field(default_factory=environment)
    by_module_gmacs: dict[str, float] | None = None
    gpu_latency: dict[str, Any] | None = None  # GpuLatency.to_dict() without its notes; with CUDA only
    gpu_notes: list[str] = field(default_factory=list)
    gmacs_conv_linear: float = 0.0  # convolutions and matrix products alone, as torchvision counts
    notes: list[str] = field(default_factory=list)  # about the timing conditions (e.g. more threads than cores)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("by_module_gmacs", "gpu_latency"):
            if d[key] is None:
                del d[key]
        return d


def profile_model(model: nn.Module, name: str, input_size: tuple[int, int, int], runtimes: Sequence[str] = ("ort-cpu", "torch-cpu"),
                  batch_sizes: Sequence[int] = (1,), threads: int | None = None, min_time_s: float = 1.0,
                  module_depth: int | None = None, *, gpu: bool | None = None, ort_cuda: bool | None = None,
                  measure: Callable[..., Latency] | None = None, device_name: str | None = None) -> Profile:
    """Count and time ``model``; ``module_depth`` also keeps GMACs per module down to that depth.

    ``gpu`` (None: detect CUDA) adds the GPU timings, at ``GPU_BATCH_SIZES``; ``ort_cuda``, ``measure`` and ``device_name``
    stand in for the machine in tests."""
    macs = count_macs(model, input_size)
    measure = measure or measure_latency
    lat = [measure(model, input_size, rt, bs, threads, Timing(min_time_s=min_time_s)) for rt in runtimes for bs in batch_sizes]
    by_module = None if module_depth is None else {k: v for k, v in macs.by_module.items() if k.count(".") < module_depth}
    gpu_entry, notes = None, []
    if not any(rt.endswith("cuda") for rt in runtimes):  # CUDA runtimes asked for by name are in ``latency`` already
        gpu_runtimes, notes = gpu_status(gpu, ort_cuda)
        if gpu_runtimes:
            g = gpu_latency(model, input_size, None, GPU_BATCH_SIZES, Timing(min_time_s=min_time_s), runtimes=gpu_runtimes,
                            threads=threads, measure=measure, device_name=device_name)
            gpu_entry, notes = {"device": g.device, "runs": [r.to_dict() for r in g.runs]}, notes + g.notes
    return Profile(name, list(input_size), count_params(model), macs.gmacs, macs.gflops, macs.skipped_ops, lat,
                   by_module_gmacs=by_module, gpu_latency=gpu_entry, gpu_notes=notes, gmacs_conv_linear=macs.conv_linear_gmacs,
                   notes=[n for n in [threads_note(threads)] if n])


def onnx_input_size(model) -> tuple[int, int, int] | None:
    """C×H×W of an ONNX model: atc's metadata, else the first input's static shape (None when not fixed)."""
    import json

    meta = {p.key: p.value for p in model.metadata_props}
    if "atc.input_size" in meta:
        return tuple(json.loads(meta["atc.input_size"]))  # type: ignore[return-value]
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in model.graph.input[0].type.tensor_type.shape.dim]
    return tuple(dims[1:]) if len(dims) == 4 and all(dims[1:]) else None  # type: ignore[return-value]


def profile_onnx(path: str | Path, runtimes: Sequence[str] = ("ort-cpu",), batch_sizes: Sequence[int] = (1,),
                 threads: int | None = None, min_time_s: float = 1.0, input_size: tuple[int, int, int] | None = None,
                 *, measure: Callable[..., Latency] | None = None) -> Profile:
    """An ONNX file's profile: the elements of its stored tensors (``params["total"]``: weights, biases and, in an
    INT8 file, its scales and zero points) and its onnxruntime latency (no fvcore count)."""
    import onnx
    from onnx import numpy_helper

    ort_runtimes = [rt for rt in runtimes if rt.startswith("ort")]
    if not ort_runtimes:
        raise ConfigError(f"{path} is an ONNX file, which atc times with onnxruntime only; pass --runtimes ort-cpu (or ort-cuda)")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for a damaged file
        raise ConfigError(f"{path} is not a readable ONNX file ({type(exc).__name__}); export it again") from None
    size = tuple(input_size) if input_size else onnx_input_size(model)
    if size is None:
        raise ConfigError(f"{path} does not say its input size; pass --input-size, e.g. 3x32x32")
    total = sum(int(numpy_helper.to_array(t).size) for t in model.graph.initializer)  # weights, biases and (INT8) scales
    measure = measure or measure_latency
    lat = [measure(None, size, rt, bs, threads, Timing(min_time_s=min_time_s), Path(path)) for rt in ort_runtimes for bs in batch_sizes]
    notes = [f"{', '.join(rt for rt in runtimes if not rt.startswith('ort'))} left out: an ONNX file runs in onnxruntime"] \
        if len(ort_runtimes) < len(runtimes) else []
    return Profile(Path(path).name, list(size), {"total": total}, None, None, {}, lat,
                   mac_unit="not counted: fvcore counts PyTorch modules, not ONNX graphs", gpu_notes=notes)
