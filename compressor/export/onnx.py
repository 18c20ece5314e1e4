"""ONNX export with a parity check and metadata for deployment without atc (INT8 quantization of the
exported file is ``compressor.export.int8``).

The export uses torch's default (dynamo) exporter in eval mode with a named dynamic batch axis
and ``external_data=False``, so the result is one self-contained file. Export and the parity check
work on an fp32 eval-mode CPU copy of the model (``device.cpu_copy``): the caller's model keeps its
device, dtype and train/eval mode. Parity compares
onnxruntime's CPU output with PyTorch's at two batch sizes, elementwise as ``numpy.allclose``
does: ``|ort − torch| ≤ atol + rtol·|torch|``. The relative part matters for large logits: float32
holds about 7 significant digits, so logits near 400 differ by a few 1e-5 between two correct
runtimes, and an absolute 1e-4 alone fails models that are right.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor import fileio
from compressor.device import cpu_copy, ort_session
from compressor.errors import ExportError
from compressor.models.spec import ModelSpec
from compressor.quiet import quiet


@dataclass(frozen=True)
class Parity:
    max_abs_diff: dict[int, float]  # batch size → max |onnxruntime − torch|
    atol: float
    max_rel_diff: dict[int, float] = field(default_factory=dict)  # batch size → max |ort − torch| / max |torch|
    rtol: float = 0.0
    within: dict[int, bool] = field(default_factory=dict)  # batch size → |ort − torch| ≤ atol + rtol·|torch| everywhere

    @property
    def ok(self) -> bool:
        if self.within:
            return all(self.within.values())
        return all(d <= self.atol for d in self.max_abs_diff.values())

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values())

    @property
    def worst_rel(self) -> float:
        return max(self.max_rel_diff.values(), default=0.0)

    def failure(self) -> str:
        """The one-line message of a failed check: which batch, both errors, both tolerances."""
        bad = [b for b, ok in self.within.items() if not ok] or list(self.max_abs_diff)
        b = max(bad, key=lambda k: self.max_abs_diff[k])
        rel = self.max_rel_diff.get(b, float("nan"))
        return (f"ONNX parity check failed at batch {b}: max |onnxruntime - torch| = {self.max_abs_diff[b]:.2e} "
                f"(relative {rel:.2e}), over atol {self.atol:g} + rtol {self.rtol:g} x |torch|; "
                "inspect the model or relax --atol")



def compare(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> tuple[float, float, bool]:
    """(max |got − ref|, that divided by max |ref|, whether |got − ref| ≤ atol + rtol·|ref| everywhere).

    The relative error is taken against the output's scale (its largest magnitude), not per
    element: a logit that happens to be near zero would otherwise report a huge relative error
    for a harmless absolute one. NaN anywhere counts as a mismatch."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    diff = np.abs(got - ref)
    if not np.isfinite(diff).all():
        return float("inf"), float("inf"), False
    worst = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    rel = worst / scale if scale > 0 else (0.0 if worst == 0 else float("inf"))
    return worst, rel, bool((diff <= atol + rtol * np.abs(ref)).all())


# The exporter prints progress and warnings of its own; stdout must stay clean for --json.
INPUT_NAME, OUTPUT_NAME = "input", "logits"
RESIZE_FILTER = "BILINEAR"  # the name of a PIL.Image.Resampling member

EXPORT_LOGGERS = ("", "torch.onnx", "torch.export", "onnxscript", "torch._dynamo")


def metadata_for(spec: ModelSpec) -> dict[str, str]:
    return {
        "atc.arch": spec.name,
        "atc.class_names": json.dumps(spec.class_names),
        "atc.input_size": json.dumps(list(spec.input_size)),
        "atc.mean": json.dumps(spec.mean),
        "atc.std": json.dumps(spec.std),
        # atc fed the model images of another size resized with PIL's bilinear filter (data/folders.py);
        # PIL's own default (bicubic) gives other pixels, so a deployment that resizes must say which
        "atc.resize": RESIZE_FILTER,
        "atc.input_range": f"RGB resized to input_size with PIL's Image.Resampling.{RESIZE_FILTER}, scaled to [0, 1], then (x - mean) / std",
    }


def to_onnx(model: nn.Module, input_size: tuple[int, int, int], out: str | Path, metadata: dict[str, str] | None = None,
            opset: int | None = None) -> Path:
    """Export ``model`` to one ONNX file with a dynamic batch axis; written atomically."""
    out = Path(out)
    with fileio.atomic_path(out, suffix=".onnx") as tmp:
        write_onnx(model, input_size, tmp, metadata, opset)
    return out


def write_onnx(model: nn.Module, input_size: tuple[int, int, int], tmp: Path, metadata: dict[str, str] | None = None,
               opset: int | None = None) -> None:
    """The export itself, into ``tmp``: a path the caller's one atomic write owns (``fileio.atomic_path``),
    so no temporary is ever written through another."""
    import onnx

    model = cpu_copy(model)  # device rule: export from a CPU copy; the caller's model stays where it is
    example = torch.randn(2, *input_size)
    try:
        with quiet(EXPORT_LOGGERS):
            torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), external_data=False,
                              opset_version=opset, dynamo=True, verbose=False)
    except Exception as exc:
        disk = _disk_error(exc)
        if disk is not None:  # a full disk is the machine's problem, not the model's
            raise disk from exc
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export failed ({first}); the model may use an operation the exporter cannot trace") from exc
    proto = onnx.load(str(tmp))
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp))


def _disk_error(exc: BaseException) -> OSError | None:
    """The OSError behind an export that failed because the disk is full or unwritable (the exporter
    wraps it, or keeps only its words, so the whole chain is searched); re-raised as an OSError, the
    caller's atomic write turns it into the one-line message naming the real output file."""
    import errno

    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, OSError) and fileio.output_error(seen, "") is not None:
            return seen
        if "No space left on device" in str(seen):
            return OSError(errno.ENOSPC, "No space left on device")
        seen = seen.__cause__ or seen.__context__
    return None


def check_parity(model: nn.Module, onnx_path: str | Path, input_size: tuple[int, int, int], batch_sizes=(1, 8),
                 atol: float = 1e-4, seed: int = 0, rtol: float | None = None) -> Parity:
    """Compare onnxruntime with torch on random inputs: passes when ``|ort − torch| ≤ atol + rtol·|torch|``.

    ``rtol`` defaults to ``atol`` (1e-4 each): one number, ``--atol``, relaxes or tightens both, and
    ``--atol 0`` still asks for identical outputs."""
    rtol = atol if rtol is None else rtol
    model = cpu_copy(model)  # device rule: torch's reference runs on a CPU copy; the caller's model stays where it is
    sess = ort_session(onnx_path)
    g = torch.Generator().manual_seed(seed)
    diffs, rels, within = {}, {}, {}
    for bs in batch_sizes:
        x = torch.randn(bs, *input_size, generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        diffs[bs], rels[bs], within[bs] = compare(got, ref, atol, rtol)
    return Parity(diffs, atol, rels, rtol, within)


def read_metadata(onnx_path: str | Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}


def export_checked(model: nn.Module, spec: ModelSpec, out: str | Path, atol: float = 1e-4,
                   batch_sizes=(1, 8), rtol: float | None = None) -> Parity:
    """Export with metadata and verify parity before the file takes its place; a miss leaves nothing behind."""
    with fileio.atomic_path(out, suffix=".onnx") as tmp:
        write_onnx(model, spec.input_size, tmp, metadata_for(spec))
        parity = check_parity(model, tmp, spec.input_size, batch_sizes, atol, rtol=rtol)
        if not parity.ok:
            raise ExportError(parity.failure())
    return parity
