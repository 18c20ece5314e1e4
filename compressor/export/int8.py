"""INT8 export: static QDQ quantization in onnxruntime (U8 activations, S8 per-channel weights,
calibrated on training images), then top-1 and latency against the FP32 file, and the top-1
agreement of onnxruntime's INT8 run with the QDQ graph itself.

Why the agreement: on x86 CPUs without VNNI, onnxruntime's U8S8 convolution kernels multiply
pairs of 8-bit values into 16-bit sums that can saturate, so the INT8 model computes something
other than its graph says (seen on MNIST: top-1 agreement with onnx's reference evaluator 1,784 of
2,004 images with graph optimisations on, all 2,004 with them off). There atc quantizes the
weights to 7 bits (``reduce_range``, onnxruntime's advice for such CPUs), which leaves room in
the sums; with VNNI the full 8 bits. ``int8_weights`` makes that choice from ``/proc/cpuinfo``
(tests pass the flags); the result says which was used and why. The agreement is measured with
``onnx.reference.ReferenceEvaluator`` (plain NumPy, the graph's meaning, slow) on a sample of test
images spread over the test set, as many as fit a time budget of a few seconds.

Device rule: everything here runs in onnxruntime on CPU arrays made from the uint8 images; no torch
model is touched, so none is moved."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from compressor import fileio
from compressor.evaluate import normalized_images, onnx_top1
from compressor.events import SILENT, Reporter
from compressor.export.onnx import EXPORT_LOGGERS, INPUT_NAME
from compressor.quiet import quiet

VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``), or None where they cannot be read."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class Int8Weights:
    """How the weights are quantized on this machine, and why."""

    reduce_range: bool  # True: 7-bit weights (onnxruntime's reduce_range), False: the full 8 bits
    why: str

    @property
    def label(self) -> str:
        return "S8 7-bit (reduce_range)" if self.reduce_range else "S8 8-bit"


def int8_weights(flags: set[str] | None | str = "detect", machine: str | None = None) -> Int8Weights:
    """7-bit weights on x86 CPUs without VNNI (or whose flags cannot be read), 8-bit otherwise.
    ``flags``/``machine`` stand in for ``cpu_flags()``/``platform.machine()`` (tests)."""
    machine = (machine or platform.machine()).lower()
    if machine not in X86:
        return Int8Weights(False, f"8-bit weights: {machine} is not an x86 CPU, whose non-VNNI kernels saturate")
    flags = cpu_flags() if flags == "detect" else flags
    if flags is None:
        return Int8Weights(True, "7-bit weights (reduce_range): the CPU's flags cannot be read, and x86 CPUs without VNNI "
                                 "saturate 8-bit products")
    found = [f for f in VNNI_FLAGS if f in flags]  # type: ignore[operator]
    if found:
        return Int8Weights(False, f"8-bit weights: this CPU has VNNI ({', '.join(found)})")
    return Int8Weights(True, "7-bit weights (reduce_range): this x86 CPU has no VNNI (avx512_vnni/avx_vnni), where "
                             "onnxruntime's U8S8 kernels can saturate 8-bit products")


def quantize_int8(fp32_path: str | Path, out: str | Path, calibration: np.ndarray, per_channel: bool = True,
                  reduce_range: bool = False) -> Path:
    """Static QDQ quantization: uint8 activations, int8 (per-channel) weights, calibrated on ``calibration``;
    ``reduce_range`` quantizes the weights to 7 bits."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{INPUT_NAME: calibration[i:i + 32]} for i in range(0, len(calibration), 32)])

        def get_next(self):
            return next(self._batches, None)

    out = Path(out)
    with fileio.scratch_dir() as scratch, fileio.atomic_path(out, suffix=".onnx") as tmp:
        prepared = scratch / "prepared.onnx"
        with quiet(EXPORT_LOGGERS):
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=per_channel, reduce_range=reduce_range)
    return out


@dataclass(frozen=True)
class Agreement:
    """Top-1 agreement of onnxruntime's INT8 run with the QDQ graph (onnx's reference evaluator)."""

    agree: int
    images: int
    seconds: float

    @property
    def exact(self) -> bool:
        return self.agree == self.images


AGREEMENT_BUDGET_S = 3.0  # reference-evaluator seconds; ~250 CIFAR images of a WRN-16-1, ~50 of a WRN-16-2
AGREEMENT_MAX_IMAGES = 256
AGREEMENT_BATCH = 16


def spread_indices(n_total: int, n: int) -> np.ndarray:
    """``n`` indices spread evenly over ``range(n_total)`` (test sets are often sorted by class)."""
    return np.unique(np.linspace(0, n_total - 1, max(1, min(n, n_total))).round().astype(int))


def qdq_agreement(int8_path: str | Path, x: np.ndarray, threads: int | None = None, budget_s: float = AGREEMENT_BUDGET_S,
                  max_images: int = AGREEMENT_MAX_IMAGES, batch: int = AGREEMENT_BATCH) -> Agreement:
    """On images spread over ``x``, batch by batch until ``max_images`` or ``budget_s`` seconds of the
    reference evaluator (one batch at least): how often onnxruntime's top-1 equals the graph's."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    from compressor.device import ort_session

    sess = ort_session(int8_path, threads)
    name = sess.get_inputs()[0].name
    ref = ReferenceEvaluator(onnx.load(str(int8_path)))
    order = spread_indices(len(x), max_images)
    agree = seen = 0
    start = time.perf_counter()
    for lo in range(0, len(order), batch):
        xb = x[order[lo:lo + batch]]
        agree += int((sess.run(None, {name: xb})[0].argmax(1) == ref.run(None, {name: xb})[0].argmax(1)).sum())
        seen += len(xb)
        if time.perf_counter() - start > budget_s:
            break
    return Agreement(agree, seen, time.perf_counter() - start)


@dataclass
class Int8Result:
    path: Path
    top1_fp32: float
    top1_int8: float
    speedup: float              # FP32 ORT time / INT8 ORT time, median of interleaved rounds
    spread: tuple[float, float]
    fp32_ms: float
    int8_ms: float
    calibration_images: int
    weights: Int8Weights | None = None
    agreement: Agreement | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["spread"] = list(self.spread)
        return d

    def notes(self) -> list[str]:
        """What the INT8 figures mean here: the weights' range, and a warning when onnxruntime on this CPU
        does not compute what the graph says."""
        out = [self.weights.why] if self.weights else []
        a = self.agreement
        if a is not None and not a.exact:
            out.append(f"onnxruntime's INT8 top-1 differs from the QDQ graph's on {a.images - a.agree} of {a.images} test "
                       "images: the INT8 accuracy is this CPU's, not the model's (see docs on VNNI and reduce_range)")
        return out


def int8_with_evaluation(fp32_path: str | Path, out: str | Path, data, mean, std, input_size, calib_images: int = 256,
                         threads: int | None = None, seed: int = 0, weights: Int8Weights | None = None, *,
                         reporter: Reporter = SILENT) -> Int8Result:
    """Quantize on ``calib_images`` training images (weights: ``int8_weights()`` unless given), then measure
    top-1 and speed against the FP32 file and the agreement with the QDQ graph; ``reporter`` hears a line
    before each of those steps."""
    from compressor.profiling.latency import compare_latency

    weights = weights or int8_weights()
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(data.train_y), generator=g)[:calib_images]
    reporter.info(f"INT8: calibrating on {len(pick)} training images; {weights.why}")
    quantize_int8(fp32_path, out, normalized_images(data.train_x[pick], mean, std), reduce_range=weights.reduce_range)
    x, y = normalized_images(data.test_x, mean, std), data.test_y.numpy()
    reporter.info(f"INT8: top-1 of the FP32 and INT8 files on {len(y):,} test images (onnxruntime)")
    top_fp32, top_int8 = onnx_top1(fp32_path, x, y, threads=threads), onnx_top1(out, x, y, threads=threads)
    reporter.info(f"INT8: agreement with the QDQ graph (onnx reference evaluator, at most {AGREEMENT_BUDGET_S:g} s)")
    agreement = qdq_agreement(out, x, threads)
    reporter.info("INT8: timing INT8 against FP32 (interleaved rounds)")
    speed = compare_latency(None, None, input_size, "ort-cpu", 1, threads, teacher_onnx=Path(fp32_path), student_onnx=Path(out))
    return Int8Result(Path(out), top_fp32, top_int8, speed.speedup, speed.spread, speed.teacher_ms, speed.student_ms, len(pick),
                      weights, agreement)
