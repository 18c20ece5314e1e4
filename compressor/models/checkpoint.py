"""atc checkpoints: a model's recipe (registry name + kwargs) with its weights and metadata.

Everything is plain data (tensors, numbers, strings, lists, dicts), so checkpoints load with
``torch.load(weights_only=True)``. Other projects' checkpoints (plain state_dicts, RepDistiller,
mdistiller, torchdistill, timm, Lightning, the paper's code) are read by ``importers``, with the
architecture from ``--arch``, from the file or from the weights themselves. A file that needs code
execution to unpickle loads only when the caller says it trusts it.
"""

from __future__ import annotations

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
from compressor.errors import CheckpointError, ModelError
from compressor.models import importers
from compressor.models.outputs import ensure_logits
from compressor.models.registry import parse_arch
from compressor.models.spec import ModelSpec

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


def read_file(path: str | Path, trust: bool = False) -> Any:
    """Load a checkpoint file safely; arbitrary pickles only with ``trust=True``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file (e.g. {path}/student.pt)")
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
        if not trust:
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


def read_model(path: str | Path, arch: str | None = None, num_classes: int | None = None,
               input_size: tuple[int, int, int] | None = None, trust: bool = False) -> LoadedModel:
    """Rebuild a model from an atc checkpoint, another project's checkpoint or state_dict (the
    architecture from ``arch``, the file or the weights) or, when trusted, a pickled module."""
    obj = read_file(path, trust=trust)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        raw = dict(obj["spec"])
        raw["input_size"] = tuple(raw["input_size"])
        spec = ModelSpec(**raw)
        model = spec.build()
        try:
            model.load_state_dict(obj["state_dict"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path} is damaged: its weights do not fit its own architecture ({str(exc).splitlines()[0][:100]})") from exc
        return LoadedModel(model, spec, dict(obj.get("metrics", {})))
    if isinstance(obj, nn.Module):  # TorchScript, or a whole pickled module (trusted): it runs, but cannot be rebuilt by name
        linears = [m for m in obj.modules() if isinstance(m, nn.Linear)]
        classes = num_classes or (linears[-1].out_features if linears else 0)
        spec = ModelSpec("module", {}, classes, input_size=input_size or (3, 32, 32))
        return LoadedModel(obj.float().eval(), spec, {}, importers.module_source(obj))
    weights = importers.find_weights(obj)
    if weights is None:
        raise CheckpointError(f"{path} is not an atc checkpoint or a state_dict; pass a file saved by atc or torch.save(model.state_dict())")
    chosen, notes = importers.choose_arch(weights, arch, str(path))
    classes = num_classes or importers.classes_in(weights.state_dict) or 10
    spec = ModelSpec(chosen.family, dict(chosen.kwargs), classes, input_size=input_size or (3, 32, 32))
    if weights.stats is not None:  # the source project's code fixes its normalisation
        spec.mean, spec.std = list(weights.stats.mean), list(weights.stats.std)
    model = spec.build()
    notes += importers.fit(model, weights, spec.name, str(path))
    return LoadedModel(model, spec, {}, weights.source, notes, weights.stats.source if weights.stats else "")


def load_model(path: str | Path, arch: str | None = None, num_classes: int | None = None,
               input_size: tuple[int, int, int] | None = None, trust: bool = False) -> tuple[nn.Module, ModelSpec, dict]:
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


def open_model(model: str | Path, arch: str | None = None, trust: bool = False, input_size: tuple[int, int, int] | None = None,
               num_classes: int = 10) -> tuple[nn.Module, ModelSpec]:
    """A model to profile or export: a checkpoint file, or a zoo name built fresh. ``input_size``
    overrides the checkpoint's; a zoo ImageNet ResNet defaults to 1000 classes at 224x224. The model
    is in eval mode and checked to accept its input size."""
    size = tuple(input_size) if input_size else None
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
