"""ONNX export with a parity check, metadata for deployment without atc, and INT8 quantization.

The export uses torch's default (dynamo) exporter in eval mode with a named dynamic batch axis
and ``external_data=False``, so the result is one self-contained file. Parity compares
onnxruntime's CPU output with PyTorch's at two batch sizes.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor import fileio
from compressor.checkpoint import ModelSpec
from compressor.errors import ExportError
from compressor.quiet import quiet

INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass(frozen=True)
class Parity:
    max_abs_diff: dict[int, float]  # batch size → max |onnxruntime − torch|
    atol: float

    @property
    def ok(self) -> bool:
        return all(d <= self.atol for d in self.max_abs_diff.values())

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values())


# The exporter prints progress and warnings of its own; stdout must stay clean for --json.
EXPORT_LOGGERS = ("", "torch.onnx", "torch.export", "onnxscript", "torch._dynamo")


def metadata_for(spec: ModelSpec) -> dict[str, str]:
    return {
        "atc.arch": spec.name,
        "atc.class_names": json.dumps(spec.class_names),
        "atc.input_size": json.dumps(list(spec.input_size)),
        "atc.mean": json.dumps(spec.mean),
        "atc.std": json.dumps(spec.std),
        "atc.input_range": "RGB scaled to [0, 1], then (x - mean) / std",
    }


def to_onnx(model: nn.Module, input_size: tuple[int, int, int], out: str | Path, metadata: dict[str, str] | None = None,
            opset: int | None = None) -> Path:
    """Export ``model`` to one ONNX file with a dynamic batch axis; written atomically."""
    import onnx

    model = model.eval().float().to("cpu")
    example = torch.randn(2, *input_size)
    out = Path(out)
    with fileio.atomic_path(out, suffix=".onnx") as tmp:
        try:
            with quiet(EXPORT_LOGGERS):
                torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), external_data=False,
                                  opset_version=opset, dynamo=True, verbose=False)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"ONNX export failed ({first}); the model may use an operation the exporter cannot trace") from exc
        proto = onnx.load(str(tmp))
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
    return out


def ort_session(path: str | Path, threads: int | None = None, providers: list[str] | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def check_parity(model: nn.Module, onnx_path: str | Path, input_size: tuple[int, int, int], batch_sizes=(1, 8),
                 atol: float = 1e-4, seed: int = 0) -> Parity:
    model = model.eval().float().to("cpu")
    sess = ort_session(onnx_path)
    g = torch.Generator().manual_seed(seed)
    diffs = {}
    for bs in batch_sizes:
        x = torch.randn(bs, *input_size, generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        diffs[bs] = float(np.abs(got - ref).max())
    return Parity(diffs, atol)


def read_metadata(onnx_path: str | Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}


def export_checked(model: nn.Module, spec: ModelSpec, out: str | Path, atol: float = 1e-4,
                   batch_sizes=(1, 8)) -> Parity:
    """Export with metadata and verify parity before the file takes its place; a miss leaves nothing behind."""
    with fileio.atomic_path(out, suffix=".onnx") as tmp:
        to_onnx(model, spec.input_size, tmp, metadata_for(spec))
        parity = check_parity(model, tmp, spec.input_size, batch_sizes, atol)
        if not parity.ok:
            raise ExportError(f"ONNX parity check failed: max |onnxruntime - torch| = {parity.worst:.2e} > atol {parity.atol:g}; "
                              "inspect the model or relax --atol")
    return parity


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


def normalized_images(x_uint8: torch.Tensor, mean, std) -> np.ndarray:
    """uint8 N×C×H×W → float32 input as the exported model expects it."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((x_uint8.float() / 255 - m) / s).numpy().astype(np.float32)


def onnx_top1(path: str | Path, x: np.ndarray, y: np.ndarray, batch_size: int = 256, threads: int | None = None) -> float:
    """Top-1 (%) of an ONNX classifier on already-normalised inputs, with onnxruntime on CPU."""
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = sess.run(None, {name: x[i:i + batch_size]})[0]
        correct += int((logits.argmax(1) == y[i:i + batch_size]).sum())
    return 100.0 * correct / max(len(x), 1)


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
    from compressor.profiling import compare_latency

    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(data.train_y), generator=g)[:calib_images]
    quantize_int8(fp32_path, out, normalized_images(data.train_x[pick], mean, std))
    x, y = normalized_images(data.test_x, mean, std), data.test_y.numpy()
    top_fp32, top_int8 = onnx_top1(fp32_path, x, y, threads=threads), onnx_top1(out, x, y, threads=threads)
    speed = compare_latency(None, None, input_size, "ort-cpu", 1, threads, teacher_onnx=Path(fp32_path), student_onnx=Path(out))
    return Int8Result(Path(out), top_fp32, top_int8, speed.speedup, speed.spread, speed.teacher_ms, speed.student_ms, len(pick))
