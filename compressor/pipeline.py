"""The whole job, one function per arrow: load → derive → pair → distil → evaluate → export →
profile → report. This module only sequences the steps; each step lives in its own package.
The CLI calls these functions, and so can a five-line Python script:

    from compressor import compress, load_config
    report = compress("wrn-40-4.pt", "cifar10/", load_config("cifar"), "runs/x", students=["wrn-16-2"])

Device rule: every tensor made here (example inputs, the dry run's batch) is made on the device
of the model it feeds, so a teacher already on CUDA meets CUDA tensors.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor import distributed, fileio
from compressor.config import Config
from compressor.data.images import ImageData
from compressor.data.open import open_dataset
from compressor.derive.candidates import Candidate, check_student_options, choose_students, resolve_init
from compressor.derive.search import Target
from compressor.derive.thinning import describe_stages, inherit
from compressor.device import Speed, autocast_dtype, example_input, model_device, onnxruntime, pick_device
from compressor.distill.loop import DistilledStudent, Teacher, fit, make_batches, objective_from
from compressor.distill.losses import distillation_terms, input_gradient
from compressor.distill.state import METRICS_FILE
from compressor.errors import ConfigError, DataError, Interrupted, OutputError
from compressor.evaluate import evaluate
from compressor.events import SILENT, Reporter
from compressor.models.checkpoint import check_input_fits, load_model, save_checkpoint
from compressor.models.registry import parse_arch
from compressor.models.spec import ModelSpec
from compressor.pair import AttentionPair, find_pairs, tapped
from compressor.profiling.counts import count_macs, count_params
from compressor.report.build import Report, build_report, write_report
from compressor.report.plots import plot_curves
from compressor.report.tensorboard import check_tensorboard, epoch_logger

# ---------------------------------------------------------------- outputs and inputs


def prepare_output(out_dir: str | Path, overwrite: bool = False, resume: bool = False, create: bool = True) -> Path:
    """Refuse a non-empty ``out_dir`` unless the user said to overwrite or resume into it.

    ``create=False`` only checks, so that a run failing on its inputs leaves no empty folder behind.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; pass a folder")
    fileio.check_writable(out)
    if out.exists() and any(p.name != fileio.LOCK_NAME for p in out.iterdir()) and not (overwrite or resume):
        raise OutputError(f"--out {out} is not empty; pass --overwrite to replace its files, --resume to continue, or another folder")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def load_data(spec: str | Path, cfg: Config, strict: bool = False, reporter: Reporter = SILENT,
              device: torch.device | None = None, workers: int | None = None, budget_bytes: int | None = None) -> ImageData:
    """The dataset, subset as the preset says. With ``device``, data too large for the memory it may
    use there is not loaded but streamed (``compressor.data.streaming``); the decision is reported."""
    image_size = cfg.data.image_size if str(spec) == "digits" or cfg.data.image_size else None
    if device is not None:
        from compressor.data.streaming import open_for_device

        data = open_for_device(spec, image_size, device, strict=strict, train_subset=cfg.data.train_subset,
                               test_subset=cfg.data.test_subset, budget_bytes=budget_bytes, workers=workers, reporter=reporter)
    else:
        # The subset is part of the data, not of the run: the same images whatever the training seed.
        data = open_dataset(spec, image_size=image_size, strict=strict).subset(cfg.data.train_subset, cfg.data.test_subset, seed=0)
    if data.skipped_files:
        reporter.info(f"skipped {len(data.skipped_files)} unreadable image(s), e.g. {data.skipped_files[0]} (--strict-data makes this fatal)")
    for note in data.notes:
        reporter.info(note)
    return data  # type: ignore[return-value]


def check_compatible(spec: ModelSpec, data: ImageData, role: str = "teacher") -> None:
    if spec.num_classes != data.num_classes:
        raise DataError(f"the {role} has {spec.num_classes} classes but the data has {data.num_classes}; "
                        "use data with the same classes or another checkpoint")
    if tuple(spec.input_size) != tuple(data.input_size):
        raise DataError(f"the {role} expects input {'x'.join(map(str, spec.input_size))} but the data is "
                        f"{'x'.join(map(str, data.input_size))}; set data.image_size in the preset or use matching data")


def normalization(spec: ModelSpec, data: ImageData) -> tuple[list[float], list[float]]:
    if spec.mean is not None and spec.std is not None:
        return list(spec.mean), list(spec.std)
    return data.channel_stats()


@dataclass
class TeacherAndData:
    """A trained teacher ready for the data it will teach on: its spec carries the input size,
    normalisation and class names (taken from the data where the checkpoint had none)."""

    model: nn.Module
    spec: ModelSpec
    metrics: dict[str, Any]
    data: ImageData

    @property
    def mean_std(self) -> tuple[list[float], list[float]]:
        return list(self.spec.mean), list(self.spec.std)  # type: ignore[arg-type]


def load_teacher_and_data(teacher_path: str | Path, data_spec: str | Path, cfg: Config, *, arch: str | None = None,
                          trust: bool = False, strict_data: bool = False, reporter: Reporter = SILENT,
                          device: torch.device | None = None, workers: int | None = None,
                          data: ImageData | None = None) -> TeacherAndData:
    """The one "load teacher and data" step of compress, the dry run, sweep and attention (``data``:
    already loaded by a caller that had to look at it first)."""
    teacher, spec, metrics = load_model(teacher_path, arch=arch, trust=trust)
    if spec.family == "module":
        raise ConfigError("a pickled nn.Module teacher cannot be rebuilt by name; save its state_dict and pass --arch")
    if data is None:
        data = load_data(data_spec, cfg, strict_data, reporter, device=device, workers=workers)
    spec = replace(spec, input_size=spec.input_size if spec.mean is not None else tuple(data.input_size))
    check_compatible(spec, data)
    if spec.class_names and list(spec.class_names) != list(data.class_names):
        reporter.info(f"note: the teacher's classes ({_few(spec.class_names)}) are not named like the data's "
                      f"({_few(data.class_names)}); labels are matched by position, so check that the order is the same")
    mean, std = normalization(spec, data)
    spec = replace(spec, mean=mean, std=std, class_names=list(spec.class_names or data.class_names))
    return TeacherAndData(teacher, spec, metrics, data)


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(map(str, names[:n])) + (", …" if len(names) > n else "")


def warn_larger_students(candidates: list[Candidate], teacher: str, reporter: Reporter) -> None:
    """A "student" with more parameters or multiply-adds than its teacher is allowed, but never silently."""
    for c in candidates:
        if c.param_ratio < 1 or c.mac_ratio < 1:
            reporter.info(f"note: student {c.name} is larger than the teacher {teacher}: {1 / c.param_ratio:.2f}x its params and "
                          f"{1 / c.mac_ratio:.2f}x its GMACs; it will not be faster")


# ---------------------------------------------------------------- training a model from scratch


def state_dir_for(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".state")


def check_train_output(out: str | Path, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse to replace a checkpoint or an unfinished run's state unless told to."""
    out = Path(out)
    fileio.check_writable(out)
    if out.exists() and not (overwrite or resume):
        raise OutputError(f"{out} exists; pass --overwrite to replace it, --resume to continue its run, or another --out")
    state = state_dir_for(out)
    if not out.exists() and state.is_dir() and any(state.iterdir()) and not (overwrite or resume):
        raise OutputError(f"{state} holds the state of an unfinished run; pass --resume to continue it, --overwrite to start again, "
                          "or another --out")


def say_schedule(cfg: Config, reporter: Reporter) -> None:
    """The learning-rate schedule a run uses, milestones as scaled to its epochs."""
    t = cfg.train
    drops = f"× {t.gamma:g} after epoch{'s' if len(t.milestones) > 1 else ''} {', '.join(map(str, t.milestones))}" if t.milestones \
        else "no drops"
    reporter.info(f"schedule: {t.epochs} epoch{'s' if t.epochs != 1 else ''}, lr {t.lr:g}, {drops}")


def train_model(arch: str, data: ImageData, cfg: Config, out_path: str | Path, device: torch.device | None = None,
                reporter: Reporter = SILENT, resume: bool = False, speed: Speed | None = None,
                tensorboard: str | Path | None = None) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Train ``arch`` from scratch on ``data`` with the preset recipe; save an atc checkpoint (rank 0 of a
    data-parallel run alone writes it). ``tensorboard``: a folder for per-epoch scalars."""
    out_path = Path(out_path)
    mean, std = data.channel_stats()
    spec = replace(ModelSpec.for_arch(arch, data.num_classes), class_names=list(data.class_names),
                   input_size=tuple(data.input_size), mean=mean, std=std)
    torch.manual_seed(cfg.train.seed)
    model = spec.build()
    say_schedule(cfg, reporter)
    result = fit(model, data, cfg, state_dir_for(out_path), mean, std, device=device or pick_device(),
                 reporter=reporter, resume=resume, tag=spec.name, speed=speed, on_epoch=epoch_logger(tensorboard, spec.name))
    metrics = {"top1": result.final["test_top1"], "history": result.history, "train_seconds": result.seconds,
               "data": data.name, "preset": cfg.preset, "epochs": cfg.train.epochs}
    if result.compile_seconds:
        metrics["compile_seconds"] = result.compile_seconds
    if distributed.is_main():
        save_checkpoint(out_path, model.cpu(), spec, metrics)
    return model.cpu(), spec, metrics


def train(arch: str, data_spec: str | Path, cfg: Config, out: str | Path, *, device: str = "auto", overwrite: bool = False,
          resume: bool = False, strict_data: bool = False, reporter: Reporter = SILENT,
          speed: Speed | None = None, tensorboard: str | Path | None = None) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """``atc train``: check the name and the output, load the data, check the model takes its images, train."""
    parse_arch(arch)
    check_train_output(out, overwrite, resume)
    if tensorboard is not None:
        check_tensorboard()
    speed = speed or Speed()
    dev = pick_device(device)
    data = load_data(data_spec, cfg, strict_data, reporter, device=dev, workers=speed.workers)
    check_input_fits(parse_arch(arch).build(data.num_classes), data.input_size, arch)
    rank = distributed.current()
    where = f"{dev}" if rank.world_size == 1 else f"{rank.world_size} processes ({rank.backend}, {dev} on rank 0)"
    reporter.info(f"training {arch} on {data.name} ({len(data.train_y)} train / {len(data.test_y)} test) on {where}")
    return train_model(arch, data, cfg, out, dev, reporter, resume, speed, tensorboard)


# ---------------------------------------------------------------- the dry run


@dataclass
class DryRun:
    student: Candidate
    pairs: list[AttentionPair]
    initial_terms: dict[str, float]
    stages: list[dict[str, Any]] = field(default_factory=list)  # per stage: blocks and width, student vs teacher


@dataclass
class DryRunReport:
    """What ``compress`` would do: the teacher's size and, per student, its shape, pairs and first loss terms."""

    teacher: str
    teacher_params: int
    teacher_gmacs: float
    method: str
    at_layers: str
    init: str
    students: list[DryRun]


def initial_terms(student: nn.Module, teacher: nn.Module, pairs: list[AttentionPair], data: ImageData, cfg: Config,
                  mean, std, method: str) -> dict[str, float]:
    """The loss terms on one training batch before any training: a check that β and α are sane.
    The batch is made on the teacher's device; the student must be there too."""
    train_b, _ = make_batches(data, cfg, mean, std, model_device(teacher))
    x, y = next(iter(train_b))
    s_names, t_names = [p.student.module for p in pairs], [p.teacher.module for p in pairs]
    student.train(), teacher.eval()
    with tapped(student, s_names) as s_taps, tapped(teacher, t_names) as t_taps:
        with torch.no_grad():
            t_logits, logits = teacher(x), student(x)
        obj, grads = objective_from(cfg, method), None
        maps = list(zip(s_taps.take(s_names), t_taps.take(t_names)))
        if obj.gradient and obj.uses_at:
            xg = x.clone().requires_grad_(True)
            grads = (input_gradient(student, xg, y)[0], input_gradient(teacher, xg, y)[0])
        terms = distillation_terms(obj, logits, y, t_logits, maps, input_grads=grads)
    return {k: float(v) for k, v in terms.items()}


def plan(teacher: nn.Module, t_spec: ModelSpec, data: ImageData, cfg: Config, candidates: list[Candidate], method: str) -> list[DryRun]:
    mean, std = normalization(t_spec, data)
    out = []
    for cand in candidates:
        torch.manual_seed(cfg.train.seed)
        student = cand.spec.build().to(model_device(teacher))
        pairs = find_pairs(student, teacher, example_input(teacher, t_spec.input_size), cfg.distill.at_layers)
        stages = (cand.spec.plan or {}).get("stages") or describe_stages(teacher, student, t_spec.input_size)
        out.append(DryRun(cand, pairs, initial_terms(student, teacher, pairs, data, cfg, mean, std, method), stages))
    return out


def dry_run(teacher_path: str | Path, data_spec: str | Path, cfg: Config, *, students: list[str] | None = None,
            n_students: int = 0, arch: str | None = None, trust: bool = False, strict_data: bool = False,
            width: float | str | None = None, blocks_per_stage: int | None = None, target: Target | None = None,
            init: str = "auto", reporter: Reporter = SILENT) -> DryRunReport:
    """Students, attention pairs and initial loss terms of a ``compress`` run, without training or writing."""
    check_student_options(students, width, blocks_per_stage, target, init)
    loaded = load_teacher_and_data(teacher_path, data_spec, cfg, arch=arch, trust=trust, strict_data=strict_data, reporter=reporter)
    model, spec = loaded.model, loaded.spec
    tp, tm = count_params(model)["total"], count_macs(model, spec.input_size).gmacs
    cands = choose_students(spec, cfg, students, n_students, teacher_model=model, width=width,
                            blocks_per_stage=blocks_per_stage, target=target, reporter=reporter)
    warn_larger_students(cands, spec.name, reporter)
    return DryRunReport(spec.name, tp, tm, cfg.distill.method, cfg.distill.at_layers, init,
                        plan(model, spec, loaded.data, cfg, cands, cfg.distill.method))


# ---------------------------------------------------------------- distillation


def _student_dir(out: Path, cand: Candidate, method: str) -> Path:
    """``students/NAME-METHOD``, with characters that some file systems refuse (``timm:…``) replaced."""
    return out / "students" / re.sub(r"[^A-Za-z0-9._-]", "_", f"{cand.name}-{method}")


def distill_student(cand: Candidate, teacher: nn.Module, t_spec: ModelSpec, data: ImageData, cfg: Config, method: str,
                    out: Path, device: torch.device, reporter: Reporter = SILENT, resume: bool = False,
                    init: str = "auto", speed: Speed | None = None, tensorboard: str | Path | None = None) -> DistilledStudent:
    """Train one student (skipped when a finished checkpoint is already there and ``resume``). A derived
    student starts from the teacher's surviving weights (``init="inherit"``) or from a fresh initialisation."""
    mean, std = normalization(t_spec, data)
    spec = replace(cand.spec, mean=mean, std=std, class_names=list(t_spec.class_names or data.class_names))
    sdir = _student_dir(out, cand, method)
    ckpt = sdir / "student.pt"
    if resume and ckpt.exists():
        model, spec, metrics = load_model(ckpt)
        reporter.info(f"{cand.name} ({method}) already finished; reusing {ckpt}")
        return DistilledStudent(model, spec, metrics, sdir)
    torch.manual_seed(cfg.train.seed)
    model = spec.build()
    init = resolve_init(init, spec)
    if init == "inherit":
        model.load_state_dict(inherit(teacher, spec.plan).state_dict())
    model.to(model_device(teacher))
    pairs = find_pairs(model, teacher, example_input(teacher, spec.input_size), cfg.distill.at_layers)
    result = fit(model, data, cfg, sdir, mean, std, Teacher(teacher, pairs), objective_from(cfg, method), device, reporter,
                 resume=resume, tag=f"{cand.name} ({method})", speed=speed, on_epoch=epoch_logger(tensorboard, sdir.name))
    metrics = {"top1": result.final["test_top1"], "history": result.history, "train_seconds": result.seconds,
               "method": method, "teacher": t_spec.name, "epochs": cfg.train.epochs, "init": init,
               "pairs": ["input gradient dL/dx"] if cfg.distill.attention == "gradient" else [p.describe() for p in pairs]}
    if result.compile_seconds:
        metrics["compile_seconds"] = result.compile_seconds
    if distributed.is_main():
        save_checkpoint(ckpt, model.cpu(), spec, metrics)
    return DistilledStudent(model.cpu(), spec, metrics, sdir)


def compress(teacher_path: str | Path, data_spec: str | Path, cfg: Config, out_dir: str | Path, *, method: str | None = None,
             students: list[str] | None = None, n_students: int = 0, arch: str | None = None, trust: bool = False,
             overwrite: bool = False, resume: bool = False, strict_data: bool = False, device: str = "auto",
             threads: int | None = None, int8: bool = False, width: float | str | None = None,
             blocks_per_stage: int | None = None, target: Target | None = None, init: str = "auto",
             reporter: Reporter = SILENT, command: str = "", speed: Speed | None = None,
             tensorboard: str | Path | None = None) -> dict[str, Any]:
    """Distil one or more students from a trained teacher and write the full output set; return report.json's content.

    ``speed`` sets precision, channels_last, torch.compile and DataLoader workers. Run under torchrun
    (several processes), each rank trains on its shard; rank 0 alone exports, measures and writes the
    report, and the other ranks return an empty dict.

    ``students`` names zoo students; ``width``/``blocks_per_stage`` derive a thinned student from any
    traceable CNN; ``target`` searches the width (and depth) that meets a speed-up; ``init`` says
    whether a derived student inherits the teacher's surviving weights (``auto``/``inherit``) or
    starts fresh (``scratch``). Naming students and deriving one are exclusive.

    With ``int8`` each student is also quantized (static QDQ, calibrated on training images) and
    its INT8 accuracy and latency join the report. ``tensorboard``: a folder for every student's
    per-epoch scalars (one run each).
    """
    check_student_options(students, width, blocks_per_stage, target, init)
    onnxruntime()  # the report needs it: a missing or mixed install fails now, not after training
    if tensorboard is not None:
        check_tensorboard()
    out = prepare_output(out_dir, overwrite, resume, create=False)
    speed = speed or Speed()
    method = method or cfg.distill.method
    dev = pick_device(device)
    loaded = load_teacher_and_data(teacher_path, data_spec, cfg, arch=arch, trust=trust, strict_data=strict_data,
                                   reporter=reporter, device=dev, workers=speed.workers)
    teacher, t_spec, data = loaded.model, loaded.spec, loaded.data
    if int8 and not isinstance(data, ImageData):
        raise ConfigError("--int8 needs the images in memory for calibration, but this dataset is streamed from disk; "
                          "quantize afterwards with `atc export --int8 --calib-data` on a smaller folder")
    candidates = choose_students(t_spec, cfg, students, n_students, teacher_model=teacher, width=width,
                                 blocks_per_stage=blocks_per_stage, target=target, reporter=reporter)
    warn_larger_students(candidates, t_spec.name, reporter)
    for c in candidates:
        resolve_init(init, c.spec)  # fail before any training
    prepare_output(out, overwrite, resume)
    with fileio.folder_lock(out) if distributed.is_main() else contextlib.nullcontext():
        prepare_output(out, overwrite, resume)  # a run that finished into it while this one loaded counts too
        distributed.barrier()  # every rank has checked --out before any of them writes into it
        return _distil_and_report(loaded, candidates, cfg, method, out, dev, reporter, resume, init, speed, threads,
                                  command, int8, tensorboard)


def _distil_and_report(loaded: TeacherAndData, candidates: list[Candidate], cfg: Config, method: str, out: Path,
                       dev: torch.device, reporter: Reporter, resume: bool, init: str, speed: Speed, threads: int | None,
                       command: str, int8: bool, tensorboard: str | Path | None = None) -> dict[str, Any]:
    teacher, t_spec, data = loaded.model, loaded.spec, loaded.data
    mean, std = loaded.mean_std
    _, test_b = make_batches(data, cfg, mean, std, dev, workers=speed.workers)
    teacher.to(dev)
    t_top1 = evaluate(teacher, test_b, autocast_dtype(speed.precision, dev))["top1"]
    reporter.info(f"teacher {t_spec.name}: test top-1 {t_top1:.2f}% on {data.name}")
    say_schedule(cfg, reporter)
    results = [distill_student(c, teacher, t_spec, data, cfg, method, out, dev, reporter, resume, init, speed, tensorboard)
               for c in candidates]
    teacher.cpu()
    if not distributed.is_main():
        return {}
    try:
        report = build_report(teacher, t_spec, t_top1, results, candidates, data, cfg, method, out, threads, reporter, command, int8)
        _publish_primary(out, results[0])
        write_report(out, report)
        plot_curves(out / "curves.png", (t_spec.name, loaded.metrics.get("history", [])),
                    [(f"{c.name} ({method})", r.metrics.get("history", [])) for c, r in zip(candidates, results)])
    except KeyboardInterrupt:
        reporter.done()
        raise Interrupted(f"stopped while exporting and measuring; the trained students are kept in {out / 'students'}; "
                          "run the same command with --resume to finish the report without training again",
                          signal.SIGINT) from None
    return report.to_dict()


def _publish_primary(out: Path, primary: DistilledStudent) -> None:
    """The first student's files also sit at the top of ``out`` (student.pt, student.onnx, metrics.jsonl)."""
    for name in ("student.pt", "student.onnx", METRICS_FILE):
        with fileio.atomic_path(out / name) as tmp:
            shutil.copyfile(primary.dir / name, tmp)


# ---------------------------------------------------------------- export


@dataclass
class Exported:
    onnx: Path
    parity: Any  # export.onnx.Parity
    int8: Any = None  # export.int8.Int8Result with --int8


def export(model_path: str | Path, out: str | Path, *, arch: str | None = None, trust: bool = False,
           input_size: tuple[int, int, int] | None = None, atol: float = 1e-4, rtol: float | None = None, overwrite: bool = False,
           int8: bool = False, calib_data: str | Path | None = None, calib_images: int = 256,
           threads: int | None = None) -> Exported:
    """``atc export``: the model as one ONNX file with parity checked, and with ``int8`` its INT8 copy
    calibrated on ``calib_data`` (resized to the model's input). Both files or neither: a failure
    after the FP32 file was written removes it again."""
    from compressor.export.int8 import int8_with_evaluation
    from compressor.export.onnx import export_checked
    from compressor.models.checkpoint import open_model

    out = Path(out)
    int8_out = out.with_name(out.stem + ".int8.onnx")
    if int8 and not calib_data:
        raise ConfigError("--int8 needs --calib-data DIR (a few hundred training images calibrate the activation ranges)")
    for path in (out, int8_out) if int8 else (out,):
        if path.exists() and not overwrite:
            raise OutputError(f"{path} exists; pass --overwrite to replace it or choose another --out")
    fileio.check_writable(out)
    model, spec = open_model(model_path, arch, trust, input_size)
    data = None
    if int8:  # the calibration images are checked before anything is written
        data = open_dataset(calib_data, image_size=spec.input_size[1])
        check_compatible(replace(spec, input_size=tuple(spec.input_size)), data, "model")
    parity = export_checked(model, spec, out, atol=atol, rtol=rtol)
    if not int8:
        return Exported(out, parity)
    try:
        mean, std = normalization(spec, data)
        result = int8_with_evaluation(out, int8_out, data, mean, std, spec.input_size, calib_images, threads)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return Exported(out, parity, result)


__all__ = ["export", "Exported", "Report", "TeacherAndData", "DryRun", "DryRunReport", "compress", "dry_run", "train", "train_model", "load_data",
           "load_teacher_and_data", "prepare_output", "check_compatible", "normalization", "choose_students", "resolve_init"]
