"""Parameters, multiply-adds and latency.

FLOP convention: fvcore counts one fused multiply-add as one flop, so its "flops" are MACs.
atc reports them as GMACs and shows GFLOPs = 2 × GMACs beside them where FLOPs are asked for.

Latency: after warm-up, timed runs continue until both a minimum count and a minimum time are
reached; the first (cold) run is kept apart. Teacher/student speed-ups come from interleaved
rounds in one process (same runtime, batch and threads) as the median of per-round ratios, so
machine noise hits both models alike. On CUDA (``torch-cuda``) each run is timed with CUDA events
recorded on the model's device around the forward, after the queue is drained, so the time is
the GPU's and not the launch's.

Device rule: timing never moves the caller's model. The PyTorch runtimes time an eval-mode copy
on the runtime's device (``cpu_copy`` for the CPU); the input is made on that device. The ORT
runtimes time an ONNX file (exported from a CPU copy). ``gpu_latency`` adds the GPU figures that
reports carry when CUDA is present (torch-CUDA at batch 1 and a throughput batch; ORT's CUDA
provider when onnxruntime-gpu is installed) and a one-line note saying what is missing otherwise.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from compressor.device import cpu_copy, onnxruntime, ort_session
from compressor.errors import ConfigError

RUNTIMES = ("ort-cpu", "torch-cpu", "ort-cuda", "torch-cuda")


@dataclass
class Latency:
    runtime: str
    batch_size: int
    threads: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    cold_ms: float
    cv: float  # standard deviation / mean of the timed runs
    runs: int
    images_per_s: float
    providers: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def _summarise(samples: list[float], cold: float, runtime: str, batch: int, threads: int, providers: list[str]) -> Latency:
    arr = np.array(samples) * 1e3
    med = float(np.median(arr))
    cv = float(arr.std() / arr.mean()) if len(arr) > 1 else 0.0
    return Latency(runtime, batch, threads, med, float(np.percentile(arr, 90)), float(np.percentile(arr, 99)),
                   cold * 1e3, cv, len(arr), batch / (med / 1e3), providers)


def time_runs(fn: Callable[[], float], warmup: int = 5, min_runs: int = 20, min_time_s: float = 0.5,
              max_runs: int = 10_000) -> tuple[float, list[float]]:
    """Cold time of the first call, then per-call seconds until both minima are met.

    ``fn`` runs the model once and returns the seconds it took.
    """
    cold = fn()
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - start < min_time_s):
        samples.append(fn())
    return cold, samples


class Runner:
    """One model on one runtime at one batch size, callable for timing."""

    def __init__(self, model: nn.Module, input_size: tuple[int, int, int], runtime: str, batch_size: int,
                 threads: int, onnx_path: Path | None = None):
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime '{runtime}'; choose from {', '.join(RUNTIMES)}")
        self.runtime, self.batch_size, self.threads = runtime, batch_size, threads
        if runtime.startswith("ort"):
            x = torch.randn(batch_size, *input_size)  # fed to onnxruntime as numpy: a CPU tensor
            if runtime == "ort-cuda":
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            else:
                providers = ["CPUExecutionProvider"]
            self.session = ort_session(onnx_path, threads, providers)
            self.providers = self.session.get_providers()
            if runtime == "ort-cuda" and "CUDAExecutionProvider" not in self.providers:
                raise ConfigError("ort-cuda asked for but onnxruntime has no CUDA provider here; install atc[gpu] or use ort-cpu")
            self._setup_ort(x)
        else:
            if runtime == "torch-cuda" and not torch.cuda.is_available():
                raise ConfigError("torch-cuda asked for but no CUDA device is available; use torch-cpu")
            device = torch.device("cuda", torch.cuda.current_device()) if runtime == "torch-cuda" else torch.device("cpu")
            # a copy on the runtime's device: the caller's model keeps its device and mode
            self.model = cpu_copy(model) if device.type == "cpu" else copy.deepcopy(model).eval().to(device)
            self.x, self.device = torch.randn(batch_size, *input_size, device=device), device
            self.providers = [str(device)]

    def _setup_ort(self, x: torch.Tensor) -> None:
        if self.runtime == "ort-cuda":
            # I/O binding keeps input and output on the GPU, so copies are not timed.
            ort = onnxruntime()
            self.binding = self.session.io_binding()
            x_ort = ort.OrtValue.ortvalue_from_numpy(x.numpy(), "cuda", 0)
            self.binding.bind_ortvalue_input(self.session.get_inputs()[0].name, x_ort)
            self.binding.bind_output(self.session.get_outputs()[0].name, "cuda")
        else:
            self.feed = {self.session.get_inputs()[0].name: x.numpy()}

    def __call__(self) -> float:
        """Run once; return seconds (CUDA: measured with events after synchronising)."""
        if self.runtime.startswith("torch") and self.device.type == "cuda":
            with torch.cuda.device(self.device), torch.inference_mode():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(self.device)  # nothing queued before the run is timed with it
                start.record()
                self.model(self.x)
                end.record()
                end.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        if self.runtime == "ort-cpu":
            self.session.run(None, self.feed)
        elif self.runtime == "ort-cuda":
            self.session.run_with_iobinding(self.binding)
        else:
            with torch.inference_mode():
                self.model(self.x)
        return time.perf_counter() - t


@dataclass(frozen=True)
class Timing:
    warmup: int = 5
    min_runs: int = 20
    min_time_s: float = 0.5


def set_threads(threads: int | None) -> int:
    threads = threads or min(os.cpu_count() or 1, 8)
    torch.set_num_threads(threads)
    return threads


def measure_latency(model: nn.Module, input_size: tuple[int, int, int], runtime: str = "ort-cpu", batch_size: int = 1,
                    threads: int | None = None, timing: Timing = Timing(), onnx_path: Path | None = None) -> Latency:
    threads = set_threads(threads)
    with _onnx_for(model, input_size, runtime, onnx_path) as path:
        runner = Runner(model, input_size, runtime, batch_size, threads, path)
        cold, samples = time_runs(runner, timing.warmup, timing.min_runs, timing.min_time_s)
    return _summarise(samples, cold, runtime, batch_size, threads, runner.providers)


class _onnx_for:
    """The model's ONNX file for an ORT runtime: the one given, or a temporary export."""

    def __init__(self, model, input_size, runtime, path):
        self.model, self.input_size, self.runtime, self.path, self._tmp = model, input_size, runtime, path, None

    def __enter__(self) -> Path | None:
        if not self.runtime.startswith("ort") or self.path is not None:
            return self.path
        from compressor.export.onnx import to_onnx

        self._tmp = tempfile.TemporaryDirectory()
        return to_onnx(self.model, self.input_size, Path(self._tmp.name) / "model.onnx")

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


@dataclass
class SpeedUp:
    runtime: str
    batch_size: int
    threads: int
    speedup: float          # median over rounds of teacher_time / student_time
    spread: tuple[float, float]  # min and max of the per-round ratios
    teacher_ms: float
    student_ms: float
    rounds: int
    quartiles: tuple[float, float] = (0.0, 0.0)  # 25th and 75th percentile of the per-round ratios


# A round times each model for at least this long, so that sub-millisecond models are not
# measured on a handful of calls that one scheduler hiccup can dominate.
ROUND_S = 0.02


def compare_latency(teacher: nn.Module, student: nn.Module, input_size: tuple[int, int, int], runtime: str = "ort-cpu",
                    batch_size: int = 1, threads: int | None = None, rounds: int = 15, runs_per_round: int = 10,
                    teacher_onnx: Path | None = None, student_onnx: Path | None = None) -> SpeedUp:
    """Interleaved timing (teacher, student, teacher, …) in this process; speed-up = median per-round ratio.

    ``runs_per_round`` is a minimum: fast models get more runs, up to ``ROUND_S`` seconds a round."""
    threads = set_threads(threads)
    with _onnx_for(teacher, input_size, runtime, teacher_onnx) as tp, _onnx_for(student, input_size, runtime, student_onnx) as sp:
        runners = [Runner(teacher, input_size, runtime, batch_size, threads, tp), Runner(student, input_size, runtime, batch_size, threads, sp)]
        fastest = min(statistics.median(time_runs(r, warmup=5, min_runs=5, min_time_s=0)[1]) for r in runners)
        runs = min(max(runs_per_round, math.ceil(ROUND_S / max(fastest, 1e-6))), 500)
        t_med, s_med = [], []
        for _ in range(rounds):
            for runner, out in zip(runners, (t_med, s_med)):
                out.append(statistics.median(runner() for _ in range(runs)))
    ratios = [t / s for t, s in zip(t_med, s_med)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return SpeedUp(runtime, batch_size, threads, statistics.median(ratios), (min(ratios), max(ratios)),
                   statistics.median(t_med) * 1e3, statistics.median(s_med) * 1e3, rounds, (q[0], q[2]))


GPU_BATCH_SIZES = (1, 256)  # latency at batch 1 and a throughput batch


def ort_cuda_available() -> bool:
    """True when onnxruntime can run on CUDA (the onnxruntime-gpu package is installed)."""
    return "CUDAExecutionProvider" in onnxruntime().get_available_providers()


@dataclass
class GpuLatency:
    """GPU timings of one model: ``runs`` holds one ``Latency`` per runtime and batch size."""

    device: str
    runs: list[Latency]
    notes: list[str]

    def to_dict(self) -> dict:
        return {"device": self.device, "runs": [r.to_dict() for r in self.runs], "notes": list(self.notes)}


def gpu_status(cuda: bool | None = None, ort_cuda: bool | None = None) -> tuple[list[str], list[str]]:
    """The GPU runtimes to time here and one-line notes for those that cannot be: ``(runtimes, notes)``.
    ``cuda``/``ort_cuda`` override what is detected (tests inject them)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return [], ["no GPU latency: PyTorch sees no CUDA device (CPU figures only)"]
    ort_cuda = ort_cuda_available() if ort_cuda is None else ort_cuda
    if ort_cuda:
        return ["torch-cuda", "ort-cuda"], []
    return ["torch-cuda"], ["no onnxruntime CUDA latency: onnxruntime has no CUDAExecutionProvider here "
                            "(pip install onnxruntime-gpu, or atc[gpu])"]


def gpu_latency(model: nn.Module, input_size: tuple[int, int, int], onnx_path: Path | None = None,
                batch_sizes: tuple[int, ...] = GPU_BATCH_SIZES, timing: Timing = Timing(min_time_s=0.5), *,
                runtimes: list[str] | None = None, threads: int | None = None,
                measure: Callable[..., Latency] | None = None, device_name: str | None = None) -> GpuLatency:
    """Time ``model`` on each GPU runtime (``gpu_status``'s, unless ``runtimes`` is given) at each batch size.

    A batch that does not fit in GPU memory is left out with a note. ``measure`` replaces
    ``measure_latency`` (tests pass a fake timer; ``device_name`` then names the fake device)."""
    notes: list[str] = []
    if runtimes is None:
        runtimes, notes = gpu_status()
    measure = measure or measure_latency
    runs: list[Latency] = []
    for rt in runtimes:
        for bs in batch_sizes:
            try:
                runs.append(measure(model, input_size, rt, bs, threads, timing, onnx_path if rt.startswith("ort") else None))
            except torch.cuda.OutOfMemoryError:
                notes.append(f"{rt} at batch {bs}: out of GPU memory, not timed")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    if device_name is None:
        device_name = torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else "cuda"
    return GpuLatency(device_name, runs, notes)


def environment() -> dict[str, str | int | None]:

    try:
        import fvcore
        fv = getattr(fvcore, "__version__", "unknown")
    except ImportError:  # pragma: no cover - fvcore is a hard dependency
        fv = None
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime().__version__,
        "fvcore": fv, "platform": platform.platform(),
    }
