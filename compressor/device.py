"""Where and how the arithmetic runs: the device (``pick_device``), the precision (``Speed``,
``autocast_dtype``), onnxruntime sessions (``ort_session``).

The device rule of the library: a tensor atc makes takes its device from the model or batch it
serves (``model_device``, ``example_input``); export and CPU latency work on CPU copies and never
move the caller's model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from compressor.errors import ConfigError


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Compute with ``threads`` intra-op threads inside the block, then restore the count set before.
    Sums over threads are ordered differently for each count, so a run meant to give the same
    figures on every machine fixes it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def example_input(model: nn.Module, input_size: tuple[int, ...], batch: int = 1) -> torch.Tensor:
    """A zero batch shaped for ``model`` and on its device: what tracing and pairing run on."""
    return torch.zeros(batch, *input_size, device=model_device(model))


def random_input(model: nn.Module, input_size: tuple[int, ...], batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A seeded normal batch on ``model``'s device (drawn on the CPU, so every device sees the same values)."""
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed))
    return x.to(model_device(model))


def cpu_copy(model: nn.Module) -> nn.Module:
    """An fp32, eval-mode copy of ``model`` on the CPU, for export and CPU timing; ``model`` keeps its
    device, dtype and mode. A model on the ``meta`` device has no weights to copy (``ModelError``)."""
    import copy

    from compressor.errors import ModelError

    if model_device(model).type == "meta":
        raise ModelError("the model's weights are on the meta device and hold no values; load real weights before "
                         "exporting or timing it")
    return copy.deepcopy(model).cpu().float().eval()


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"--device {requested!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {requested} asked for but no CUDA device is available; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {requested}: there are only {torch.cuda.device_count()} CUDA devices; use cuda:0 to "
                              f"cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise ConfigError(f"--device {requested!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def autocast(device: torch.device, enabled: bool | torch.dtype | None, cache: bool = True):
    """``enabled``: True = bf16 on CUDA only (fp32 on the CPU), a dtype = autocast to it, False/None = fp32.
    ``cache=False`` drops autocast's weight-cast cache, which CUDA graph capture forbids (each weight
    is cast once per forward either way, so eager results do not change)."""
    if isinstance(enabled, torch.dtype):
        return torch.autocast(device.type, dtype=enabled, cache_enabled=cache)
    if not torch.amp.is_autocast_available(device.type):  # e.g. meta, tests' stand-in for CUDA: fp32 anyway
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(enabled) and device.type == "cuda", cache_enabled=cache)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Speed:
    """How the arithmetic runs; results agree with the plain fp32 loop up to rounding.

    ``precision``: auto = bf16 autocast on CUDA (fp16 with loss scaling where bf16 is missing), fp32
    on the CPU. ``channels_last``: None = on CUDA only. ``compile``: ``torch.compile`` of student and
    teacher, compiled before the first epoch and timed apart. ``workers``: DataLoader processes when
    the data is streamed (None = one per spare core, at most 8). cuDNN autotuning is on for CUDA.
    ``cuda_graphs``: record the whole training step once as a CUDA graph and replay it (None = on with
    CUDA where it applies, see ``compressor.distill.step.graph_capture_applies``; False = eager step).
    """

    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    compile_backend: str = "inductor"
    cudnn_benchmark: bool = True
    workers: int | None = None
    cuda_graphs: bool | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision} is unknown; choose one of {', '.join(PRECISIONS)}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be 0 or more, got {self.workers}")


def channels_last_for(speed: Speed, device: torch.device) -> bool:
    """Whether a run with ``speed`` on ``device`` keeps activations channels_last (None: on CUDA only)."""
    return device.type == "cuda" if speed.channels_last is None else bool(speed.channels_last)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32."""
    cuda = device.type == "cuda"
    bf16_ok = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "auto":
        return (torch.bfloat16 if bf16_ok else torch.float16) if cuda else None
    if precision == "bf16":
        if cuda and not bf16_ok:
            raise ConfigError(f"{torch.cuda.get_device_name(device)} has no bf16; use --precision fp16 (with loss scaling) or fp32")
        return torch.bfloat16
    return torch.float16 if precision == "fp16" else None


ORT_BUILDS = ("onnxruntime", "onnxruntime-gpu")


def threads_note(threads: int | None) -> str | None:
    """A note when more latency threads are asked for than the machine has cores: they take turns
    on the cores, so the figures are those of an oversubscribed machine, not faster ones."""
    import os

    cores = os.cpu_count() or 1
    if threads is None or threads <= cores:
        return None
    return (f"--threads {threads} is more than the {cores} CPU core(s) here: the threads take turns on the cores, so the "
            f"latency is no faster than with --threads {cores} (and noisier)")


def ort_builds_installed() -> list[str]:
    """Which onnxruntime distributions pip has installed (they share one ``onnxruntime/`` folder)."""
    from importlib import metadata

    found = []
    for name in ORT_BUILDS:
        try:
            metadata.version(name)
            found.append(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def onnxruntime():
    """The onnxruntime module, or a one-line error that says how to repair a missing or mixed install:
    the CPU and GPU builds overwrite each other's files, and removing either breaks the other."""
    builds = ort_builds_installed()
    repair = "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'atc[cpu]' (or 'atc[gpu]' on a CUDA machine)"
    if len(builds) > 1:
        raise ConfigError(f"both onnxruntime and onnxruntime-gpu are installed, and they overwrite each other's files; {repair}")
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("onnxruntime is not installed; pip install 'atc[cpu]' (or 'atc[gpu]' on a CUDA machine)") from None
    if not hasattr(ort, "get_available_providers"):
        raise ConfigError(f"the onnxruntime installation is broken (a half-removed CPU or GPU build); {repair}")
    return ort


def ort_session(path: str | Path, threads: int | None = None, providers: list[str] | None = None):
    ort = onnxruntime()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
