"""ONNX export with a parity check, metadata for deployment without atc, and INT8 quantization.

The export uses torch's default (dynamo) exporter in eval mode with a named dynamic batch axis
and ``external_data=False``, so the result is one self-contained file. Parity compares
onnxruntime's CPU output with PyTorch's at two batch sizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch
from torch import nn
from compressor import fileio
from compressor.models.spec import ModelSpec
from compressor.errors import ExportError
from compressor.quiet import quiet
from compressor.device import ort_session




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
INPUT_NAME, OUTPUT_NAME = "input", "logits"

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
