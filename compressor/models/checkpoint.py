"""atc checkpoints: a model's recipe (registry name + kwargs) with its weights and metadata.

Everything is plain data (tensors, numbers, strings, lists, dicts), so checkpoints load with
``torch.load(weights_only=True)``. Other projects' checkpoints (plain state_dicts, RepDistiller,
mdistiller, torchdistill, timm, Lightning, the paper's code) are read by ``importers``, with the
architecture from ``--arch``, from the file or from the weights themselves. A file that needs code
execution to unpickle loads only when the caller says it trusts it.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor import fileio
from compressor.device import example_input
from compressor.errors import CheckpointError, ModelError, shown
from compressor.models import importers
from compressor.models.outputs import ensure_logits
from compressor.models.registry import parse_arch
from compressor.models.spec import ModelSpec
from compressor.models.trust import Trust

FORMAT = "atc-checkpoint/1"
ATC_SOURCE = "an atc checkpoint"


def save_checkpoint(path: str | Path, model: nn.Module, spec: ModelSpec, metrics: dict | None = None) -> None:
    blob = {
        "format": FORMAT,
        "spec": {**asdict(spec), "input_size": list(spec.input_size)},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metrics": metrics or {},
    }
    fileio.torch_save(path, blob)


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


def _pickle_streams(path: Path) -> list[bytes]:
    """The pickle bytes inside ``path``: ``data.pkl`` of a zip checkpoint, else the file itself."""
    try:
        with zipfile.ZipFile(path) as z:
            return [z.read(n) for n in z.namelist() if n.endswith("data.pkl")]
    except (zipfile.BadZipFile, OSError, KeyError, RuntimeError):
        return [path.read_bytes()]


def _pickles_code(path: Path) -> bool:
    """Whether ``path`` is a well-formed pickle that imports or calls Python objects.

    Decodes opcodes with ``pickletools`` (which runs nothing), pickle after pickle as the legacy
    torch format stores them; bytes that are no pickle at all give False.
    """
    import io

    for raw in _pickle_streams(path):
        stream, calls = io.BytesIO(raw), False
        while stream.tell() < len(raw):
            try:
                ops = [op.name for op, _, _ in pickletools.genops(stream)]
            except Exception:  # noqa: BLE001 - not (or no longer) a pickle: judge what was read
                break
            calls = calls or any(o in _CODE_OPCODES for o in ops)
        if calls:
            return True
    return False


def read_file(path: str | Path, trust: bool | Trust = False) -> Any:
    """Load a checkpoint file safely: its zip records' checksums first, then ``torch.load(weights_only=True)``;
    a pickle that runs code only with ``trust`` (``--trust-checkpoint``)."""
    path = Path(path)
    trust = Trust.given(trust)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file (e.g. {path}/student.pt)")
    damaged = fileio.damaged_record(path)
    if damaged is not None:
        raise CheckpointError(f"{path} is damaged: its record {damaged} fails the archive's CRC check (the bytes changed "
                              "after it was saved); re-save or re-download it")
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch marks jit.load deprecated; users still ship it
                return torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - a damaged archive fails in many ways
            raise CheckpointError(f"{path} is a damaged TorchScript file ({type(exc).__name__}); re-save or re-download it") from exc
    if (foreign := importers.read_foreign(path)) is not None:  # safetensors; ONNX is refused with what to do
        return foreign
    try:
        with torch.serialization.safe_globals(importers.SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as exc:
        raise CheckpointError(f"cannot read {path} (permission denied); check the file's permissions") from exc
    except Exception as exc:  # noqa: BLE001 - torch's safe unpickler fails with many types on bad bytes
        # torch names what the safe unpickler refused ("Unsupported global: …"); a file whose
        # opcodes import or call Python objects needs code execution; anything else is no checkpoint.
        needs_code = isinstance(exc, pickle.UnpicklingError) and ("Unsupported global" in str(exc) or _pickles_code(path))
        if not needs_code:
            kind = "is empty" if path.stat().st_size == 0 else f"is not a PyTorch checkpoint or is truncated ({type(exc).__name__})"
            raise CheckpointError(f"{path} {kind}; pass a file saved by atc or torch.save, re-saved or re-downloaded if damaged") from None
        if not trust.code:
            raise CheckpointError(f"{path} needs code execution to load (it pickles Python objects, e.g. a whole nn.Module); "
                                  "pass --trust-checkpoint only if you trust its source") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a trusted pickle can fail in any way its code likes
        raise CheckpointError(f"{path} could not be loaded even as a trusted pickle ({type(exc).__name__}: {exc})") from exc


def check_input_fits(model: nn.Module, input_size: tuple[int, int, int] | list[int], name: str = "the model") -> None:
    """Raise ``ModelError`` when ``input_size`` (C, H, W) is too small for ``model``.

    Too small: a forward pass fails, or a downsampling layer (stride > 1) receives a map that has
    already shrunk to one pixel, so the layers after it see no spatial structure. The message
    names the smallest square input that passes.
    """
    c, h, w = (int(v) for v in input_size)
    ok, why = _fits(model, (c, h, w))
    if ok:
        return
    if why.startswith("forward"):
        raise ModelError(f"{name} cannot run on input {c}x{h}x{w} ({why}); use the input size it was built for "
                         "(--input-size, or data.image_size in the preset)")
    lo, hi = max(h, w), max(h, w) * 2
    while not _fits(model, (c, hi, hi))[0]:
        lo, hi = hi, hi * 2
        if hi > 4096:
            raise ModelError(f"input {c}x{h}x{w} is too small for {name} ({why}); no input up to 4096x4096 fits")
    while hi - lo > 1:  # the smallest square size that fits, for the message
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _fits(model, (c, mid, mid))[0] else (mid, hi)
    raise ModelError(f"input {c}x{h}x{w} is too small for {name} ({why}); use images of at least {hi}x{hi} "
                     "(--input-size, or data.image_size in the preset)")


def _fits(model: nn.Module, size: tuple[int, int, int]) -> tuple[bool, str]:
    collapsed: list[str] = []
    handles = []
    scripted = isinstance(model, torch.jit.ScriptModule)  # TorchScript takes no hooks: only the forward is tried
    for mod_name, module in ([] if scripted else model.named_modules()):
        stride = getattr(module, "stride", 1)
        stride = stride if isinstance(stride, (tuple, list)) else (stride, stride)
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and max(stride) > 1:
            def check(mod, inputs, mod_name=mod_name):
                x = inputs[0] if inputs else None
                if isinstance(x, torch.Tensor) and x.dim() == 4 and min(x.shape[-2:]) < 2 and not collapsed:
                    collapsed.append(f"{mod_name or 'the first layer'} would downsample a {x.shape[-2]}x{x.shape[-1]} map")
            handles.append(module.register_forward_pre_hook(check))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input(model, size))  # on the model's device
    except Exception as exc:  # noqa: BLE001 - any failure of a plain forward means the input does not fit
        return False, f"forward pass fails: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    return (not collapsed), (collapsed[0] if collapsed else "")


@dataclass
class LoadedModel:
    """A model read from a file: the module, its spec, the metrics the file stored, what the file is
    and notes on how it was read (stripped prefixes, renamed keys, an inferred architecture)."""

    model: nn.Module
    spec: ModelSpec
    metrics: dict
    source: str = ATC_SOURCE
    notes: list[str] = field(default_factory=list)
    norm_source: str = "the checkpoint"  # where spec.mean/std come from, when the file states them

    @property
    def stores_input_size(self) -> bool:
        """Whether the file itself says the input size (atc checkpoints do; a state_dict leaves it to the data)."""
        return self.source == ATC_SOURCE


def first_non_finite(model: nn.Module) -> str | None:
    """The name of the first parameter or floating-point buffer holding NaN or infinity, or None.
    A tensor's sum is finite when all its values are (a cheap first look; a sum that overflows is checked element by element)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.detach().sum())) and not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "infinity"
            return f"{name} holds {kind}"
    return None


def weights_digest(model: nn.Module) -> str:
    """A content hash (SHA-256, hex) of a model's parameters and buffers: names, dtypes, shapes and
    bytes. It identifies the weights that teach, wherever the file lies and whatever its mtime; for
    WRN-40-4 (36 MB) it takes about 50 ms on a 2-core CPU (docs/reliability.md)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_finite(model: nn.Module, where: str) -> None:
    """Refuse a model whose weights are not finite: it would make training diverge at once, or an
    export fail its parity check, with a message that points at the wrong cause."""
    bad = first_non_finite(model)
    if bad is not None:
        raise CheckpointError(f"{where} has non-finite weights ({bad}); it cannot be used; take an earlier or another checkpoint")


def _stored_model(obj: dict, path: Path, trust: Trust) -> LoadedModel:
    """An atc checkpoint's model: the spec checked field by field and admitted by ``trust``, built, its weights loaded."""
    where = str(path)
    spec = ModelSpec.from_stored(obj.get("spec"), where, trust)
    state = obj.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{where}: field 'state_dict' must map names to tensors; the file is damaged, re-save it with atc")
    metrics = obj.get("metrics", {})
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{where}: field 'metrics' must be a dict, got {type(metrics).__name__}; re-save it with atc")
    history = metrics.get("history", [])
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise CheckpointError(f"{where}: field 'metrics.history' must be a list of epoch records, got {type(history).__name__}; "
                              "re-save it with atc")
    top1 = metrics.get("top1")
    if top1 is not None and (isinstance(top1, bool) or not isinstance(top1, (int, float))):
        raise CheckpointError(f"{where}: field 'metrics.top1' must be a number, got {type(top1).__name__}; re-save it with atc")
    try:
        model = spec.build()
    except (TypeError, ValueError, KeyError, IndexError, AssertionError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: its spec does not build a model ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); re-save it with atc") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} is damaged: its weights do not fit its own architecture ({str(exc).splitlines()[0][:100]})") from exc
    return LoadedModel(model, spec, dict(metrics))


def read_model(path: str | Path, arch: str | None = None, num_classes: int | None = None,
               input_size: tuple[int, int, int] | None = None, trust: bool | Trust = False) -> LoadedModel:
    """Rebuild a model from an atc checkpoint, another project's checkpoint or state_dict (the
    architecture from ``arch``, the file or the weights) or, when trusted, a pickled module.

    Every stored file passes here: ``trust`` (``--trust-checkpoint``, or a ``Trust``) and an ``arch``
    naming a Python file decide what the file may make atc import (``models/trust.py``), for atc's
    own specs and for architectures other projects' files name alike; weights that are not finite
    are refused."""
    path = Path(path)
    trust = Trust.given(trust, arch)
    obj = read_file(path, trust=trust)
    loaded = _loaded_from(obj, path, arch, num_classes, input_size, trust)
    check_finite(loaded.model, str(path))
    return loaded


def _loaded_from(obj: Any, path: Path, arch: str | None, num_classes: int | None,
                 input_size: tuple[int, int, int] | None, trust: Trust) -> LoadedModel:
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _stored_model(obj, path, trust)
    if isinstance(obj, nn.Module):  # TorchScript, or a whole pickled module (trusted): it runs, but cannot be rebuilt by name
        linears = [m for m in obj.modules() if isinstance(m, nn.Linear)]
        classes = num_classes or (linears[-1].out_features if linears else 0)
        spec = ModelSpec("module", {}, classes, input_size=input_size or (3, 32, 32))
        return LoadedModel(obj.float().eval(), spec, {}, importers.module_source(obj))
    weights = importers.find_weights(obj)
    if weights is None:
        raise CheckpointError(f"{path} is not an atc checkpoint or a state_dict; pass a file saved by atc or torch.save(model.state_dict())")
    chosen, notes = importers.choose_arch(weights, arch, str(path))
    chosen = trust.admit(chosen, str(path))  # an architecture the file names passes the same gate as atc's own specs
    classes = num_classes or importers.classes_in(weights.state_dict) or 10
    spec = ModelSpec(chosen.family, dict(chosen.kwargs), classes, input_size=input_size or (3, 32, 32))
    if weights.stats is not None:  # the source project's code fixes its normalisation
        spec.mean, spec.std = list(weights.stats.mean), list(weights.stats.std)
    model = spec.build()
    notes += importers.fit(model, weights, spec.name, str(path))
    return LoadedModel(model, spec, {}, weights.source, notes, weights.stats.source if weights.stats else "")


def load_model(path: str | Path, arch: str | None = None, num_classes: int | None = None,
               input_size: tuple[int, int, int] | None = None, trust: bool | Trust = False) -> tuple[nn.Module, ModelSpec, dict]:
    """``read_model`` as (model, spec, metrics)."""
    loaded = read_model(path, arch=arch, num_classes=num_classes, input_size=input_size, trust=trust)
    return loaded.model, loaded.spec, loaded.metrics


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar", ".onnx", ".safetensors")


def check_model_source(model: str | Path) -> None:
    """A name that reads as a file (a checkpoint suffix, or a folder in it) but is none: say so, instead of
    trying it as an architecture name ("unknown architecture 'nope.pt'")."""
    text = str(model)
    if Path(text).exists() or text.startswith(("tv:", "timm:")) or ".py:" in text:
        return
    if Path(text).suffix.lower() in CHECKPOINT_SUFFIXES or "/" in text or "\\" in text:
        raise CheckpointError(f"checkpoint {text} does not exist; check the path (or pass an architecture name, see `atc models`)")


def open_model(model: str | Path, arch: str | None = None, trust: bool | Trust = False, input_size: tuple[int, int, int] | None = None,
               num_classes: int = 10) -> tuple[nn.Module, ModelSpec]:
    """A model to profile or export: a checkpoint file, or a zoo name built fresh. ``input_size``
    overrides the checkpoint's; a zoo ImageNet ResNet defaults to 1000 classes at 224x224. The model
    is in eval mode and checked to accept its input size."""
    size = tuple(input_size) if input_size else None
    if Path(model).is_symlink() and not Path(model).exists():
        raise CheckpointError(f"{shown(model)} is a symbolic link to {shown(os.readlink(model))}, which does not exist; "
                              "pass the checkpoint itself")
    check_model_source(model)
    if Path(model).exists():
        m, spec, _ = load_model(model, arch=arch, trust=trust, input_size=size)
        if size:
            spec = replace(spec, input_size=size)
    else:
        a = parse_arch(str(model))
        classes = 1000 if a.family == "resnet" and num_classes == 10 and not a.kwargs.get("cifar_stem") else num_classes
        spec = ModelSpec(a.family, dict(a.kwargs), classes, input_size=size or ((3, 224, 224) if classes == 1000 else (3, 32, 32)))
        m = spec.build()
    check_input_fits(m, spec.input_size, spec.name)
    ensure_logits(m, example_input(m, spec.input_size, batch=2), spec.name)  # (logits, …) outputs: export and time the logits
    return m.eval(), spec
