"""Teachers from other projects: where a file keeps its weights, how its keys map onto atc's module
names, which zoo architecture the weights are, and what to say when they do not fit.

Everything here works on the plain data ``checkpoint.read_file`` returned: no code from a file runs.
The formats, each tested against its project's own model definition (``tests/models/test_importers.py``):

- RepDistiller / mdistiller: ``{'model': sd, 'epoch', 'accuracy' or 'best_acc', 'optimizer'}``;
  RepDistiller's ``*_last.pth`` adds ``'opt'``, an ``argparse.Namespace`` whose ``model`` names the
  architecture. mdistiller's own training checkpoints hold the teacher and the student together
  (``module.student.*``, ``module.teacher.*``).
- torchdistill ``save_ckpt``: ``{'model', 'optimizer', 'best_value', 'lr_scheduler', 'args'}``.
- timm ``train.py``: ``{'arch', 'state_dict', 'state_dict_ema'?, 'optimizer', 'args', 'version'}``;
  ``arch`` (a timm name) is used when ``--arch`` is absent, the EMA weights when present (the weights
  train.py's best metric refers to when EMA is on).
- PyTorch Lightning ``.ckpt``: ``state_dict`` under the LightningModule's attribute (``model.``),
  ``hyper_parameters``.
- The paper's code (szagoruyko/attention-transfer): ``{'params', 'optimizer', 'epoch'}``, the
  functional WRN's flat keys ``conv0``, ``group0.block0.conv0``, ``…convdim``, renamed onto ``wrn-D-K``.
- The widespread public CIFAR WRN (``block1.layer.0.bn1``), DataParallel's ``module.`` prefix.

``argparse.Namespace`` is the one class the restricted unpickler is allowed to build beyond torch's
own list (``SAFE_GLOBALS``): building one sets attributes from already-unpickled plain values and
calls nothing the file names, so it runs no code of the file's choosing.
"""

from __future__ import annotations

import argparse
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.errors import CheckpointError, ModelError
from compressor.models.registry import Arch, parse_arch
from compressor.models.wrn import foreign_wrn_key, looks_like_foreign_wrn

SAFE_GLOBALS = [argparse.Namespace]

_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net", "params", "network", "weights")
_BN_COUNTER = "num_batches_tracked"  # absent from files that never had it (the paper's params); harmless to leave at 0


@dataclass
class Layout:
    """One reading of a file's keys: how it was obtained (a note, empty for the keys as they are) and the state_dict."""

    how: str
    state_dict: dict[str, torch.Tensor]
    group: str = ""  # for one of several models in a file: the prefix it sits under


@dataclass(frozen=True)
class Stats:
    """A teacher's normalisation that its file states or its project's code fixes, and where from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str


# attention-transfer's cifar.py normalises with these (pixel values 0..255); RepDistiller's and
# mdistiller's CIFAR-100 loaders with those.
PAPER_STATS = Stats(tuple(v / 255 for v in (125.3, 123.0, 113.9)), tuple(v / 255 for v in (63.0, 62.1, 66.7)),
                    "the paper's code (attention-transfer's cifar.py: mean (125.3, 123.0, 113.9)/255, std (63.0, 62.1, 66.7)/255)")
REPDISTILLER_CIFAR100 = Stats((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
                              "RepDistiller's CIFAR-100 loader (the file's opt.dataset is cifar100)")


@dataclass
class Weights:
    """The weights found in a file: what the file is, the key layouts to try (most specific first), the
    architecture the file itself names (an atc name), the normalisation it states (``stats``) and notes
    on how they were found."""

    source: str
    layouts: list[Layout]
    stored_arch: str | None = None
    notes: list[str] = field(default_factory=list)
    stats: Stats | None = None

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.layouts[0].state_dict


# ---------------------------------------------------------------- files that are not pickles


def _head(path: Path, n: int = 16) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON."""
    head = _head(path, 9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return 0 < size <= path.stat().st_size - 8


def _onnx_model(path: Path) -> Any | None:
    """The ONNX model in ``path`` (graph only, external data left unread), or None when it is not one.
    A protobuf ModelProto starts with field 1 (``ir_version``, byte 0x08); pickles and zips never do."""
    if _head(path, 1) != b"\x08" and path.suffix.lower() != ".onnx":
        return None
    try:
        import onnx

        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not parseable as ONNX: let torch.load say what it is
        return None
    return model if model.ir_version > 0 and len(model.graph.node) > 0 else None


def read_foreign(path: Path) -> dict[str, torch.Tensor] | None:
    """A safetensors file's tensors (a safe format: no pickle); a one-line refusal for an ONNX model;
    None for anything else (a torch checkpoint, or no checkpoint at all)."""
    if is_safetensors(path):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{path} is a safetensors file; pip install safetensors to read it") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - a damaged header or truncated data
            raise CheckpointError(f"{path} is a damaged safetensors file ({type(exc).__name__}); re-save or re-download it") from None
    onnx_model = _onnx_model(path)
    if onnx_model is not None:
        producer = f", made by {onnx_model.producer_name}" if onnx_model.producer_name else ""
        raise CheckpointError(f"{path} is an ONNX model (an inference graph{producer}), not PyTorch weights; atc distils from a PyTorch "
                              "model: pass the checkpoint it was exported from, or save one where the model is built with "
                              "torch.save(model.state_dict(), 'teacher.pt'), and --arch NAME if atc cannot tell the architecture")
    return None


def container(path: Path) -> str:
    """How the file is stored, in words (before anything in it is read as a checkpoint)."""
    import zipfile

    if is_safetensors(path):
        return "safetensors"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        head = _head(path, 2)
        return "a legacy torch.save pickle" if head[:1] == b"\x80" else "not a zip or pickle"
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return "a TorchScript archive"
    return "a torch.save zip archive"


def module_source(module: nn.Module) -> str:
    if isinstance(module, torch.jit.ScriptModule):
        return "a TorchScript file (torch.jit.save)"
    return f"a pickled nn.Module ({type(module).__name__}, loaded because of --trust-checkpoint)"


def not_rebuildable(path: str | Path, source: str) -> str:
    """Why a TorchScript file or pickled module cannot be a teacher to distil from, and the one line that fixes it."""
    loader = f"torch.jit.load({str(path)!r})" if source.startswith("a TorchScript") else f"torch.load({str(path)!r}, weights_only=False)"
    return (f"{path} is {source}: atc can run it but not rebuild its architecture by name; save its weights with "
            f"python -c \"import torch; torch.save({loader}.state_dict(), 'teacher_sd.pt')\" and pass --teacher teacher_sd.pt "
            "(with --arch NAME if atc cannot infer the architecture from the weights)")


# ---------------------------------------------------------------- where the weights are


def is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def find_weights(obj: Any) -> Weights | None:
    """The weights in a loaded file (a state_dict, or a dict holding one), or None when there are none."""
    if not isinstance(obj, dict):
        return None
    source, stored, notes = _identify(obj)
    state_dict, where = _nested_state_dict(obj)
    if state_dict is None:
        return None
    if where == "state_dict_ema":
        notes.append("using state_dict_ema, the EMA weights (the file also holds state_dict; to use those, re-save "
                     "torch.load(F)['state_dict'] as a plain state_dict)")
    return Weights(source, key_layouts(state_dict), stored, notes, stated_stats(obj))


def stated_stats(obj: dict) -> Stats | None:
    """The normalisation a file states, or that the code which wrote this format fixes: the paper's
    functional WRN, RepDistiller's ``_last.pth`` of a CIFAR-100 run, timm ``train.py``'s data config
    (its ``args.mean``/``args.std``, else the model's default configuration)."""
    if isinstance(obj.get("params"), dict) and any(".block0." in k for k in obj["params"]):
        return PAPER_STATS
    opt = obj.get("opt")
    if isinstance(opt, argparse.Namespace) and getattr(opt, "dataset", None) == "cifar100" and "model" in obj:
        return REPDISTILLER_CIFAR100
    args = obj.get("args")
    if isinstance(obj.get("arch"), str) and isinstance(args, argparse.Namespace):
        mean, std = getattr(args, "mean", None), getattr(args, "std", None)
        if _numbers(mean) and _numbers(std):
            return Stats(tuple(map(float, mean)), tuple(map(float, std)), "timm train.py's args.mean/args.std")
        return _timm_default_stats(obj["arch"])
    return None


def _numbers(values: Any) -> bool:
    return isinstance(values, (list, tuple)) and len(values) in (1, 3) and all(isinstance(v, (int, float)) for v in values)


def _timm_default_stats(name: str) -> Stats | None:
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - timm missing or the name unknown: nothing is stated
        return None
    if cfg is None or not (_numbers(getattr(cfg, "mean", None)) and _numbers(getattr(cfg, "std", None))):
        return None
    return Stats(tuple(map(float, cfg.mean)), tuple(map(float, cfg.std)),
                 f"timm's default data configuration for {name} (train.py uses it when args.mean/args.std are unset)")


def _identify(obj: dict) -> tuple[str, str | None, list[str]]:
    """What kind of file this is, the architecture it names (an atc name, or None) and notes."""
    keys = set(obj)
    if "pytorch-lightning_version" in keys or {"state_dict", "hyper_parameters"} <= keys or {"state_dict", "optimizer_states"} <= keys:
        return "a PyTorch Lightning checkpoint", None, []
    if isinstance(obj.get("arch"), str) and "state_dict" in keys:
        return "a timm train.py checkpoint", f"timm:{obj['arch']}", []
    if {"model", "lr_scheduler"} <= keys and ("best_value" in keys or "args" in keys):
        return "a torchdistill checkpoint (save_ckpt)", None, []
    if "opt" in keys and "model" in keys:
        return "a RepDistiller checkpoint (_last.pth)", repdistiller_arch(getattr(obj["opt"], "model", None)), []
    if "model" in keys and keys & {"accuracy", "best_acc", "epoch"}:
        return "a RepDistiller/mdistiller checkpoint ({'model': state_dict, …})", None, []
    if isinstance(obj.get("params"), dict) and any(".block0." in k for k in obj["params"]):
        return "the paper's functional WRN (attention-transfer's {'params', 'optimizer', 'epoch'})", None, []
    if keys == {"model"}:
        return "a {'model': state_dict} checkpoint (mdistiller, RepDistiller …)", None, []
    if is_tensor_dict(obj):
        return "a plain state_dict", None, []
    return "a checkpoint dict", None, []


def _nested_state_dict(obj: dict) -> tuple[dict[str, torch.Tensor] | None, str]:
    if is_tensor_dict(obj.get("state_dict_ema")) and isinstance(obj.get("arch"), str):  # timm's EMA weights
        return obj["state_dict_ema"], "state_dict_ema"
    for key in _NESTED_KEYS:
        if is_tensor_dict(obj.get(key)):
            return obj[key], key
    if is_tensor_dict(obj):
        return obj, ""
    dicts = [k for k, v in obj.items() if is_tensor_dict(v)]
    return (obj[dicts[0]], dicts[0]) if len(dicts) == 1 else (None, "")


def repdistiller_arch(name: Any) -> str | None:
    """RepDistiller's ``--model`` name as an atc name, where the zoo has it (``wrn_40_2`` → ``wrn-40-2``,
    ``resnet56`` → ``resnet56x1``: their CIFAR ResNets have 1x1-conv shortcuts)."""
    if not isinstance(name, str):
        return None
    if m := re.fullmatch(r"wrn_(\d+)_(\d+)", name):
        return f"wrn-{m.group(1)}-{m.group(2)}"
    if re.fullmatch(r"resnet\d+x\d+", name):
        return name
    if re.fullmatch(r"resnet\d+", name):
        return f"{name}x1"
    return None


# ---------------------------------------------------------------- key layouts


def key_layouts(state_dict: dict[str, torch.Tensor]) -> list[Layout]:
    """The readings of ``state_dict``'s keys to try against an architecture, most specific first: shared
    prefixes stripped (DataParallel's ``module.``, Lightning's ``model.``/``net.``, any one prefix every key
    has) and known foreign layouts renamed; then the keys as they are; then, for a file holding several
    models under a few prefixes (a distiller's ``student.``/``teacher.``), each model alone."""
    stripped, prefix = strip_shared_prefix(state_dict)
    layouts = []
    renamed, how = rename_known_layout(stripped)
    if renamed is not None:
        layouts.append(Layout(_join(_prefix_note(prefix), how), renamed))
    layouts.append(Layout(_prefix_note(prefix), stripped))
    if prefix:
        layouts.append(Layout("", state_dict))
    for group, others in _prefix_groups(stripped):
        inner = {k[len(group):]: v for k, v in stripped.items() if k.startswith(group)}
        renamed, how = rename_known_layout(inner)
        layouts.append(Layout(_join(f"took the weights under the prefix {group} (the file also holds {', '.join(others)})", how),
                              renamed if renamed is not None else inner, group))
    return layouts


def strip_shared_prefix(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """``state_dict`` without the dotted prefix every key shares (repeatedly: ``module.model.``), and that prefix."""
    prefix = ""
    while len(state_dict) > 1:
        firsts = {k.split(".", 1)[0] for k in state_dict}
        if len(firsts) != 1 or any("." not in k for k in state_dict):
            break
        head = firsts.pop() + "."
        prefix += head
        state_dict = {k[len(head):]: v for k, v in state_dict.items()}
    return state_dict, prefix


def _prefix_note(prefix: str) -> str:
    return f"stripped the prefix {prefix} that every key has" if prefix else ""


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _prefix_groups(state_dict: dict[str, torch.Tensor]) -> list[tuple[str, list[str]]]:
    """For keys under two or three top-level prefixes that each hold a whole model, each prefix and the others."""
    firsts = Counter(k.split(".", 1)[0] for k in state_dict if "." in k)
    if not 2 <= len(firsts) <= 3 or len(firsts) != len({k.split(".", 1)[0] for k in state_dict}):
        return []
    models = [p for p in firsts if any(k.startswith(p + ".") and v.dim() == 2 for k, v in state_dict.items())]
    if len(models) < 2:
        return []
    return [(p + ".", [o + "." for o in firsts if o != p]) for p in models]


def rename_known_layout(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The paper's functional WRN or the public CIFAR WRN renamed onto atc's ``wrn-D-K``; (None, "") for other keys."""
    if any(re.match(r"group\d+\.block\d+\.", k) for k in state_dict):
        return {paper_wrn_key(k): v for k, v in state_dict.items()}, "renamed the paper's functional WRN keys onto wrn-D-K"
    if looks_like_foreign_wrn(state_dict):
        return {foreign_wrn_key(k): v for k, v in state_dict.items()}, "renamed the public CIFAR WRN keys (block1.layer.0 …) onto wrn-D-K"
    return None, ""


def paper_wrn_key(key: str) -> str:
    """attention-transfer's functional WRN keys onto atc's: its convolutions are bare tensors
    (``conv0``, ``group1.block0.conv1``), its projection is ``convdim``: ``group1.block0.convdim`` →
    ``group1.0.shortcut.weight``."""
    key = re.sub(r"^(group\d+)\.block(\d+)\.", r"\1.\2.", key)
    key = re.sub(r"(^|\.)convdim$", r"\1shortcut", key)
    return key + ".weight" if re.search(r"(^|\.)(conv\d+|shortcut)$", key) else key


# ---------------------------------------------------------------- fitting weights to a model


@dataclass
class Mismatch:
    """How a layout differs from a model's state_dict: keys missing from the file, keys the model lacks, shapes that differ."""

    missing: list[str]
    unexpected: list[str]
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, shape in the file, shape in the model

    @property
    def size(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.shapes)


def compare(target: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor]) -> Mismatch:
    missing = [k for k in target if k not in state_dict and not k.endswith(_BN_COUNTER)]
    unexpected = [k for k in state_dict if k not in target and not k.endswith(_BN_COUNTER)]
    shapes = [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in state_dict.items()
              if k in target and tuple(v.shape) != tuple(target[k].shape)]
    return Mismatch(missing, unexpected, shapes)


def fit(model: nn.Module, weights: Weights, arch_name: str, where: str) -> list[str]:
    """Load ``weights`` into ``model`` through the first layout whose keys and shapes match it exactly;
    the notes say how. Otherwise raise one line naming the mismatch and what to do."""
    target = model.state_dict()
    tried = []
    for layout in weights.layouts:
        mismatch = compare(target, layout.state_dict)
        if mismatch.size == 0:
            model.load_state_dict({k: v for k, v in layout.state_dict.items() if k in target}, strict=False)
            return weights.notes + ([layout.how] if layout.how else [])
        tried.append((mismatch, layout))
    mismatch, layout = min(tried, key=lambda t: t[0].size)
    raise CheckpointError(mismatch_message(where, arch_name, mismatch, layout, weights))


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def mismatch_message(where: str, arch_name: str, mismatch: Mismatch, layout: Layout, weights: Weights) -> str:
    """One line: what does not fit (shapes whole), read after ``layout.how``, and the most useful hint."""
    parts = []
    if mismatch.shapes:
        key, got, want = mismatch.shapes[0]
        more = f" (+{len(mismatch.shapes) - 1} more shapes)" if len(mismatch.shapes) > 1 else ""
        parts.append(f"{key} is {_shape(got)} in the file but {_shape(want)} in {arch_name}{more}")
    if mismatch.missing:
        parts.append(f"missing from the file: {_few(mismatch.missing)}")
    if mismatch.unexpected:
        parts.append(f"not in {arch_name}: {_few(mismatch.unexpected)}")
    read = f" (after it {layout.how})" if layout.how else ""
    return f"{where} ({weights.source}) does not fit {arch_name}{read}: {'; '.join(parts)}; {_hint(mismatch, arch_name, weights)}"


def _hint(mismatch: Mismatch, arch_name: str, weights: Weights) -> str:
    for key, got, want in mismatch.shapes:
        if key == "conv1.weight" and len(got) == 4 and got[-1] == 3 and want[-1] == 7 and not arch_name.endswith("-cifar"):
            return f"the file's stem is a 3×3 convolution (a CIFAR-stem ResNet): pass --arch {arch_name}-cifar"
    prefix = _explaining_prefix(mismatch)
    if prefix is not None:
        rest = [k for k in mismatch.unexpected if not k.startswith(prefix)]
        beside = f", next to {len(rest)} other keys ({_few(rest, 2)})" if rest else ""
        return (f"its weights sit under the prefix {prefix} ({prefix}{mismatch.missing[0]} …){beside}: strip the prefix {prefix}, "
                f"e.g. torch.save({{k.removeprefix({prefix!r}): v for k, v in sd.items() if k.startswith({prefix!r})}}, 'fixed.pt')")
    inferred = infer_arch(weights)
    if inferred is not None and inferred.name != arch_name:
        return f"the weights are {inferred.name}: pass --arch {inferred.name}, or leave --arch out"
    return "pass the architecture these weights were trained with as --arch (atc models lists the names)"


def _explaining_prefix(mismatch: Mismatch) -> str | None:
    """The prefix P when every missing key is in the file as P + key (the rest of the file is other modules)."""
    if not mismatch.missing:
        return None
    unexpected = set(mismatch.unexpected)
    for p in sorted({k.split(".", 1)[0] + "." for k in unexpected if "." in k}):
        if all(p + k in unexpected for k in mismatch.missing):
            return p
    return None


# ---------------------------------------------------------------- which architecture


def classes_in(state_dict: dict[str, torch.Tensor]) -> int | None:
    if isinstance(state_dict.get("fc.weight"), torch.Tensor) and state_dict["fc.weight"].dim() == 2:
        return int(state_dict["fc.weight"].shape[0])
    linear = [v for k, v in state_dict.items() if k.endswith("weight") and v.dim() == 2]
    return int(linear[-1].shape[0]) if linear else None


def _blocks(state_dict: dict[str, torch.Tensor], stage: str) -> int:
    found = [int(m.group(1)) for k in state_dict if (m := re.match(rf"{re.escape(stage)}\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def _out(state_dict: dict[str, torch.Tensor], key: str) -> int:
    return int(state_dict[key].shape[0])


def _mult(channels: int, base: int) -> float:
    value = channels / base
    return int(value) if value.is_integer() else value


def _guesses(sd: dict[str, torch.Tensor]) -> list[Arch]:
    """Architectures the key names and shapes point to (checked exactly by ``_fits_exactly``)."""
    out: list[Arch] = []
    if "group0.0.conv0.weight" in sd and "conv0.weight" in sd:
        n = _blocks(sd, "group0")
        out.append(Arch("wrn", {"depth": 6 * n + 4, "width": _mult(_out(sd, "group0.0.conv0.weight"), 16)}))
    if "conv1.weight" not in sd or "layer1.0.conv1.weight" not in sd:
        return out
    if "layer4.0.conv1.weight" in sd:
        layers = [_blocks(sd, f"layer{i}") for i in range(1, 5)]
        block = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
        kwargs: dict[str, Any] = {"block": block, "layers": layers, "width": _mult(_out(sd, "layer1.0.conv1.weight"), 64)}
        if sd["conv1.weight"].shape[-1] == 3:
            kwargs["cifar_stem"] = True
        return out + [Arch("resnet", kwargs)]
    n, stem, first = _blocks(sd, "layer1"), _out(sd, "conv1.weight"), _out(sd, "layer1.0.conv1.weight")
    k = _mult(first, 16)
    out.append(Arch("kd_resnet", {"depth": 6 * n + 2, "k": k, "stem": stem}))
    out.append(Arch("cifar_resnet", {"depth": 6 * n + 2, "width": stem}))
    out.append(Arch("wrn_td", {"depth": 6 * n + 4, "width": k}))
    return out


def _canonical(arch: Arch) -> Arch:
    """``arch`` as its name parses it (drops arguments equal to their defaults, e.g. a default stem)."""
    try:
        return parse_arch(arch.name)
    except ModelError:
        return arch


def _fits_exactly(arch: Arch, sd: dict[str, torch.Tensor], classes: int) -> bool:
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            target = arch.build(classes).state_dict()
    except Exception:  # noqa: BLE001 - a guess with impossible arguments simply does not fit
        return False
    return compare(target, sd).size == 0


def _inferred(layout: Layout) -> Arch | None:
    classes = classes_in(layout.state_dict) or 10
    for guess in _guesses(layout.state_dict):
        arch = _canonical(guess)
        if _fits_exactly(arch, layout.state_dict, classes):
            return arch
    return None


def infer_arch(weights: Weights) -> Arch | None:
    """The zoo architecture whose state_dict has exactly these keys and shapes, tried on each key
    layout in turn (for a file holding several models, the first one's)."""
    for layout in weights.layouts:
        if (arch := _inferred(layout)) is not None:
            return arch
    return None


def _several_models(weights: Weights) -> list[tuple[str, Arch]]:
    """(prefix, architecture) of each model in a file that holds several under their own prefixes."""
    found = []
    for layout in weights.layouts:
        if layout.group and (arch := _inferred(layout)) is not None:
            found.append((layout.group, arch))
    return found


def choose_arch(weights: Weights, arch: str | None, where: str) -> tuple[Arch, list[str]]:
    """The architecture to build: ``--arch`` when given, else the one the file names, else the one the
    weights show; the notes say which."""
    if arch is not None:
        return parse_arch(arch), []
    notes = []
    if weights.stored_arch is not None:
        try:
            named = parse_arch(weights.stored_arch)
            return named, [f"--arch {named.name}: named by the file ({weights.source})"]
        except ModelError as exc:
            notes.append(f"the file names {weights.stored_arch}, which atc cannot build here ({exc})")
    several = _several_models(weights)
    if len(several) > 1:
        listed = ", ".join(f"{a.name} under {p}" for p, a in several)
        raise CheckpointError(f"{where} holds {len(several)} models ({listed}); pass --arch with the one to use, "
                              f"e.g. --arch {several[-1][1].name}")
    inferred = infer_arch(weights)
    if inferred is not None:
        return inferred, notes + [f"inferred --arch {inferred.name} from the weights"]
    raise CheckpointError(f"{where} is {weights.source} whose architecture atc cannot tell from its keys; pass --arch NAME "
                          "(e.g. --arch wrn-40-4; atc models lists the names) so atc knows what to build")
