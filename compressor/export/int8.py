"""INT8 export: static QDQ quantization in onnxruntime (U8 activations, S8 per-channel weights,
calibrated on training images), then top-1 and latency against the FP32 file.

Device rule: everything here runs in onnxruntime on CPU arrays made from the uint8 images; no torch
model is touched, so none is moved."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from compressor import fileio
from compressor.evaluate import normalized_images, onnx_top1
from compressor.export.onnx import EXPORT_LOGGERS, INPUT_NAME
from compressor.quiet import quiet


def quantize_int8(fp32_path: str | Path, out: str | Path, calibration: np.ndarray, per_channel: bool = True) -> Path:
    """Static QDQ quantization: uint8 activations, int8 (per-channel) weights, calibrated on ``calibration``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{INPUT_NAME: calibration[i:i + 32]} for i in range(0, len(calibration), 32)])

        def get_next(self):
            return next(self._batches, None)

    out = Path(out)
    with tempfile.TemporaryDirectory() as scratch, fileio.atomic_path(out, suffix=".onnx") as tmp:
        prepared = Path(scratch) / "prepared.onnx"
        with quiet(EXPORT_LOGGERS):
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=per_channel)
    return out


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["spread"] = list(self.spread)
        return d


def int8_with_evaluation(fp32_path: str | Path, out: str | Path, data, mean, std, input_size, calib_images: int = 256,
                         threads: int | None = None, seed: int = 0) -> Int8Result:
    """Quantize on ``calib_images`` training images, then measure top-1 and speed against the FP32 file."""
    from compressor.profiling.latency import compare_latency

    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(data.train_y), generator=g)[:calib_images]
    quantize_int8(fp32_path, out, normalized_images(data.train_x[pick], mean, std))
    x, y = normalized_images(data.test_x, mean, std), data.test_y.numpy()
    top_fp32, top_int8 = onnx_top1(fp32_path, x, y, threads=threads), onnx_top1(out, x, y, threads=threads)
    speed = compare_latency(None, None, input_size, "ort-cpu", 1, threads, teacher_onnx=Path(fp32_path), student_onnx=Path(out))
    return Int8Result(Path(out), top_fp32, top_int8, speed.speedup, speed.spread, speed.teacher_ms, speed.student_ms, len(pick))
