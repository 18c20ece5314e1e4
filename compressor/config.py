"""Presets plus overrides → one validated, frozen ``Config``.

A preset is a TOML file (a name of one shipped in ``presets/`` or a path). Overrides are
``section.key=value`` strings or a nested dict; every key and value is checked, and an unknown
one names the valid choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import tomllib

from compressor.errors import ConfigError, shown

# Distillation methods: at most one feature term (AT or FitNet hints) and at most one logit term
# (KD or DKD), joined with "+"; "none" trains on the labels alone. METHODS lists every valid
# combination in its canonical spelling (feature term first).
FEATURE_METHODS = ("at", "fitnet")
LOGIT_METHODS = ("kd", "dkd")
METHODS = ("none", *LOGIT_METHODS, *FEATURE_METHODS, *(f"{f}+{g}" for f in FEATURE_METHODS for g in LOGIT_METHODS))
MAX_IMAGE_SIZE = 4096  # pixels per side; ImageNet-style training uses 224-512
ATTENTIONS = ("sum-p", "max-p", "gradient")


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 32
    crop_padding: int = 4
    flip: bool = True
    train_subset: int = 0
    test_subset: int = 0
    # The normalisation of a teacher that states none (a plain state_dict); () = measure it from the
    # training images. A checkpoint's own, and --mean/--std, come first (compressor/load.py).
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (60, 120, 160)
    gamma: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class DistillConfig:
    method: str = "at+kd"
    alpha: float = 0.9
    temperature: float = 4.0
    beta: float = 1000.0
    p: float = 2.0
    attention: str = "sum-p"
    at_form: str = "code"
    at_layers: str = "all"
    beta_schedule: str = "constant"
    flip_beta: float = 0.0  # weight of the student's horizontal-flip symmetry term; used by gradient AT only
    # FitNet hints (Romero et al. 2015): weight 100 on one stage, trained jointly with CE, as RepDistiller's
    # CIFAR scripts (train_student.py --distill hint -r 1 -a 0 -b 100) and mdistiller's FITNET.LOSS.FEAT_WEIGHT.
    fitnet_weight: float = 100.0
    fitnet_stage: str = "middle"  # middle | an attention pair's index (0 = highest resolution) | a stage's module name
    fitnet_regressor: str = "auto"  # auto: 1x1 conv + BN only where channels differ; always: also where they match
    fitnet_stage1_epochs: int = 0  # the paper's stage 1: epochs training the student's lower half on the hint alone
    # DKD (Zhao et al. 2022), mdistiller's CIFAR-100 settings: alpha*TCKD + beta*NCKD at T = 4, linear warm-up over 20 epochs.
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_temperature: float = 4.0
    dkd_warmup_epochs: int = 20


@dataclass(frozen=True)
class StudentConfig:
    blocks_per_stage: int = 2
    width_ratio: float = 0.5


@dataclass(frozen=True)
class Config:
    preset: str = "cifar"
    description: str = ""
    preset_reason: str = ""  # why this preset, when the data chose it (no --preset given)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    student: StudentConfig = field(default_factory=StudentConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "train": TrainConfig, "distill": DistillConfig, "student": StudentConfig}


def shipped_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("presets").iterdir() if p.name.endswith(".toml"))


def _read_preset(preset: str | Path) -> tuple[str, dict[str, Any]]:
    # a shipped preset's bare name is that preset, whatever the current folder holds: `atc demo --out demo` makes
    # ./demo before reading the preset, and a run folder named after its preset is common; ./demo names the path
    shipped = shipped_presets()
    if isinstance(preset, str) and preset in shipped:
        name, text = preset, resources.files("presets").joinpath(f"{preset}.toml").read_text()
    else:
        name, text = _preset_file(preset, shipped)
    try:
        return name, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"preset {shown(preset)} is not valid TOML ({shown(exc)}); fix the file") from None


def _preset_file(preset: str | Path, shipped: list[str]) -> tuple[str, str]:
    """The name and text of a preset given as a path, or a one-line refusal of what it is instead."""
    path, choices = Path(preset), ", ".join(shipped)
    if path.is_dir():
        raise ConfigError(f"preset {shown(path)} is a folder; pass a preset file (.toml) or a shipped preset ({choices})")
    if path.exists() and not path.is_file():
        raise ConfigError(f"preset {shown(path)} is not a regular file; pass a preset file (.toml) or a shipped preset ({choices})")
    if not path.exists():
        if path.suffix == ".toml":
            raise ConfigError(f"preset file {shown(path)} does not exist; pass a shipped preset ({choices}) or a TOML path")
        raise ConfigError(f"unknown preset {preset!r}; choose one of {choices} or pass a .toml path")
    try:  # utf-8-sig: a byte-order mark, as some Windows editors write, is not part of the TOML
        return path.stem, path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"preset file {shown(path)} is not UTF-8 text; save it as a UTF-8 TOML file") from None
    except OSError as exc:
        raise ConfigError(f"preset file {shown(path)} cannot be read ({exc.strerror or type(exc).__name__}); "
                          "check its permissions") from None


# Integer keys where zero makes no sense; every other integer key accepts zero.
_AT_LEAST_ONE = {"train.epochs": 1, "train.batch_size": 1, "student.blocks_per_stage": 1}
# Upper bounds: a torch generator takes 64-bit seeds.
_AT_MOST = {"train.seed": (1 << 64) - 1}


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    where = f"{section}.{f.name}"
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(value)
            least = _AT_LEAST_ONE.get(where, 0)
            if out < least:
                raise ConfigError(f"{where} must be at least {least}, got {shown(value)}")
            if out > _AT_MOST.get(where, out):
                raise ConfigError(f"{where} must be at most {_AT_MOST[where]}, got {shown(value)}")
            return out
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if out != out or out in (float("inf"), float("-inf")) or out < 0:
                raise ConfigError(f"{where} must be a finite non-negative number, got {shown(value)}")
            return out
        if kind.startswith("tuple[float"):
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).strip("[]() ").split(",") if v.strip()]
            floats = tuple(float(v) for v in items if not isinstance(v, bool))
            if len(floats) != len(items) or any(v != v or abs(v) == float("inf") for v in floats):
                raise ValueError
            return floats
        if kind.startswith("tuple"):
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).strip("[] ").split(",") if v.strip()]
            out_t = tuple(_whole(v) for v in items)
            if any(v < 0 for v in out_t):
                raise ValueError
            return out_t
        return str(value)
    except (TypeError, ValueError):
        wanted = (f"a comma list of numbers, one per channel, e.g. {where}=0.4914,0.4822,0.4465" if kind.startswith("tuple[float")
                  else f"a comma list of whole numbers, e.g. {where}=60,120,160" if kind.startswith("tuple")
                  else {"int": "an integer", "bool": "true or false"}.get(kind, f"a {kind}"))
        raise ConfigError(f"{where} must be {wanted}, got {value!r}") from None


def _whole(v: Any) -> int:
    """A whole number from TOML or text; 60.5 is refused, not truncated to 60."""
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(v)
    return int(v)


def _merge(base: dict[str, dict[str, Any]], updates: Mapping[str, Any], origin: str) -> None:
    for section, values in updates.items():
        if section == "description":
            if isinstance(values, str) and origin.startswith("preset"):
                continue  # the preset's one line of text, kept by load_config
            raise ConfigError(f"{origin}: description is a line of text, not a section with keys; write "
                              "description = \"…\" at the top of a preset")
        if section in SECTIONS and isinstance(values, list):
            raise ConfigError(f"{origin}: [[{section}]] is an array of tables; write [{section}] (one table) instead")
        if section in SECTIONS and not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: {section} must be a table ([{section}] with key = value lines), got {values!r}")
        if section not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section {section!r}; valid sections are {', '.join(SECTIONS)}")
        valid = {f.name: f for f in fields(SECTIONS[section])}
        for key, value in values.items():
            if key not in valid:
                raise ConfigError(f"{origin}: unknown key {f'{section}.{key}'!r}; valid keys are {', '.join(valid)}")
            base[section][key] = _coerce(section, valid[key], value)


def parse_attention(text: str) -> tuple[str, float | None]:
    """``sum-p:4`` → ("sum-p", 4.0); ``max-p`` → ("max-p", None); ``gradient`` → ("gradient", None)."""
    name, _, p = str(text).strip().partition(":")
    if name not in ATTENTIONS or (p and name == "gradient"):
        raise ConfigError(f"attention {text!r} is unknown; use sum-p[:P], max-p[:P] or gradient, e.g. sum-p:2")
    try:
        value = float(p) if p else None
    except ValueError:
        value = -1.0
    if value is not None and not 0 < value < float("inf"):
        raise ConfigError(f"attention {text!r}: p must be a positive number, e.g. {name}:2")
    return name, value


def parse_method(text: str) -> tuple[str, ...]:
    """``"at+kd"`` → ``("at", "kd")``, feature term first; ``"none"`` → ``()``. Refuses, in one line, an
    unknown name, a name given twice, two logit terms (``kd+dkd``), two feature terms (``at+fitnet``)
    and ``none`` combined with anything."""
    parts = [p.strip() for p in str(text).strip().lower().split("+")]
    names = ", ".join(("none", *LOGIT_METHODS, *FEATURE_METHODS))
    where = f"method {text!r}"
    unknown = [p for p in parts if p not in ("none", *LOGIT_METHODS, *FEATURE_METHODS)]
    if unknown:
        raise ConfigError(f"{where}: unknown name {unknown[0]!r}; combine {names} with +, e.g. at+kd")
    if parts == ["none"]:
        return ()
    if "none" in parts:
        raise ConfigError(f"{where}: none cannot be combined with another method; use none alone")
    twice = sorted({p for p in parts if parts.count(p) > 1})
    if twice:
        raise ConfigError(f"{where} names {twice[0]} twice; give each method once")
    for kind, group in (("logit", LOGIT_METHODS), ("feature", FEATURE_METHODS)):
        both = [p for p in group if p in parts]
        if len(both) > 1:
            raise ConfigError(f"{where}: {' and '.join(both)} are both {kind} distillation; choose one of them "
                              f"(e.g. {'at+' + both[-1] if kind == 'logit' else both[0] + '+kd'})")
    return tuple(p for p in (*FEATURE_METHODS, *LOGIT_METHODS) if p in parts)


def canonical_method(text: str) -> str:
    """The method's canonical spelling (``kd+at`` → ``at+kd``), or a ``ConfigError``."""
    return "+".join(parse_method(text)) or "none"


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.epochs=3", "distill.beta=1e3"]`` → nested dict (values still strings)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.epochs=10")
        out.setdefault(section, {})[name] = value.strip()
    return out


def _validate(cfg: Config) -> None:
    d, t = cfg.distill, cfg.train
    if canonical_method(d.method) != d.method:
        raise ConfigError(f"distill.method {d.method!r} is spelled differently; write {canonical_method(d.method)}")
    if d.fitnet_regressor not in ("auto", "always"):
        raise ConfigError(f"distill.fitnet_regressor {d.fitnet_regressor!r} is unknown; choose auto or always")
    if not d.fitnet_stage.strip():
        raise ConfigError("distill.fitnet_stage is empty; use middle, a pair index (0, 1, ...) or a stage's module name")
    if d.dkd_temperature <= 0:
        raise ConfigError("distill.dkd_temperature must be positive")
    if "fitnet" in parse_method(d.method) and d.fitnet_stage1_epochs >= t.epochs:
        raise ConfigError(f"distill.fitnet_stage1_epochs {d.fitnet_stage1_epochs} leaves no epoch for the joint objective "
                          f"of {t.epochs} epochs; use fewer than train.epochs")
    if d.attention not in ATTENTIONS:
        raise ConfigError(f"distill.attention {d.attention!r} is unknown; choose one of {', '.join(ATTENTIONS)}")
    if d.at_form not in ("code", "paper"):
        raise ConfigError(f"distill.at_form {d.at_form!r} is unknown; choose code or paper")
    if d.beta_schedule not in ("constant", "decay"):
        raise ConfigError(f"distill.beta_schedule {d.beta_schedule!r} is unknown; choose constant or decay")
    if not 0 <= d.alpha <= 1:
        raise ConfigError(f"distill.alpha must lie in [0, 1], got {d.alpha}")
    if d.temperature <= 0 or d.p <= 0:
        raise ConfigError("distill.temperature and distill.p must be positive")
    if t.epochs < 1 or t.batch_size < 1:
        raise ConfigError("train.epochs and train.batch_size must be at least 1")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {t.lr}")
    if cfg.student.blocks_per_stage < 1 or not 0 < cfg.student.width_ratio <= 1:
        raise ConfigError("student.blocks_per_stage must be >= 1 and student.width_ratio in (0, 1]")
    if cfg.data.image_size < 8:
        raise ConfigError(f"data.image_size {cfg.data.image_size} is too small; use 8 or more")
    if cfg.data.image_size > MAX_IMAGE_SIZE:
        raise ConfigError(f"data.image_size {cfg.data.image_size} is larger than atc trains on (at most {MAX_IMAGE_SIZE}, "
                          f"one image would take {3 * cfg.data.image_size ** 2 / 1e9:.1f} GB); use a smaller size")
    check_mean_std(cfg.data.mean, cfg.data.std, "data.mean/data.std")


def check_mean_std(mean: tuple[float, ...], std: tuple[float, ...], what: str) -> None:
    """Normalisation statistics: both or neither, one value (every channel) or three, std positive."""
    if bool(mean) != bool(std):
        raise ConfigError(f"{what}: give both the mean and the std, e.g. 0.4914,0.4822,0.4465 and 0.247,0.2435,0.2616")
    if mean and (len(mean) != len(std) or len(mean) not in (1, 3)):
        raise ConfigError(f"{what}: one value for every channel or one per RGB channel (3), the same count for both; "
                          f"got {len(mean)} and {len(std)}")
    if any(v <= 0 for v in std):
        raise ConfigError(f"{what}: every std must be positive, got {', '.join(f'{v:g}' for v in std)}")


def scaled_milestones(milestones, preset_epochs: int, epochs: int) -> list[int]:
    """The preset's lr milestones moved proportionally from ``preset_epochs`` to ``epochs``.

    Each is rounded to the nearest epoch; the result is strictly increasing and inside the run:
    milestones that round below 1 become 1, duplicates are dropped (so one epoch never takes two
    lr drops at once, e.g. 60/120/160 of 200 for 3 epochs gives [1, 2], not [1, 2, 2]), and
    milestones at or after ``epochs`` are dropped (they would never take effect). A caller can
    print ``f"milestones scaled to {ms} for {epochs} epochs"``; fewer milestones than the
    preset's means fewer lr drops in this run.
    """
    scale = epochs / max(1, preset_epochs)
    out: list[int] = []
    for m in sorted(int(v) for v in milestones):
        v = max(1, round(m * scale))
        if v < epochs and (not out or v > out[-1]):
            out.append(v)
    return out


EPOCH_COUNTS = ("dkd_warmup_epochs", "fitnet_stage1_epochs")  # distill keys counted in epochs


def scaled_epochs(count: int, preset_epochs: int, epochs: int) -> int:
    """An epoch count of the preset's schedule (DKD's warm-up, FitNet's stage 1) moved proportionally to
    ``epochs``, rounded to the nearest epoch: 20 of 200 → 2 of 20, → 0 of 2 (no warm-up at all)."""
    return int(round(count * epochs / max(1, preset_epochs)))


def load_config(preset: str | Path = "cifar", overrides: Mapping[str, Any] | list[str] | None = None) -> Config:
    """Read a preset, apply overrides, validate. Milestones, DKD's warm-up and FitNet's stage 1 follow an
    overridden epoch count (``scaled_milestones``, ``scaled_epochs``) unless the overrides set them too.
    The method is stored in its canonical spelling (``kd+at`` → ``at+kd``)."""
    name, raw = _read_preset(preset)
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    _merge(values, raw, f"preset {shown(name)}")
    preset_epochs = values["train"].get("epochs", TrainConfig.epochs)
    preset_milestones = values["train"].get("milestones", TrainConfig.milestones)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    user = {s: dict(v) for s, v in (overrides or {}).items()}
    _merge(values, user, "override")
    train_user, distill_user = user.get("train", {}), user.get("distill", {})
    if "epochs" in train_user and "milestones" not in train_user:
        values["train"]["milestones"] = tuple(scaled_milestones(preset_milestones, preset_epochs, values["train"]["epochs"]))
    if "epochs" in train_user:  # epoch counts of the method's own schedule shrink with the run, as milestones do
        for key in EPOCH_COUNTS:
            if key not in distill_user:
                preset_value = values["distill"].get(key, getattr(DistillConfig, key))
                values["distill"][key] = scaled_epochs(preset_value, preset_epochs, values["train"]["epochs"])
    values["distill"]["method"] = canonical_method(values["distill"].get("method", DistillConfig.method))
    cfg = Config(preset=name, description=str(raw.get("description", "")),
                 **{s: cls(**values[s]) for s, cls in SECTIONS.items()})
    _validate(cfg)
    return cfg
