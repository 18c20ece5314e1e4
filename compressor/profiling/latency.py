"""Parameters, multiply-adds and latency.

FLOP convention: fvcore counts one fused multiply-add as one flop, so its "flops" are MACs.
atc reports them as GMACs and shows GFLOPs = 2 × GMACs beside them where FLOPs are asked for.

Latency: after warm-up, timed runs continue until both a minimum count and a minimum time are
reached; the first (cold) run is kept apart. Teacher/student speed-ups come from interleaved
rounds in one process (same runtime, batch and threads) as the median of per-round ratios, so
machine noise hits both models alike. Each model's coefficient of variation (CV) over all its
timed runs is kept beside the figure, and the load average is read before and after: a machine
whose load exceeds its cores biases every round alike, which no spread of ratios can show
(``load_note``). One thread by default (``DEFAULT_THREADS``): the figure then does not depend on
how many cores the machine has or how many other jobs share them; ``threads`` asks for more.
torch's own thread count is restored after timing, so training that follows is not slowed.

Device rule: timing never moves the caller's model. The PyTorch runtimes time an eval-mode copy
on the runtime's device (``cpu_copy`` for the CPU); the input is made on that device. The ORT
runtimes time an ONNX file (exported from a CPU copy).

GPU latency as a deployer would see it (``gpu_latency``, what reports carry when CUDA is present):
PyTorch at the precision and memory format the model was trained with (``GpuFormat``: bf16
autocast and channels_last when the run used them), at batch 1 and a throughput batch, in two
forms, each labelled: ``torch-cuda``, the eager forward as a script calls it (CUDA events around one
call after the queue is drained: at batch 1 a small model's time is mostly its kernel launches),
and ``torch-cuda-graph``, the same forward captured once as a CUDA graph and replayed (the
launch-free figure). onnxruntime's CUDA provider is timed only when it truly loads: a one-op model
must run on it (``ort_cuda_status``); otherwise a note says why. A GPU runtime that fails to time
(out of memory, a model that cannot be captured, a provider that breaks) becomes a note, never an
exception after training.
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

from compressor.device import Speed, autocast, autocast_dtype, channels_last_for, cpu_copy, onnxruntime, ort_session, torch_threads
from compressor.errors import ConfigError

RUNTIMES = ("ort-cpu", "torch-cpu", "ort-cuda", "torch-cuda", "torch-cuda-graph")
GRAPH_WARMUP = 3  # eager forwards on a side stream before capture (cuDNN picks its kernels there)


@dataclass(frozen=True)
class GpuFormat:
    """The arithmetic a GPU timing uses: the trained run's precision (fp32, bf16, fp16) and memory format."""

    precision: str = "fp32"
    channels_last: bool = False

    @classmethod
    def of_run(cls, amp: torch.dtype | None, channels_last: bool) -> "GpuFormat":
        return cls({torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, "fp32"), bool(channels_last))  # type: ignore[arg-type]

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"


def trained_format(speed: Speed) -> GpuFormat:
    """The arithmetic a CUDA run with ``speed`` trains in (autocast dtype, memory format): what its
    models are timed in on the GPU. Needs CUDA (bf16 support is asked of the device)."""
    cuda = torch.device("cuda", torch.cuda.current_device())
    return GpuFormat.of_run(autocast_dtype(speed.precision, cuda), channels_last_for(speed, cuda))


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
    precision: str = "fp32"  # the arithmetic timed (PyTorch runtimes; onnxruntime runs the fp32 ONNX file)
    memory_format: str = "contiguous"
    label: str = ""  # what the figure is, for tables

    def to_dict(self) -> dict:
        return asdict(self)


LABELS = {"torch-cuda": "eager forward, launches included", "torch-cuda-graph": "CUDA graph replay, launch-free",
          "ort-cuda": "onnxruntime CUDA provider, I/O on the GPU"}


def _summarise(samples: list[float], cold: float, runtime: str, batch: int, threads: int, providers: list[str],
               fmt: GpuFormat | None = None) -> Latency:
    arr = np.array(samples) * 1e3
    med = float(np.median(arr))
    cv = float(arr.std() / arr.mean()) if len(arr) > 1 else 0.0
    torch_gpu = fmt is not None and runtime.startswith("torch-cuda")
    return Latency(runtime, batch, threads, med, float(np.percentile(arr, 90)), float(np.percentile(arr, 99)),
                   cold * 1e3, cv, len(arr), batch / (med / 1e3), providers,
                   fmt.precision if torch_gpu else "fp32", fmt.memory_format if torch_gpu else "contiguous",
                   LABELS.get(runtime, ""))


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
    """One model on one runtime at one batch size, callable for timing. ``fmt``: the precision and memory
    format of the PyTorch CUDA runtimes; ``device``: where they run (the current CUDA device; tests on
    the CPU pass one with a fake of torch.cuda)."""

    def __init__(self, model: nn.Module, input_size: tuple[int, int, int], runtime: str, batch_size: int,
                 threads: int, onnx_path: Path | None = None, fmt: GpuFormat = GpuFormat(),
                 device: torch.device | None = None):
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
        self.runtime, self.batch_size, self.threads, self.fmt = runtime, batch_size, threads, fmt
        self.graph = None
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
        elif runtime == "torch-cpu":
            self.model, self.device = cpu_copy(model), torch.device("cpu")  # the caller's model keeps its device and mode
            self.x, self.providers = torch.randn(batch_size, *input_size), ["cpu"]
        else:
            if device is None and not torch.cuda.is_available():
                raise ConfigError(f"{runtime} asked for but no CUDA device is available; use torch-cpu")
            self.device = device or torch.device("cuda", torch.cuda.current_device())
            mf = torch.channels_last if fmt.channels_last else torch.contiguous_format
            self.model = copy.deepcopy(model).eval().to(self.device, memory_format=mf)  # a copy: the caller's model stays
            self.x = torch.randn(batch_size, *input_size, device=self.device).contiguous(memory_format=mf)
            self.providers = [str(self.device)]
            if runtime == "torch-cuda-graph":
                self._capture()

    def _forward(self):
        with torch.inference_mode(), autocast(self.device, self.fmt.dtype, cache=False):
            return self.model(self.x)

    def _capture(self) -> None:
        """Warm up on a side stream, then record one forward as a CUDA graph (replayed by ``__call__``)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP):
                self._forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):
            self.out = self._forward()  # static output: each replay writes it

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
        """Run once; return seconds (PyTorch on CUDA: CUDA events around one call, after draining the queue)."""
        if self.runtime.startswith("torch-cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)  # nothing queued before the run is timed with it
            start.record()
            if self.graph is not None:
                self.graph.replay()
            else:
                self._forward()
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


DEFAULT_THREADS = 1  # the one default of every latency figure (compress, demo, profile, search, INT8)


def timing_threads(threads: int | None) -> int:
    """The thread count a measurement uses: ``threads``, or ``DEFAULT_THREADS``."""
    return threads or DEFAULT_THREADS


def measure_latency(model: nn.Module, input_size: tuple[int, int, int], runtime: str = "ort-cpu", batch_size: int = 1,
                    threads: int | None = None, timing: Timing = Timing(), onnx_path: Path | None = None,
                    fmt: GpuFormat = GpuFormat(), device: torch.device | None = None) -> Latency:
    """``fmt`` and ``device`` apply to the PyTorch CUDA runtimes (see ``Runner``)."""
    threads = timing_threads(threads)
    with torch_threads(threads), _onnx_for(model, input_size, runtime, onnx_path) as path:
        runner = Runner(model, input_size, runtime, batch_size, threads, path, fmt, device)
        cold, samples = time_runs(runner, timing.warmup, timing.min_runs, timing.min_time_s)
    return _summarise(samples, cold, runtime, batch_size, threads, runner.providers, fmt)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it, else the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def load_note(loads: tuple[float | None, ...], cores: int) -> str:
    """One line when the load average exceeded the cores while timing (empty otherwise): every model was
    then slowed, by different amounts, and the interleaved ratios can agree with each other and still be biased."""
    seen = [x for x in loads if x is not None]
    if not seen or max(seen) <= cores:
        return ""
    return (f"the load average reached {max(seen):.1f} on {cores} core{'s' if cores != 1 else ''} while timing: other work "
            "shared the CPU, so latencies and speed-ups may be biased even where the rounds agree; measure again on an "
            "idle machine")


def cv(samples: list[float]) -> float:
    """Standard deviation / mean (0 for fewer than two samples)."""
    return statistics.pstdev(samples) / statistics.fmean(samples) if len(samples) > 1 and statistics.fmean(samples) > 0 else 0.0


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
    teacher_cv: float = 0.0  # over every timed run of the teacher in all rounds
    student_cv: float = 0.0
    load: tuple[float | None, float | None] = (None, None)  # 1-minute load average before and after
    cores: int = 0  # usable cores when measured

    @property
    def load_note(self) -> str:
        return load_note(self.load, self.cores)


# A round times each model for at least this long, so that sub-millisecond models are not
# measured on a handful of calls that one scheduler hiccup can dominate.
ROUND_S = 0.02


def compare_latency(teacher: nn.Module, student: nn.Module, input_size: tuple[int, int, int], runtime: str = "ort-cpu",
                    batch_size: int = 1, threads: int | None = None, rounds: int = 15, runs_per_round: int = 10,
                    teacher_onnx: Path | None = None, student_onnx: Path | None = None) -> SpeedUp:
    """Interleaved timing (teacher, student, teacher, …) in this process; speed-up = median per-round ratio.

    ``runs_per_round`` is a minimum: fast models get more runs, up to ``ROUND_S`` seconds a round."""
    threads = timing_threads(threads)
    before = load_average()
    with torch_threads(threads), _onnx_for(teacher, input_size, runtime, teacher_onnx) as tp, \
            _onnx_for(student, input_size, runtime, student_onnx) as sp:
        runners = [Runner(teacher, input_size, runtime, batch_size, threads, tp), Runner(student, input_size, runtime, batch_size, threads, sp)]
        fastest = min(statistics.median(time_runs(r, warmup=5, min_runs=5, min_time_s=0)[1]) for r in runners)
        runs = min(max(runs_per_round, math.ceil(ROUND_S / max(fastest, 1e-6))), 500)
        t_all: list[list[float]] = []
        s_all: list[list[float]] = []
        for _ in range(rounds):
            for runner, out in zip(runners, (t_all, s_all)):
                out.append([runner() for _ in range(runs)])
    t_med, s_med = [statistics.median(r) for r in t_all], [statistics.median(r) for r in s_all]
    ratios = [t / s for t, s in zip(t_med, s_med)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return SpeedUp(runtime, batch_size, threads, statistics.median(ratios), (min(ratios), max(ratios)),
                   statistics.median(t_med) * 1e3, statistics.median(s_med) * 1e3, rounds, (q[0], q[2]),
                   cv([x for r in t_all for x in r]), cv([x for r in s_all for x in r]), (before, load_average()), usable_cores())


GPU_BATCH_SIZES = (1, 256)  # latency at batch 1 and a throughput batch


ORT_CUDA_MISSING = ("no onnxruntime CUDA latency: onnxruntime has no CUDAExecutionProvider here "
                    "(pip install onnxruntime-gpu, or atc[gpu])")


def ort_cuda_status() -> tuple[bool, str]:
    """Whether onnxruntime's CUDA provider truly runs here, and if not, the one-line note why. Listing the
    provider is not enough (onnxruntime-gpu lists it when its CUDA or cuDNN libraries cannot load, and
    then falls back to the CPU): a one-op model must run with the CUDA provider active. Checked once."""
    if _ORT_CUDA:
        return _ORT_CUDA[0]
    try:
        ort = onnxruntime()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            result = (False, ORT_CUDA_MISSING)
        else:
            result = _one_op_on_cuda(ort)
    except Exception as exc:  # a broken install: a note, not a failure of the report
        result = (False, f"no onnxruntime CUDA latency: {_first_line(exc)}")
    _ORT_CUDA.append(result)
    return result


_ORT_CUDA: list[tuple[bool, str]] = []


def _one_op_on_cuda(ort) -> tuple[bool, str]:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    listed = "onnxruntime lists CUDAExecutionProvider but"
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        session = ort.InferenceSession(model.SerializeToString(),
                                       opts, providers=["CUDAExecutionProvider"])
        if "CUDAExecutionProvider" not in session.get_providers():
            return False, (f"no onnxruntime CUDA latency: {listed} a session fell back to {', '.join(session.get_providers())} "
                           "(its CUDA or cuDNN libraries did not load; match onnxruntime-gpu to the CUDA version)")
        out = session.run(None, {"x": np.array([[-1.0, 0.0, 1.0, 2.0]], dtype=np.float32)})[0]
    except Exception as exc:
        return False, f"no onnxruntime CUDA latency: {listed} a one-op model does not run on it ({_first_line(exc)})"
    if not np.array_equal(out, np.array([[0.0, 0.0, 1.0, 2.0]], dtype=np.float32)):
        return False, f"no onnxruntime CUDA latency: {listed} a one-op model computed a wrong result on it"
    return True, ""


def ort_cuda_available() -> bool:
    """True when onnxruntime truly runs on CUDA here (``ort_cuda_status``)."""
    return ort_cuda_status()[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


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
    ``cuda``/``ort_cuda`` override what is detected (tests inject them; ``ort_cuda`` stands for "the
    provider truly runs")."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return [], ["no GPU latency: PyTorch sees no CUDA device (CPU figures only)"]
    ok, why = ort_cuda_status() if ort_cuda is None else (ort_cuda, "" if ort_cuda else ORT_CUDA_MISSING)
    return (["torch-cuda", "torch-cuda-graph", "ort-cuda"], []) if ok else (["torch-cuda", "torch-cuda-graph"], [why])


def gpu_latency(model: nn.Module, input_size: tuple[int, int, int], onnx_path: Path | None = None,
                batch_sizes: tuple[int, ...] = GPU_BATCH_SIZES, timing: Timing = Timing(min_time_s=0.5), *,
                runtimes: list[str] | None = None, threads: int | None = None,
                measure: Callable[..., Latency] | None = None, device_name: str | None = None,
                fmt: GpuFormat = GpuFormat()) -> GpuLatency:
    """Time ``model`` on each GPU runtime (``gpu_status``'s, unless ``runtimes`` is given) at each batch size,
    the PyTorch ones in ``fmt`` (the trained run's precision and memory format).

    A run that cannot be timed (out of GPU memory, a model that cannot be captured, a provider that
    fails) is left out with a one-line note. ``measure`` replaces ``measure_latency`` (tests pass a fake
    timer; ``device_name`` then names the fake device)."""
    notes: list[str] = []
    if runtimes is None:
        runtimes, notes = gpu_status()
    measure = measure or measure_latency
    runs: list[Latency] = []
    for rt in runtimes:
        for bs in batch_sizes:
            try:
                runs.append(measure(model, input_size, rt, bs, threads, timing, onnx_path if rt.startswith("ort") else None,
                                    fmt=fmt))
            except torch.cuda.OutOfMemoryError:
                notes.append(f"{rt} at batch {bs}: out of GPU memory, not timed")
                _empty_cache()
            except Exception as exc:  # the report step never fails after training for a timing
                notes.append(f"{rt} at batch {bs}: not timed ({_first_line(exc)})")
                _empty_cache()
    if device_name is None:
        device_name = torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else "cuda"
    return GpuLatency(device_name, runs, notes)


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
