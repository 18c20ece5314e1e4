"""The whole job, one function per arrow: load → choose → distil → measure → report (``compress``),
``train`` and ``export``. This module only sequences the steps; each step lives in its own module.
The CLI calls these functions, and so can a five-line Python script:

    from compressor import RunOptions, StudentChoice, compress, load_config
    report = compress("wrn-40-4.pt", "cifar10/", load_config("cifar"), "runs/x", StudentChoice(names=["wrn-16-2"]))
    print(report.students[0].top1, report.students[0].latency_speedup)
"""

from __future__ import annotations

import contextlib
import shutil
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor import distributed, fileio
from compressor.config import Config, canonical_method
from compressor.data.images import ImageData
from compressor.data.open import open_dataset
from compressor.derive.candidates import Candidate, StudentChoice, choose, resolve_init
from compressor.device import autocast_dtype, onnxruntime, pick_device
from compressor.distill.loop import make_batches, say_schedule
from compressor.distill.scratch import train_model
from compressor.distill.state import METRICS_FILE
from compressor.distill.student import DistilledStudent, distill_student
from compressor.distill.tensorboard import check_tensorboard
from compressor.errors import ConfigError, Interrupted, OutputError
from compressor.evaluate import evaluate
from compressor.events import SILENT, Reporter, RunClock, reporter_for
from compressor.export.int8 import Int8Result, int8_with_evaluation
from compressor.export.onnx import Parity, export_checked
from compressor.load import TeacherAndData, check_compatible, choose_normalization, load_data, load_teacher_and_data, normalization
from compressor.measure import measure
from compressor.models.checkpoint import check_input_fits, open_model
from compressor.models.registry import parse_arch
from compressor.models.spec import ModelSpec
from compressor.options import RunOptions
from compressor.report.build import Report, build_report, write_report
from compressor.report.pick import parse_pick, pick_student
from compressor.report.plots import plot_curves

# ---------------------------------------------------------------- training a model from scratch


def train(arch: str, data_spec: str | Path, cfg: Config, out: str | Path, options: RunOptions = RunOptions(), *,
          reporter: Reporter = SILENT, progress: bool = False) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """``atc train``: check the name and the output, load the data, check the model takes its images, train.
    From ``options``: device, speed, resume/overwrite, strict_data, tensorboard. Quiet unless ``progress``
    (plain lines on stderr) or a ``reporter`` (``compressor.events``) is given."""
    reporter = reporter_for(reporter, progress)
    parse_arch(arch)
    fileio.check_train_output(out, options.overwrite, options.resume)
    if options.tensorboard is not None:
        check_tensorboard(options.tensorboard)
    dev = pick_device(options.device)
    data = load_data(data_spec, cfg, options.strict_data, reporter, device=dev, workers=options.speed.workers)
    check_input_fits(parse_arch(arch).build(data.num_classes), data.input_size, arch)
    rank = distributed.current()
    where = f"{dev}" if rank.world_size == 1 else f"{rank.world_size} processes ({rank.backend}, {dev} on rank 0)"
    reporter.info(f"training {arch} on {data.name} ({len(data.train_y)} train / {len(data.test_y)} test) on {where}")
    norm = choose_normalization(cfg, data, options, teacher=False)
    reporter.info(norm.describe())
    return train_model(arch, data, cfg, out, dev, reporter, options.resume, options.speed, options.tensorboard, norm)


# ---------------------------------------------------------------- distillation


def compress(teacher_path: str | Path, data_spec: str | Path, cfg: Config, out_dir: str | Path,
             choice: StudentChoice = StudentChoice(), options: RunOptions = RunOptions(), *, method: str | None = None,
             reporter: Reporter = SILENT, progress: bool = False) -> Report | None:
    """Distil one or more students (``choice``) from a trained teacher and write the full output set
    (report.json, report.md, tradeoff.png, curves.png, the students' checkpoints and ONNX files); return
    the ``Report`` (``report.to_dict()`` is report.json).

    ``options.speed`` sets precision, channels_last, torch.compile, CUDA graphs and DataLoader workers.
    Run under torchrun (several processes), each rank trains on its shard; rank 0 alone exports,
    measures and writes the report, and the other ranks return None. With ``options.int8`` each
    student is also quantized (static QDQ, calibrated on training images) and its INT8 accuracy and
    latency join the report. ``options.tensorboard``: a folder for every student's per-epoch scalars.
    ``method``: none, or at/fitnet and kd/dkd joined with + (``compressor.config.parse_method``; default: the preset's).
    ``options.pick`` chooses the student whose files are published at the top of ``out``
    (``compressor.report.pick``); the report says which and why. Quiet unless ``progress`` (plain
    lines on stderr) or a ``reporter`` (``compressor.events``) is given.
    """
    reporter = reporter_for(reporter, progress)
    parse_pick(options.pick)  # a bad rule fails now, not after training
    onnxruntime()  # the report needs it: a missing or mixed install fails now, not after training
    if options.tensorboard is not None:
        check_tensorboard(options.tensorboard)
    out = fileio.prepare_output(out_dir, options.overwrite, options.resume, create=False)
    method = canonical_method(method or cfg.distill.method)
    dev = pick_device(options.device)
    loaded = load_teacher_and_data(teacher_path, data_spec, cfg, options, reporter=reporter, device=dev)
    if options.int8 and not isinstance(loaded.data, ImageData):
        raise ConfigError("--int8 needs the images in memory for calibration, but this dataset is streamed from disk; "
                          "quantize afterwards with `atc export --int8 --calib-data` on a smaller folder")
    candidates = choose(loaded, cfg, choice, reporter)
    for c in candidates:
        resolve_init(choice.init, c.spec)  # fail before any training
    fileio.prepare_output(out, options.overwrite, options.resume)
    with fileio.folder_lock(out) if distributed.is_main() else contextlib.nullcontext():
        fileio.prepare_output(out, options.overwrite, options.resume)  # a run that finished into it while this one loaded counts too
        distributed.barrier()  # every rank has checked --out before any of them writes into it
        students = _distil(loaded, candidates, cfg, method, out, dev, choice.init, options, reporter)
        if not distributed.is_main():
            return None
        return _measure_and_report(loaded, candidates, students, cfg, method, out, options, reporter)


@dataclass
class _Distilled:
    teacher_top1: float
    students: list[DistilledStudent]


def _distil(loaded: TeacherAndData, candidates: list[Candidate], cfg: Config, method: str, out: Path, dev: torch.device,
            init: str, options: RunOptions, reporter: Reporter) -> _Distilled:
    """The teacher's test top-1, then every candidate distilled from it."""
    teacher, t_spec, data = loaded.model, loaded.spec, loaded.data
    mean, std = loaded.mean_std
    _, test_b = make_batches(data, cfg, mean, std, dev, workers=options.speed.workers)
    teacher.to(dev)
    with test_b:
        t_top1 = evaluate(teacher, test_b, autocast_dtype(options.speed.precision, dev), reporter,
                          f"teacher {t_spec.name} on the {len(data.test_y):,} test images").top1
    reporter.info(f"teacher {t_spec.name}: test top-1 {t_top1:.2f}% on {data.name}")
    say_schedule(cfg, reporter)
    clock = RunClock(cfg.train.epochs * len(candidates), reporter)
    students = [distill_student(c, loaded, cfg, method, out, dev, init=init, options=options, reporter=reporter, clock=clock)
                for c in candidates]
    teacher.cpu()
    return _Distilled(t_top1, students)


def _measure_and_report(loaded: TeacherAndData, candidates: list[Candidate], done: _Distilled, cfg: Config, method: str,
                        out: Path, options: RunOptions, reporter: Reporter) -> Report:
    t_spec, data = loaded.spec, loaded.data
    try:
        with fileio.interruptible() as stop:  # SIGTERM as Ctrl-C: temporaries and scratch folders are removed
            measured = measure(loaded.model, t_spec, done.teacher_top1, done.students, candidates, out, threads=options.threads,
                               int8_data=data if options.int8 and isinstance(data, ImageData) else None, speed=options.speed,
                               reporter=reporter)
            report = build_report(measured, cfg, method, data, options.command)
            chosen = pick_student([e.to_dict() for e in measured.students], options.pick)
            report.published = {"name": chosen.name, "rule": chosen.rule, "reason": chosen.reason,
                                 "checkpoint": measured.students[chosen.index].checkpoint}
            reporter.info(f"publishing {chosen.name} as {out / 'student.pt'}: {chosen.reason}")
            _publish(out, done.students[chosen.index])
            write_report(out, report)
            plot_curves(out / "curves.png", (t_spec.name, loaded.metrics.get("history", [])),
                        [(f"{c.name} ({method})", s.history) for c, s in zip(candidates, done.students)])
    except KeyboardInterrupt:
        reporter.done()
        raise Interrupted(f"stopped while exporting and measuring; the trained students are kept in {out / 'students'}; "
                          "run the same command with --resume to finish the report without training again",
                          stop.signum or signal.SIGINT) from None
    return report


def _publish(out: Path, chosen: DistilledStudent) -> None:
    """The published student's files also sit at the top of ``out`` (student.pt, student.onnx, metrics.jsonl)."""
    for name in ("student.pt", "student.onnx", METRICS_FILE):
        with fileio.atomic_path(out / name) as tmp:
            shutil.copyfile(chosen.dir / name, tmp)


# ---------------------------------------------------------------- export


@dataclass
class Exported:
    """What ``export`` wrote: the ONNX file, its parity with torch and, with ``int8``, the INT8 copy and its evaluation."""

    onnx: Path
    parity: Parity
    int8: Int8Result | None = None

    def to_dict(self) -> dict[str, Any]:
        """``atc export --json``."""
        p = self.parity
        return {"onnx": str(self.onnx), "parity": {"max_abs_diff": {str(k): v for k, v in p.max_abs_diff.items()},
                                                   "max_rel_diff": {str(k): v for k, v in p.max_rel_diff.items()}},
                "int8": self.int8.to_dict() if self.int8 is not None else None}


def export(model_path: str | Path, out: str | Path, options: RunOptions = RunOptions(), *,
           input_size: tuple[int, int, int] | None = None, atol: float = 1e-4, rtol: float | None = None,
           calib_data: str | Path | None = None, calib_images: int = 256, reporter: Reporter = SILENT) -> Exported:
    """``atc export``: the model as one ONNX file with parity checked, and with ``options.int8`` its INT8 copy
    calibrated on ``calib_data`` (resized to the model's input). Both files or neither: a failure
    after the FP32 file was written removes it again. From ``options``: ``arch``, ``trust``, ``overwrite``,
    ``int8`` and ``threads`` (of the INT8 latency); ``reporter`` hears a line before each INT8 step."""
    arch, trust, overwrite, int8, threads = options.arch, options.trust, options.overwrite, options.int8, options.threads
    out = Path(out)
    int8_out = out.with_name(out.stem + ".int8.onnx")
    if int8 and not calib_data:
        raise ConfigError("--int8 needs --calib-data DIR (a few hundred training images calibrate the activation ranges)")
    for path in (out, int8_out) if int8 else (out,):
        fileio.check_file_output(path, overwrite)
        if Path(model_path).exists() and path.resolve() == Path(model_path).resolve():
            raise OutputError(f"--out {path} is the checkpoint being exported; pass another --out (e.g. {path.with_suffix('.onnx')})")
    model, spec = open_model(model_path, arch, trust, input_size)
    data = None
    if int8:  # the calibration images are checked before anything is written
        data = open_dataset(calib_data, image_size=spec.input_size[1])
        check_compatible(replace(spec, input_size=tuple(spec.input_size)), data, "model")
    with fileio.interruptible() as stop:  # SIGTERM as Ctrl-C: the temporaries are removed, nothing half-written stays
        try:
            parity = export_checked(model, spec, out, atol=atol, rtol=rtol)
            if not int8:
                return Exported(out, parity)
            try:
                mean, std = normalization(spec, data)
                result = int8_with_evaluation(out, int8_out, data, mean, std, spec.input_size, calib_images, threads, reporter=reporter)
            except BaseException:
                out.unlink(missing_ok=True)
                raise
        except KeyboardInterrupt:
            raise Interrupted(f"stopped while exporting; {out} was not written and its temporary files are removed",
                              stop.signum or signal.SIGINT) from None
    return Exported(out, parity, result)


__all__ = ["compress", "train", "export", "Exported", "Report"]
