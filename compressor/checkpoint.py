"""atc checkpoints: a model's recipe (registry name + kwargs) with its weights and metadata.

Everything is plain data (tensors, numbers, strings, lists, dicts), so checkpoints load with
``torch.load(weights_only=True)``. Plain state_dicts load with an architecture name, including
the key layout of the widespread public CIFAR WRN code. A file that needs code execution to
unpickle loads only when the caller says it trusts it.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor import fileio
from compressor.errors import CheckpointError
from compressor.models.registry import Arch, parse_arch
from compressor.models.wrn import foreign_wrn_key, looks_like_foreign_wrn

FORMAT = "atc-checkpoint/1"


@dataclass
class ModelSpec:
    """What it takes to rebuild a model and feed it: architecture, classes, input, normalisation."""

    family: str
    arch_kwargs: dict[str, Any]
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    input_size: tuple[int, int, int] = (3, 32, 32)
    mean: list[float] | None = None  # None: not known (plain state_dict); taken from the data
    std: list[float] | None = None
    plan: dict[str, Any] | None = None  # thinning plan of a derived student, when there is one

    @property
    def arch(self) -> Arch:
        return Arch(self.family, self.arch_kwargs)

    @property
    def name(self) -> str:
        return self.arch.name if self.plan is None else self.plan.get("name", self.arch.name)

    def build(self) -> nn.Module:
        model = self.arch.build(self.num_classes)
        if self.plan is not None:
            from compressor.derive import apply_plan

            model = apply_plan(model, self.plan, self.input_size)
        return model

    @classmethod
    def for_arch(cls, name: str, num_classes: int, **extra: Any) -> "ModelSpec":
        arch = parse_arch(name)
        return cls(arch.family, dict(arch.kwargs), num_classes, **extra)


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


def read_file(path: str | Path, trust: bool = False) -> Any:
    """Load a checkpoint file safely; arbitrary pickles only with ``trust=True``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file (e.g. {path}/student.pt)")
    if _is_torchscript(path):
        return torch.jit.load(str(path), map_location="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names what the safe unpickler refused ("Unsupported global: …"); any other
        # unpickling failure means the bytes are not a checkpoint at all.
        if "Unsupported global" not in str(exc) and "Unsupported class" not in str(exc):
            raise CheckpointError(f"{path} is not a PyTorch checkpoint or is corrupt ({str(exc).splitlines()[0][:120]})") from exc
        if not trust:
            raise CheckpointError(f"{path} needs code execution to load (it pickles Python objects); pass --trust-checkpoint only if you trust its source") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint or is truncated ({type(exc).__name__}); re-save or re-download it") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a trusted pickle can fail in any way its code likes
        raise CheckpointError(f"{path} could not be loaded even as a trusted pickle ({type(exc).__name__}: {exc})") from exc


def _state_dict_of(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "net", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return {k.removeprefix("module."): v for k, v in obj.items()}
    return None


def _classes_in(state_dict: dict[str, torch.Tensor]) -> int | None:
    linear = [v for k, v in state_dict.items() if k.endswith("weight") and v.dim() == 2]
    return int(linear[-1].shape[0]) if linear else None


def load_state_into(model: nn.Module, state_dict: dict[str, torch.Tensor], where: str) -> None:
    if looks_like_foreign_wrn(state_dict):
        state_dict = {foreign_wrn_key(k): v for k, v in state_dict.items()}
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing = ", ".join(result.missing_keys[:3]) or "none"
        extra = ", ".join(result.unexpected_keys[:3]) or "none"
        raise CheckpointError(f"{where} does not fit this architecture (missing keys: {missing}; unexpected: {extra}); pass the right --arch")


def load_model(path: str | Path, arch: str | None = None, num_classes: int | None = None,
               input_size: tuple[int, int, int] | None = None, trust: bool = False) -> tuple[nn.Module, ModelSpec, dict]:
    """Rebuild a model from an atc checkpoint, a plain state_dict (with ``arch``) or, when trusted, a pickled module."""
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
        return model, spec, dict(obj.get("metrics", {}))
    if isinstance(obj, nn.Module):
        return obj.float().eval(), ModelSpec("module", {}, num_classes or 0, input_size=input_size or (3, 32, 32)), {}
    state_dict = _state_dict_of(obj)
    if state_dict is None:
        raise CheckpointError(f"{path} is not an atc checkpoint or a state_dict; pass a file saved by atc or torch.save(model.state_dict())")
    if arch is None:
        raise CheckpointError(f"{path} is a plain state_dict; pass --arch NAME (e.g. --arch wrn-40-4) so atc knows what to build")
    classes = num_classes or _classes_in(state_dict) or 10
    spec = ModelSpec.for_arch(arch, classes, input_size=input_size or (3, 32, 32))
    model = spec.build()
    try:
        load_state_into(model, state_dict, str(path))
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit {arch} ({str(exc).splitlines()[-1].strip()[:120]}); pass the right --arch") from exc
    return model, spec, {}

