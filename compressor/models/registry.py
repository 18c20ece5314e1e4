"""One registry of model builders by name, so a checkpoint can store a name plus keyword
arguments and rebuild the module.

Names: ``wrn-D-K`` (e.g. ``wrn-40-4``; ``wrn-D-K-td`` for torchdistill's block), CIFAR ResNets
``resnet20/32/56/110`` (and ``cifar-resnetD`` for any 6n+2 depth), the KD literature's CIFAR ResNets
``resnetDxK`` (``resnet8x4``, ``resnet32x4``, ``resnet56x1``: 1x1-conv shortcuts), torchvision's ``resnet18/34/50/101/152`` (``-cifar``
for a 3x3 stem without max-pool), a few torchvision classifiers by their bare names, any
torchvision classification builder as ``tv:NAME`` and any timm model as ``timm:NAME`` (always
built without pretrained weights; the data sets ``num_classes``), and a user's own model as
``path/to/file.py:ClassName`` (family ``file``: the checkpoint stores the file's absolute path and
the class name, so the file must stay where it is to rebuild the model). ``list_models(pattern)``
returns the names, ``describe_models()`` says all of this as rows of plain data.
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

from compressor.errors import ModelError, shown
from compressor.models.resnet import CifarResNet, KdCifarResNet, ScalableResNet, kd_resnet_stem
from compressor.models.wrn import RawShortcutWideResNet, WideResNet

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
        if self.family not in FAMILIES:
            raise ModelError(f"this checkpoint's model family {self.family!r} is unknown to this atc; upgrade atc")
        return FAMILIES[self.family].build(num_classes=num_classes, **self.kwargs)


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


@dataclass(frozen=True)
class Family:
    """One kind of architecture, registered once: how to build it, which names it owns, how it
    names its models, and how ``atc models`` lists it.

    ``parse(name)`` returns the builder's keyword arguments for a name the family owns (raising a
    one-line ``ModelError`` for an owned name that is wrong), or None for a name it does not own.
    ``prefix`` families own ``PREFIX:REST`` names and see only REST. ``names(glob)`` lists the
    names matching a pattern (for ``list_models(pattern)``, ``describe_models(pattern)`` and "did you mean" suggestions).
    ``derive``: how ``atc compress`` derives a student (``"family rule"``, in ``derive/rules.py``,
    or ``"thinning"``)."""

    name: str
    build: Callable[..., nn.Module]
    parse: Callable[[str], dict[str, Any] | None]
    display: Callable[[dict[str, Any]], str]
    rows: Callable[[], list[dict[str, str]]]
    names: Callable[[str], list[str]] = lambda glob: []
    prefixes: tuple[str, ...] = ()
    derive: str = "thinning"
    vet: Callable[[dict[str, Any]], str | None] = lambda kwargs: None

    def vet_stored(self, kwargs: Any) -> str | None:
        """Check builder arguments read from a file (``models/trust.py`` decides on what this returns):
        plain data, accepted by the builder, none naming a file, a folder or a download, and the
        family's own check (``vet``: a known torchvision/timm name, a Python file's path). Returns the
        Python file the builder would import, or None. Raises a one-line ``ModelError``."""
        if not isinstance(kwargs, dict) or not plain_data(kwargs):
            raise ModelError(f"arch_kwargs must be a dict of plain values, got {type(kwargs).__name__}")
        source = self.vet(kwargs)
        reaching = [k for k in kwargs if SOURCE_KEY.search(k) and not (source is not None and k == "path")]
        if reaching:
            raise ModelError(f"the {self.name} builder argument {reaching[0]!r} would read a file or download weights")
        try:
            inspect.signature(self.build).bind(num_classes=1, **kwargs)
        except TypeError as exc:
            raise ModelError(f"arch_kwargs {sorted(kwargs)} do not fit the {self.name} builder ({exc})") from None
        return source


FAMILIES: dict[str, Family] = {}

# Builder arguments that would make a builder read a file or download something (timm's
# checkpoint_path, pretrained_cfg_overlay=dict(file=…); torchvision's weights, weights_backbone).
SOURCE_KEY = re.compile(r"path|file|dir|url|uri|checkpoint|pretrained|weights|hub|cache|download|repo|source", re.I)


def plain_data(value: Any) -> bool:
    """Whether ``value`` is plain data: numbers, strings, None, and lists or string-keyed dicts of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain_data(v) for k, v in value.items())
    return False


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def _fmt(x: float) -> str:
    return f"{x:g}"


def _row(names: str, family: str, derive: str, about: str = "") -> dict[str, str]:
    """One row of ``describe_models()``: ``names`` as ``--arch`` takes them (a name, names or a pattern),
    the registry ``family`` a checkpoint stores, how ``atc compress`` derives a student from it
    (``"family rule"`` or ``"thinning"``), and what it is."""
    return {"names": names, "family": family, "derive": derive, "about": about}


def _matching(names: list[str], glob: str) -> list[str]:
    import fnmatch

    return [n for n in names if fnmatch.fnmatch(n, glob)]


# ---------------------------------------------------------------- the zoo (registration order is parse order:
# torchvision-layout resnet50 before the CIFAR family's 6n+2 depths, which 50 also is)


def _parse_wrn(key: str) -> dict[str, Any] | None:
    if m := re.fullmatch(r"wrn-(\d+)-(\d+(?:\.\d+)?)", key):
        depth, width = int(m.group(1)), float(m.group(2))
        if (depth - 4) % 6 == 0 and depth >= 10:
            return {"depth": depth, "width": int(width) if width.is_integer() else width}
    return None


WRN_NAMES = [f"wrn-{d}-{k}" for d in (10, 16, 22, 28, 40) for k in (1, 2, 4, 8, 10)]
register(Family(
    "wrn", WideResNet, _parse_wrn, lambda kw: f"wrn-{kw['depth']}-{_fmt(kw['width'])}",
    lambda: [_row("wrn-D-K", "wrn", "family rule", "Wide ResNet, depth D = 6n+4, width K, e.g. wrn-40-4, wrn-16-2")],
    lambda glob: _matching(WRN_NAMES, glob), derive="family rule"))


def _parse_resnet(key: str) -> dict[str, Any] | None:
    base, cifar_stem = (key[: -len("-cifar")], True) if key.endswith("-cifar") else (key, False)
    if base not in IMAGENET_RESNETS:
        return None
    block, layers = IMAGENET_RESNETS[base]
    return {"block": block, "layers": layers, "width": 1.0, **({"cifar_stem": True} if cifar_stem else {})}


def _resnet_name(kw: dict[str, Any]) -> str:
    layers = list(kw.get("layers", []))
    std = next((n for n, (b, lay) in IMAGENET_RESNETS.items() if lay == layers and b == kw.get("block")), None)
    name = std or f"resnet-{kw.get('block')}-{'.'.join(map(str, layers))}"
    if kw.get("width", 1.0) != 1.0:
        name += f"-x{_fmt(kw['width'])}"
    return name + ("-cifar" if kw.get("cifar_stem") else "")


register(Family(
    "resnet", ScalableResNet, _parse_resnet, _resnet_name,
    lambda: [_row("resnet18/34/50/101/152[-cifar]", "resnet", "family rule",
                  "torchvision-layout ResNet; -cifar: 3x3 stem, no max-pool, e.g. resnet18, resnet50-cifar")],
    lambda glob: _matching(list(IMAGENET_RESNETS) + [f"{n}-cifar" for n in IMAGENET_RESNETS], glob), derive="family rule"))


def _parse_cifar_resnet(key: str) -> dict[str, Any] | None:
    if m := re.fullmatch(r"(?:cifar-)?resnet(\d+)(?:-w(\d+))?", key):
        depth, width = int(m.group(1)), int(m.group(2) or 16)
        if (depth - 2) % 6 == 0 and depth >= 8:
            return {"depth": depth, "width": width}
    return None


def _cifar_resnet_name(kw: dict[str, Any]) -> str:
    base = f"resnet{kw['depth']}" if kw["depth"] in CIFAR_RESNET_DEPTHS else f"cifar-resnet{kw['depth']}"
    return base if kw.get("width", 16) == 16 else f"{base}-w{kw['width']}"


register(Family(
    "cifar_resnet", CifarResNet, _parse_cifar_resnet, _cifar_resnet_name,
    lambda: [_row("resnetD, resnetD-wW", "cifar_resnet", "family rule",
                  "CIFAR ResNet, D = 20/32/44/56/110 (cifar-resnetD: any 6n+2), stem width W (16), e.g. resnet56, resnet20-w8")],
    lambda glob: _matching([f"resnet{d}" for d in CIFAR_RESNET_DEPTHS], glob), derive="family rule"))


def _parse_kd_resnet(key: str) -> dict[str, Any] | None:
    if not (m := re.fullmatch(r"resnet(\d+)x(\d+(?:\.\d+)?)(?:-s(\d+))?", key)):
        return None
    depth, k = int(m.group(1)), float(m.group(2))
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ModelError(f"{key}: the depth of a CIFAR ResNet is 6n+2 (8, 14, 20, 32, 44, 56, 110 …); e.g. resnet32x4, resnet56x1")
    if k <= 0 or not float(16 * k).is_integer():
        raise ModelError(f"{key}: the width multiplier K must make 16K a whole number of channels (e.g. x0.5, x1, x4)")
    kwargs: dict[str, Any] = {"depth": depth, "k": int(k) if k.is_integer() else k}
    if m.group(3) and int(m.group(3)) != kd_resnet_stem(k):
        kwargs["stem"] = int(m.group(3))
    return kwargs


def _kd_resnet_name(kw: dict[str, Any]) -> str:
    stem = kw.get("stem")
    return f"resnet{kw['depth']}x{_fmt(kw['k'])}" + (f"-s{stem}" if stem and stem != kd_resnet_stem(kw["k"]) else "")


KD_RESNET_NAMES = ["resnet8x4", "resnet32x4"] + [f"resnet{d}x1" for d in (8, 14, 20, 32, 44, 56, 110)]
register(Family(
    "kd_resnet", KdCifarResNet, _parse_kd_resnet, _kd_resnet_name,
    lambda: [_row("resnetDxK[-sS]", "kd_resnet", "family rule",
                  "CIFAR ResNet of the KD literature (RepDistiller, mdistiller, torchdistill): 1x1-conv+BN shortcuts, stages "
                  "16K/32K/64K after a stem of S = min(16K, 32), e.g. resnet8x4, resnet32x4, resnet56x1 (their resnet56)")],
    lambda glob: _matching(KD_RESNET_NAMES, glob), derive="family rule"))


def _parse_wrn_td(key: str) -> dict[str, Any] | None:
    if (m := re.fullmatch(r"(wrn-\d+-\d+(?:\.\d+)?)-td", key)) and (kwargs := _parse_wrn(m.group(1))) is not None:
        return kwargs
    return None


register(Family(
    "wrn_td", RawShortcutWideResNet, _parse_wrn_td, lambda kw: f"wrn-{kw['depth']}-{_fmt(kw['width'])}-td",
    lambda: [_row("wrn-D-K-td", "wrn_td", "family rule",
                  "torchdistill's Wide ResNet: its 1x1 shortcut takes the raw block input, e.g. wrn-40-4-td")],
    lambda glob: _matching([f"{n}-td" for n in WRN_NAMES], glob), derive="family rule"))


# ---------------------------------------------------------------- other libraries' models and the user's own


def _parse_torchvision(name: str) -> dict[str, Any] | None:
    """``tv:NAME`` (any classification builder), and the bare names of ``TORCHVISION_GENERIC``."""
    if name.startswith("tv:"):
        rest = name[3:].strip()
        names = torchvision_names()
        key = rest if rest in names else rest.lower()
        if key in names:
            return {"name": key}
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
        raise _unknown(f"torchvision has no classification model {rest!r}", ["tv:" + c for c in close],
                       "(torchvision.models.list_models(module=torchvision.models) lists torchvision's)")
    return {"name": name.lower()} if name.lower() in TORCHVISION_GENERIC else None


def _torchvision_rows() -> list[dict[str, str]]:
    tv = torchvision_names()
    return [_row(", ".join(TORCHVISION_GENERIC), "torchvision", "thinning", "torchvision models by bare name (same as tv:NAME), no weights"),
            _row("tv:NAME", "torchvision", "thinning",
                 f"any of torchvision's {len(tv)} classification models, no weights, e.g. tv:resnet18, tv:convnext_tiny")]


def _vet_torchvision(kwargs: dict[str, Any]) -> None:
    """A stored torchvision name must be one of its classification builders: ``get_model`` would
    also build detection models, whose default backbone weights are downloaded."""
    name = kwargs.get("name")
    if not isinstance(name, str) or name not in torchvision_names():
        raise ModelError(f"torchvision name {name!r} is not one of torchvision's classification models")


register(Family(
    "torchvision", _torchvision_model, _parse_torchvision,
    # a bare name only where it parses back to torchvision (not resnet18: that is the zoo's)
    lambda kw: kw["name"] if kw["name"] in TORCHVISION_GENERIC else f"tv:{kw['name']}",
    _torchvision_rows,
    lambda glob: _matching(list(TORCHVISION_GENERIC), glob)
    + [f"tv:{n}" for n in _matching(torchvision_names(), glob) if n not in TORCHVISION_GENERIC],
    prefixes=("tv", "torchvision"), vet=_vet_torchvision))


def _parse_timm(name: str) -> dict[str, Any] | None:
    if not name.startswith("timm:"):
        return None
    rest = name[5:].strip()
    timm = _import_timm()
    if ":" in rest or "/" in rest:
        raise ModelError(f"timm:{rest} names a hub or file source; atc builds timm models without weights, so pass "
                         "the architecture name alone, e.g. timm:resnet18")
    key = rest if timm.is_model(rest) else rest.lower()
    if timm.is_model(key):
        return {"name": key}
    close = difflib.get_close_matches(key, timm.list_models(), n=3, cutoff=0.6)
    raise _unknown(f"timm has no model {rest!r}", ["timm:" + c for c in close], f"(timm.list_models('*{key}*') lists timm's)")


def _timm_names(pattern: str) -> list[str] | None:
    try:
        import timm
    except ImportError:
        return None
    return timm.list_models(pattern)


def _timm_rows() -> list[dict[str, str]]:
    names = _timm_names("*")
    about = (f"any of timm's {len(names)} models, no weights, e.g. timm:resnet10t, timm:mobilenetv3_small_100"
             if names is not None else "timm models: not installed, pip install 'atc[timm]'")
    return [_row("timm:NAME", "timm", "thinning", about)]


def _vet_timm(kwargs: dict[str, Any]) -> None:
    """A stored timm name must be a plain architecture name (``hf-hub:``/``local-dir:`` names read a
    config from the Hub or a folder even without weights)."""
    name = kwargs.get("name")
    try:
        known = isinstance(name, str) and _parse_timm(f"timm:{name}") == {"name": name}
    except ModelError:
        known = False
    if not known:
        raise ModelError(f"timm name {name!r} is not one of timm's architectures" if "timm" in sys.modules or name else TIMM_MISSING)


register(Family("timm", _timm_model, _parse_timm, lambda kw: f"timm:{kw['name']}", _timm_rows,
                lambda glob: [f"timm:{n}" for n in _timm_names(glob) or []], prefixes=("timm",), vet=_vet_timm))


def _parse_file(name: str) -> dict[str, Any] | None:
    if not (m := re.fullmatch(r"(.+\.py):([A-Za-z_]\w*)", name)):
        return None
    file = Path(m.group(1)).expanduser()
    if file.exists() and not file.is_file():
        raise ModelError(f"model file {shown(file)} is a folder, not a Python file; pass --arch path/to/file.py:ClassName")
    if not file.is_file():
        raise ModelError(f"model file {shown(file)} does not exist; pass --arch path/to/file.py:ClassName")
    return {"path": str(file.resolve()), "class_name": m.group(2)}


def _vet_file(kwargs: dict[str, Any]) -> str:
    """The Python file a stored ``file`` spec imports (whether it may is ``models/trust.py``'s question)."""
    path, class_name = kwargs.get("path"), kwargs.get("class_name")
    if not isinstance(path, str) or not path.endswith(".py"):
        raise ModelError(f"the file family needs arch_kwargs.path, a .py file, got {path!r}")
    if not isinstance(class_name, str) or not class_name.isidentifier():
        raise ModelError(f"the file family needs arch_kwargs.class_name, a Python class name, got {class_name!r}")
    return path


register(Family("file", _file_model, _parse_file, lambda kw: kw["class_name"], vet=_vet_file,
                rows=lambda: [_row("path/to/file.py:ClassName", "file", "thinning", "your nn.Module, built with num_classes=N when it takes it")]))


# ---------------------------------------------------------------- names


def display_name(family: str, kwargs: dict[str, Any]) -> str:
    return FAMILIES[family].display(kwargs) if family in FAMILIES else family


def known_names() -> list[str]:
    """The zoo's names (and torchvision's bare ones): what "did you mean" suggests from."""
    return [n for f in FAMILIES.values() if not f.prefixes and f.name != "file" for n in f.names("*")]


FIND_NAMES = "run `atc models` for how to name models"


def _unknown(what: str, close: list[str], where: str) -> ModelError:
    """One line: what is unknown, the closest names, and how to find the right one."""
    if close:
        return ModelError(f"{what}; did you mean {', '.join(close)}? {FIND_NAMES.capitalize()} {where}")
    return ModelError(f"{what}; {FIND_NAMES} {where}")


def parse_arch(name: str) -> Arch:
    """Turn a zoo name, ``tv:NAME``, ``timm:NAME`` or ``file.py:ClassName`` into an ``Arch``: the first
    registered family that owns the name parses it; unknown names raise with the closest known ones."""
    text = name.strip()
    prefix, sep, rest = text.partition(":")
    for family in FAMILIES.values():
        if sep and prefix.lower() in family.prefixes:  # tv:NAME, torchvision:NAME, timm:NAME
            kwargs = family.parse(f"{family.prefixes[0]}:{rest.strip()}")
        elif family.name == "file":
            kwargs = family.parse(text)
        else:
            kwargs = family.parse(text.lower() if not family.prefixes else text)
        if kwargs is not None:
            return Arch(family.name, kwargs)
    close = difflib.get_close_matches(text.lower(), known_names(), n=3, cutoff=0.5)
    raise _unknown(f"unknown architecture {name!r}", close,
                   "(tv:NAME for torchvision's, timm:NAME for timm's, path/to/file.py:ClassName for your own)")


def list_models(pattern: str | None = None) -> list[str]:
    """The names atc builds that match ``pattern`` (a glob such as ``"*mobilenet*"``; a bare word matches
    anywhere; None: every name), as ``create_model`` and ``--arch`` take them: zoo, torchvision and
    (when installed) timm. Nothing is built or downloaded. ``describe_models`` gives the family table."""
    glob = "*" if pattern is None else pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    return [n for f in FAMILIES.values() for n in f.names(glob)]


def describe_models(pattern: str | None = None) -> list[dict[str, str]]:
    """The architectures atc builds, as rows of plain data (``names``, ``family``, ``derive``,
    ``about``; see ``_row``): every registered family's name patterns with examples, and how to
    name any other torchvision or timm model or your own class (what ``atc models`` prints).

    With ``pattern`` (a glob such as ``"*mobilenet*"``; a bare word matches anywhere) there is one
    row per matching name: zoo, torchvision and (when installed) timm. Nothing is built or downloaded.
    """
    if pattern is None:
        return [row for f in FAMILIES.values() for row in f.rows()]
    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    return [_row(n, f.name, f.derive) for f in FAMILIES.values() for n in f.names(glob)]


def create_model(name: str, num_classes: int = 10, **overrides: Any) -> nn.Module:
    """Build a model from its name, e.g. ``create_model('wrn-16-2', num_classes=10)`` or
    ``create_model('timm:resnet10t', num_classes=3)``; ``overrides`` go to the builder (and into the checkpoint)."""
    arch = parse_arch(name)
    return Arch(arch.family, {**arch.kwargs, **overrides}).build(num_classes)
