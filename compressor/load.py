"""The load step, shared by every command that needs a teacher and its data (compress, the dry
run, sweep, attention): the checkpoint and the dataset, checked against each other (classes, input
size), and the teacher's spec completed from the data where the checkpoint had nothing to say
(input size, normalisation, class names)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.config import Config, check_mean_std
from compressor.data.folders import find_layout
from compressor.data.open import Dataset, open_dataset, open_for_device
from compressor.device import example_input
from compressor.errors import ConfigError, DataError, shown
from compressor.events import SILENT, Reporter
from compressor.models.checkpoint import LoadedModel, read_model, weights_digest
from compressor.models.importers import not_rebuildable
from compressor.models.outputs import ensure_logits
from compressor.models.spec import ModelSpec
from compressor.models.trust import NO_TRUST, Trust
from compressor.options import RunOptions


def preset_for_data(spec: str | Path) -> tuple[str, str]:
    """The preset a command uses when none is given, from the data: ``(name, why)``. The bundled digits
    take ``demo`` (16 px, 12 epochs), torchvision's CIFAR-100 folder ``cifar100``, anything else ``cifar``."""
    text = str(spec)
    if text == "digits":
        return "demo", "the data is the bundled digits"
    if text != "shapes":
        try:
            kind, _ = find_layout(Path(text).expanduser())
        except DataError:
            kind = ""  # the data step says what is wrong with it, in its own words
        if kind == "cifar100":
            return "cifar100", "the data is torchvision's CIFAR-100 folder"
    return "cifar", "the default for 32 px data"


def load_data(spec: str | Path, cfg: Config, strict: bool = False, reporter: Reporter = SILENT,
              device: torch.device | None = None, workers: int | None = None, budget_bytes: int | None = None) -> Dataset:
    """The dataset, subset as the preset says. With ``device``, data too large for the memory it may
    use there is not loaded but streamed (``compressor.data.streaming``); the decision is reported."""
    image_size = cfg.data.image_size if str(spec) == "digits" or cfg.data.image_size else None
    data: Dataset
    if device is not None:
        data = open_for_device(spec, image_size, device, strict=strict, train_subset=cfg.data.train_subset,
                               test_subset=cfg.data.test_subset, budget_bytes=budget_bytes, workers=workers, reporter=reporter)
    else:
        # The subset is part of the data, not of the run: the same images whatever the training seed.
        data = open_dataset(spec, image_size=image_size, strict=strict, reporter=reporter).subset(cfg.data.train_subset,
                                                                                                  cfg.data.test_subset, seed=0)
    missing = data.num_classes - int(torch.unique(data.train_y).numel())
    if missing > 0:
        reporter.info(f"note: the training images cover {data.num_classes - missing} of the {data.num_classes} classes "
                      f"(data.train_subset {cfg.data.train_subset or 'all'}); {missing} class(es) are never taught")
    if data.skipped_files:
        reporter.info(f"skipped {len(data.skipped_files)} unreadable image(s), e.g. {data.skipped_files[0]} (--strict-data makes this fatal)")
    for note in data.notes:
        reporter.info(note)
    return data


def check_compatible(spec: ModelSpec, data: Dataset, role: str = "teacher") -> None:
    if spec.num_classes != data.num_classes:
        raise DataError(f"the {role} has {spec.num_classes} classes but the data has {data.num_classes}; "
                        "use data with the same classes or another checkpoint")
    if spec.input_size[0] != data.input_size[0]:  # the image size can be changed, the channels cannot
        raise DataError(f"the {role} takes {spec.input_size[0]}-channel images but the data is {data.input_size[0]}-channel "
                        "(atc reads every image as RGB); use a model built for RGB input")
    if tuple(spec.input_size) != tuple(data.input_size):
        raise DataError(f"the {role} expects input {'x'.join(map(str, spec.input_size))} but the data is "
                        f"{'x'.join(map(str, data.input_size))}; set data.image_size in the preset or use matching data")


def normalization(spec: ModelSpec, data: Dataset) -> tuple[list[float], list[float]]:
    """The model's own mean and std where its spec has them, else the training images' statistics."""
    if spec.mean is not None and spec.std is not None:
        return list(spec.mean), list(spec.std)
    return data.channel_stats()


@dataclass(frozen=True)
class Normalization:
    """The mean and std images are normalised with (for the teacher and, stored with it, the student)
    and where they come from, in words."""

    mean: list[float]
    std: list[float]
    source: str

    def describe(self) -> str:
        def fmt(v: list[float]) -> str:
            return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"

        return f"normalisation: mean {fmt(self.mean)}, std {fmt(self.std)}, {self.source}"


def _per_channel(values: tuple[float, ...] | list[float], channels: int = 3) -> list[float]:
    return [float(v) for v in values] * (channels if len(values) == 1 else 1)


def stated_normalization(cfg: Config, options: RunOptions = RunOptions(),
                         stated: tuple[list[float], list[float], str] | None = None, teacher: bool = True) -> Normalization | None:
    """The normalisation someone states, first that applies: ``--mean``/``--std``; what the checkpoint
    states (``stated``: mean, std and where from); the preset's ``data.mean``/``data.std``. None when
    nobody does (then the data's statistics are the fallback)."""
    check_mean_std(options.mean, options.std, "--mean/--std")
    if options.mean:
        mean, std = _per_channel(options.mean), _per_channel(options.std)
        overridden = f" (instead of those of {stated[2]})" if stated is not None and (stated[0], stated[1]) != (mean, std) else ""
        return Normalization(mean, std, f"from --mean/--std{overridden}")
    if stated is not None:
        return Normalization(list(stated[0]), list(stated[1]), f"from {stated[2]}")
    if cfg.data.mean:
        why = ": nothing in the teacher's file states its own" if teacher else ""
        return Normalization(_per_channel(cfg.data.mean), _per_channel(cfg.data.std), f"from the preset {cfg.preset} (data.mean/data.std){why}")
    return None


def choose_normalization(cfg: Config, data: Dataset, options: RunOptions = RunOptions(),
                         stated: tuple[list[float], list[float], str] | None = None, teacher: bool = True) -> Normalization:
    """``stated_normalization``, else the statistics measured from the training images, said as such (that
    fallback changes with ``--train-subset``). ``teacher=False``: for a model about to be trained
    (``atc train``), which will store what it was trained with."""
    if (norm := stated_normalization(cfg, options, stated, teacher)) is not None:
        return norm
    mean, std = data.channel_stats()
    why = (": nothing states the teacher's own, so pass --mean/--std with the statistics it was trained with" if teacher
           else " (the checkpoint stores them)")
    return Normalization(list(mean), list(std), f"measured from the {len(data.train_y):,} training images{why}")


@dataclass
class TeacherAndData:
    """A trained teacher ready for the data it will teach on: its spec carries the input size,
    normalisation and class names (taken from the data where the checkpoint had none); ``metrics``
    are those stored in its checkpoint (top-1, history, …)."""

    model: nn.Module
    spec: ModelSpec
    metrics: dict[str, Any]
    data: Dataset
    trust: Trust = NO_TRUST  # what this command lets stored files import; reloading atc's own outputs takes it too

    @cached_property
    def teacher_digest(self) -> str:
        """The teacher's weights digest (``models.checkpoint.weights_digest``), computed once: what a
        resumed student must have been distilled from."""
        return weights_digest(self.model)

    @property
    def mean_std(self) -> tuple[list[float], list[float]]:
        assert self.spec.mean is not None and self.spec.std is not None  # load_teacher_and_data sets both
        return list(self.spec.mean), list(self.spec.std)


def load_teacher_and_data(teacher_path: str | Path, data_spec: str | Path, cfg: Config, options: RunOptions = RunOptions(), *,
                          reporter: Reporter = SILENT, device: torch.device | None = None,
                          data: Dataset | None = None) -> TeacherAndData:
    """The one "load teacher and data" step of compress, the dry run, sweep and attention. From
    ``options``: ``arch`` and ``trust`` (reading the checkpoint), ``strict_data`` and the DataLoader
    workers (``speed.workers``, for data streamed to ``device``). ``data``: already loaded by a
    caller that had to look at it first."""
    trust = Trust.given(options.trust, options.arch)
    loaded = read_model(teacher_path, arch=options.arch, trust=trust)
    teacher, spec, metrics = loaded.model, loaded.spec, loaded.metrics
    if spec.family == "module":
        raise ConfigError(not_rebuildable(teacher_path, loaded.source))
    for note in loaded.notes:
        reporter.info(f"teacher: {note}")
    if data is None:
        data = load_data(data_spec, cfg, options.strict_data, reporter, device=device, workers=options.speed.workers)
    spec = replace(spec, input_size=spec.input_size if loaded.stores_input_size else tuple(data.input_size))
    check_compatible(spec, data)
    if note := ensure_logits(teacher, example_input(teacher, spec.input_size, batch=2), "the teacher"):
        reporter.info(f"teacher: {note}")
    if spec.class_names and list(spec.class_names) != list(data.class_names):
        reporter.info(f"note: the teacher's classes ({_few(spec.class_names)}) are not named like the data's "
                      f"({_few(data.class_names)}); labels are matched by position, so check that the order is the same")
    stated = (list(spec.mean), list(spec.std), loaded.norm_source) if spec.mean is not None and spec.std is not None else None
    norm = choose_normalization(cfg, data, options, stated)
    reporter.info(norm.describe())
    spec = replace(spec, mean=norm.mean, std=norm.std, class_names=list(spec.class_names or data.class_names))
    return TeacherAndData(teacher, spec, metrics, data, trust)


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(shown(x) for x in names[:n]) + (", …" if len(names) > n else "")


@dataclass
class TeacherInfo:
    """What ``atc inspect`` says about a checkpoint, without loading any data: the file, its format,
    the architecture atc builds and how it knows, the classes, the input size and the normalisation
    atc would use (and why), the model's size and the notes atc would print when loading it."""

    path: str
    container: str
    format: str
    architecture: str
    family: str
    architecture_from: str
    num_classes: int
    class_names: list[str]
    input_size: list[int]
    input_size_from: str
    mean: list[float] | None
    std: list[float] | None
    normalisation_from: str
    params: int
    output: str
    metrics: dict[str, Any]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _arch_source(loaded: LoadedModel, options: RunOptions) -> str:
    if loaded.stores_input_size:
        return "the checkpoint"
    if options.arch is not None:
        return "--arch"
    named = [n for n in loaded.notes if "named by the file" in n]
    return "named by the file" if named else "inferred from the weights"


def inspect_teacher(path: str | Path, cfg: Config, options: RunOptions = RunOptions()) -> TeacherInfo:
    """``atc inspect``: read the checkpoint as ``compress`` would (``options.arch``/``trust``/``mean``/``std``,
    the preset's image size and statistics), build the model and run it once on a zero batch; no data."""
    from compressor.models.importers import container

    loaded = read_model(path, arch=options.arch, trust=options.trust)
    spec = loaded.spec
    if spec.family == "module":
        raise ConfigError(not_rebuildable(path, loaded.source))
    if loaded.stores_input_size:
        size, size_from = list(spec.input_size), "the checkpoint"
    else:
        size = [3, cfg.data.image_size, cfg.data.image_size]
        size_from = f"the preset {cfg.preset}'s data.image_size: the file states none, so the data is resized to it"
    output = ensure_logits(loaded.model, example_input(loaded.model, tuple(size), batch=2), "the model") or "logits"
    stated = (list(spec.mean), list(spec.std), loaded.norm_source) if spec.mean is not None and spec.std is not None else None
    norm = stated_normalization(cfg, options, stated)
    if norm is not None:
        mean, std, norm_from = norm.mean, norm.std, norm.source
    else:
        mean, std, norm_from = None, None, ("measured from the training images when the data is loaded: nothing states the "
                                            "teacher's own (pass --mean/--std, or a preset with data.mean/data.std)")
    params = sum(p.numel() for p in loaded.model.parameters())
    return TeacherInfo(str(path), container(Path(path)), loaded.source, spec.name, spec.family, _arch_source(loaded, options),
                       spec.num_classes, list(spec.class_names), size, size_from, mean, std, norm_from, params, output,
                       {k: v for k, v in loaded.metrics.items() if k != "history"}, loaded.notes)

