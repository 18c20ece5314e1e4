"""One registry of model builders by name, so a checkpoint can store a name plus keyword
arguments and rebuild the module.

Names: ``wrn-D-K`` (e.g. ``wrn-40-4``), CIFAR ResNets ``resnet20/32/56/110`` (and
``cifar-resnetD`` for any 6n+2 depth), torchvision's ``resnet18/34/50/101/152`` (``-cifar``
for a 3x3 stem without max-pool), a few torchvision classifiers by their bare names, any
torchvision classification builder as ``tv:NAME`` and any timm model as ``timm:NAME`` (always
built without pretrained weights; the data sets ``num_classes``), and a user's own model as
``path/to/file.py:ClassName`` (family ``file``: the checkpoint stores the file's absolute path and
the class name, so the file must stay where it is to rebuild the model). ``list_models()`` says
all of this as rows of plain data.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from compressor.errors import ModelError
from compressor.models.resnet import CifarResNet, ScalableResNet
from compressor.models.wrn import WideResNet

IMAGENET_RESNETS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
    "resnet152": ("bottleneck", [3, 8, 36, 3]),
}
CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)
TORCHVISION_GENERIC = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                       "vgg11_bn", "vgg16_bn", "regnet_x_400mf", "regnet_y_400mf")


@dataclass(frozen=True)
class Arch:
    """A buildable architecture: a family and the keyword arguments of its builder."""

    family: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return display_name(self.family, self.kwargs)

    def build(self, num_classes: int) -> nn.Module:
        return FAMILIES[self.family](num_classes=num_classes, **self.kwargs)


TIMM_MISSING = "timm is not installed; pip install 'atc[timm]' to use timm:NAME models"


def _torchvision_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    import torchvision

    if kwargs.pop("weights", None) is not None:
        raise ModelError(f"atc builds tv:{name} without pretrained weights; load trained weights from a checkpoint instead")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def _import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ModelError(TIMM_MISSING) from None
    return timm


def _timm_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A timm model with fresh weights: ``pretrained=False`` always, so nothing is downloaded."""
    timm = _import_timm()
    if kwargs.pop("pretrained", False):
        raise ModelError(f"atc builds timm:{name} without pretrained weights; load trained weights from a checkpoint instead")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def torchvision_names() -> list[str]:
    """torchvision's classification builders (detection, segmentation, video and optical flow left out)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _file_model(num_classes: int, path: str, class_name: str, **kwargs: Any) -> nn.Module:
    """``class_name`` from the Python file at ``path``; ``num_classes`` is passed when it takes one."""
    file = Path(path)
    if not file.is_file():
        raise ModelError(f"model file {file} does not exist (the checkpoint needs it to rebuild {class_name}); restore it or pass --arch")
    key = "atc_user_model_" + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
    module = sys.modules.get(key)
    if module is None:
        spec = importlib.util.spec_from_file_location(key, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[key]
            raise ModelError(f"importing {file} failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); fix the file") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelError(f"{file} has no nn.Module class named {class_name}; pass --arch {file}:ClassName")
    params = inspect.signature(cls).parameters
    takes_classes = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    try:
        return cls(num_classes=num_classes, **kwargs) if takes_classes else cls(**kwargs)
    except Exception as exc:
        raise ModelError(f"{class_name}() from {file} failed ({type(exc).__name__}: {exc}); it must build with no "
                         "arguments or with num_classes=N") from exc


FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "wrn": WideResNet,
    "cifar_resnet": CifarResNet,
    "resnet": ScalableResNet,
    "torchvision": _torchvision_model,
    "timm": _timm_model,
    "file": _file_model,
}


def _fmt(x: float) -> str:
    return f"{x:g}"


def display_name(family: str, kwargs: dict[str, Any]) -> str:
    if family == "wrn":
        return f"wrn-{kwargs['depth']}-{_fmt(kwargs['width'])}"
    if family == "cifar_resnet":
        base = f"resnet{kwargs['depth']}" if kwargs["depth"] in CIFAR_RESNET_DEPTHS else f"cifar-resnet{kwargs['depth']}"
        return base if kwargs.get("width", 16) == 16 else f"{base}-w{kwargs['width']}"
    if family == "resnet":
        layers = list(kwargs.get("layers", []))
        std = next((n for n, (b, l) in IMAGENET_RESNETS.items() if l == layers and b == kwargs.get("block")), None)
        name = std or f"resnet-{kwargs.get('block')}-{'.'.join(map(str, layers))}"
        if kwargs.get("width", 1.0) != 1.0:
            name += f"-x{_fmt(kwargs['width'])}"
        return name + ("-cifar" if kwargs.get("cifar_stem") else "")
    if family == "torchvision":  # a bare name only where it parses back to torchvision (not resnet18: the zoo's)
        return kwargs["name"] if kwargs["name"] in TORCHVISION_GENERIC else f"tv:{kwargs['name']}"
    if family == "timm":
        return f"timm:{kwargs['name']}"
    if family == "file":
        return kwargs["class_name"]
    return family


def known_names() -> list[str]:
    wrns = [f"wrn-{d}-{k}" for d in (10, 16, 22, 28, 40) for k in (1, 2, 4, 8, 10)]
    cifar = [f"resnet{d}" for d in CIFAR_RESNET_DEPTHS]
    imagenet = list(IMAGENET_RESNETS) + [f"{n}-cifar" for n in IMAGENET_RESNETS]
    return wrns + cifar + imagenet + list(TORCHVISION_GENERIC)


FIND_NAMES = "run `atc models` for how to name models"


def _unknown(what: str, close: list[str], where: str) -> ModelError:
    """One line: what is unknown, the closest names, and how to find the right one."""
    if close:
        return ModelError(f"{what}; did you mean {', '.join(close)}? {FIND_NAMES.capitalize()} {where}")
    return ModelError(f"{what}; {FIND_NAMES} {where}")


def _parse_torchvision(name: str) -> Arch:
    names = torchvision_names()
    key = name if name in names else name.lower()
    if key in names:
        return Arch("torchvision", {"name": key})
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    raise _unknown(f"torchvision has no classification model '{name}'", ["tv:" + c for c in close],
                   "(torchvision.models.list_models(module=torchvision.models) lists torchvision's)")


def _parse_timm(name: str) -> Arch:
    timm = _import_timm()
    if ":" in name or "/" in name:
        raise ModelError(f"timm:{name} names a hub or file source; atc builds timm models without weights, so pass "
                         "the architecture name alone, e.g. timm:resnet18")
    key = name if timm.is_model(name) else name.lower()
    if timm.is_model(key):
        return Arch("timm", {"name": key})
    close = difflib.get_close_matches(key, timm.list_models(), n=3, cutoff=0.6)
    raise _unknown(f"timm has no model '{name}'", ["timm:" + c for c in close],
                   f"(timm.list_models('*{key}*') lists timm's)")


def parse_arch(name: str) -> Arch:
    """Turn a zoo name, ``tv:NAME``, ``timm:NAME`` or ``file.py:ClassName`` into an ``Arch``; unknown
    names raise with the closest known ones."""
    prefix, sep, rest = name.strip().partition(":")
    if sep and prefix.lower() in ("tv", "torchvision"):
        return _parse_torchvision(rest.strip())
    if sep and prefix.lower() == "timm":
        return _parse_timm(rest.strip())
    if m := re.fullmatch(r"(.+\.py):([A-Za-z_]\w*)", name.strip()):
        file = Path(m.group(1)).expanduser()
        if not file.is_file():
            raise ModelError(f"model file {file} does not exist; pass --arch path/to/file.py:ClassName")
        return Arch("file", {"path": str(file.resolve()), "class_name": m.group(2)})
    key = name.strip().lower()
    if m := re.fullmatch(r"wrn-(\d+)-(\d+(?:\.\d+)?)", key):
        depth, width = int(m.group(1)), float(m.group(2))
        if (depth - 4) % 6 == 0 and depth >= 10:
            return Arch("wrn", {"depth": depth, "width": int(width) if width.is_integer() else width})
    base, cifar_stem = (key[: -len("-cifar")], True) if key.endswith("-cifar") else (key, False)
    if base in IMAGENET_RESNETS:
        block, layers = IMAGENET_RESNETS[base]
        kwargs: dict[str, Any] = {"block": block, "layers": layers, "width": 1.0}
        if cifar_stem:
            kwargs["cifar_stem"] = True
        return Arch("resnet", kwargs)
    if m := re.fullmatch(r"(?:cifar-)?resnet(\d+)(?:-w(\d+))?", key):
        depth, width = int(m.group(1)), int(m.group(2) or 16)
        if (depth - 2) % 6 == 0 and depth >= 8:
            return Arch("cifar_resnet", {"depth": depth, "width": width})
    if key in TORCHVISION_GENERIC:
        return Arch("torchvision", {"name": key})
    close = difflib.get_close_matches(key, known_names(), n=3, cutoff=0.5)
    raise _unknown(f"unknown architecture '{name}'", close,
                   "(tv:NAME for torchvision's, timm:NAME for timm's, path/to/file.py:ClassName for your own)")


def _row(names: str, family: str, derive: str, about: str = "") -> dict[str, str]:
    """One row of ``list_models()``: ``names`` as ``--arch`` takes them (a name, names or a pattern),
    the registry ``family`` a checkpoint stores, how ``atc compress`` derives a student from it
    (``"family rule"`` or ``"thinning"``), and what it is."""
    return {"names": names, "family": family, "derive": derive, "about": about}


def _timm_names(pattern: str) -> list[str] | None:
    try:
        import timm
    except ImportError:
        return None
    return timm.list_models(pattern)


def list_models(pattern: str | None = None) -> list[dict[str, str]]:
    """The architectures atc builds, as rows of plain data (``names``, ``family``, ``derive``,
    ``about``; see ``_row``): the zoo's name patterns with examples, the torchvision models known by
    bare name, and how to name any other torchvision or timm model or your own class.

    With ``pattern`` (a glob such as ``"*mobilenet*"``; a bare word matches anywhere) there is one
    row per matching name: zoo, torchvision and (when installed) timm. Nothing is built or downloaded.
    """
    import fnmatch

    tv = torchvision_names()
    if pattern is not None:
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        rows = [_row(n, parse_arch(n).family, "family rule")
                for n in known_names() if n not in TORCHVISION_GENERIC and fnmatch.fnmatch(n, glob)]
        rows += [_row(n, "torchvision", "thinning") for n in TORCHVISION_GENERIC if fnmatch.fnmatch(n, glob)]
        rows += [_row(f"tv:{n}", "torchvision", "thinning") for n in tv
                 if n not in TORCHVISION_GENERIC and fnmatch.fnmatch(n, glob)]
        rows += [_row(f"timm:{n}", "timm", "thinning") for n in _timm_names(glob) or []]
        return rows
    timm_names = _timm_names("*")
    timm_about = (f"any of timm's {len(timm_names)} models, no weights, e.g. timm:resnet10t, timm:mobilenetv3_small_100"
                  if timm_names is not None else "timm models: not installed, pip install 'atc[timm]'")
    return [
        _row("wrn-D-K", "wrn", "family rule", "Wide ResNet, depth D = 6n+4, width K, e.g. wrn-40-4, wrn-16-2"),
        _row("resnetD, resnetD-wW", "cifar_resnet", "family rule",
             "CIFAR ResNet, D = 20/32/44/56/110 (cifar-resnetD: any 6n+2), stem width W (16), e.g. resnet56, resnet20-w8"),
        _row("resnet18/34/50/101/152[-cifar]", "resnet", "family rule",
             "torchvision-layout ResNet; -cifar: 3x3 stem, no max-pool, e.g. resnet18, resnet50-cifar"),
        _row(", ".join(TORCHVISION_GENERIC), "torchvision", "thinning", "torchvision models by bare name (same as tv:NAME), no weights"),
        _row("tv:NAME", "torchvision", "thinning",
             f"any of torchvision's {len(tv)} classification models, no weights, e.g. tv:resnet18, tv:convnext_tiny"),
        _row("timm:NAME", "timm", "thinning", timm_about),
        _row("path/to/file.py:ClassName", "file", "thinning", "your nn.Module, built with num_classes=N when it takes it"),
    ]


def create_model(name: str, num_classes: int = 10, **overrides: Any) -> nn.Module:
    """Build a model from its name, e.g. ``create_model('wrn-16-2', num_classes=10)`` or
    ``create_model('timm:resnet10t', num_classes=3)``; ``overrides`` go to the builder (and into the checkpoint)."""
    arch = parse_arch(name)
    return Arch(arch.family, {**arch.kwargs, **overrides}).build(num_classes)
