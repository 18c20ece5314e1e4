"""Parameters, multiply-adds and latency.

FLOP convention: fvcore counts one fused multiply-add as one flop, so its "flops" are MACs.
atc reports them as GMACs and shows GFLOPs = 2 × GMACs beside them where FLOPs are asked for.

Latency: after warm-up, timed runs continue until both a minimum count and a minimum time are
reached; the first (cold) run is kept apart. Teacher/student speed-ups come from interleaved
rounds in one process (same runtime, batch and threads) as the median of per-round ratios, so
machine noise hits both models alike.
"""

from __future__ import annotations

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
        x = torch.randn(batch_size, *input_size)
        if runtime.startswith("ort"):
            from compressor.device import ort_session

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
            device = torch.device("cuda" if runtime == "torch-cuda" else "cpu")
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ConfigError("torch-cuda asked for but no CUDA device is available; use torch-cpu")
            self.model, self.x, self.device = model.eval().to(device), x.to(device), device
            self.providers = [device.type]

    def _setup_ort(self, x: torch.Tensor) -> None:
        if self.runtime == "ort-cuda":
            # I/O binding keeps input and output on the GPU, so copies are not timed.
            import onnxruntime as ort

            self.binding = self.session.io_binding()
            x_ort = ort.OrtValue.ortvalue_from_numpy(x.numpy(), "cuda", 0)
            self.binding.bind_ortvalue_input(self.session.get_inputs()[0].name, x_ort)
            self.binding.bind_output(self.session.get_outputs()[0].name, "cuda")
        else:
            self.feed = {self.session.get_inputs()[0].name: x.numpy()}

    def __call__(self) -> float:
        """Run once; return seconds (CUDA: measured with events after synchronising)."""
        if self.runtime.startswith("torch") and self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.inference_mode():
                torch.cuda.synchronize()
                start.record()
                self.model(self.x)
                end.record()
                torch.cuda.synchronize()
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


def environment() -> dict[str, str | int | None]:
    import onnxruntime

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
        "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "fvcore": fv, "platform": platform.platform(),
    }
