"""The whole job, one function per arrow: load → derive → pair → distil → evaluate → export →
profile → report. The CLI calls these; so can a five-line Python script.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
import torch
from torch import nn
from compressor import __version__, fileio
from compressor.pair import AttentionPair, find_pairs
from compressor.models.checkpoint import load_model, save_checkpoint
from compressor.models.spec import ModelSpec
from compressor.config import Config
from compressor.data.images import ImageData
from compressor.data.open import open_dataset
from compressor.derive.candidates import Candidate
from compressor import distributed
from compressor.device import Speed, autocast_dtype, pick_device
from compressor.distill.loop import METRICS_FILE, Teacher, fit, make_batches, objective_from
from compressor.evaluate import evaluate
from compressor.errors import ConfigError, DataError, OutputError
from compressor.events import SILENT, Reporter
from compressor.export.onnx import export_checked, to_onnx
from compressor.distill.losses import distillation_terms, input_gradient
from compressor.profiling.counts import count_macs, count_params
from compressor.profiling.latency import Timing, compare_latency, environment, measure_latency
from compressor.report.build import write_report
from compressor.derive.search import Target
from compressor.derive.thinning import describe_stages
from compressor.derive.candidates import choose_students, resolve_init




def prepare_output(out_dir: str | Path, overwrite: bool = False, resume: bool = False, create: bool = True) -> Path:
    """Refuse a non-empty ``out_dir`` unless the user said to overwrite or resume into it.

    ``create=False`` only checks, so that a run failing on its inputs leaves no empty folder behind.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; pass a folder")
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise OutputError(f"--out {out} is not empty; pass --overwrite to replace its files, --resume to continue, or another folder")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out



def load_data(spec: str | Path, cfg: Config, strict: bool = False, reporter: Reporter = SILENT,
              device: torch.device | None = None, workers: int | None = None, budget_bytes: int | None = None) -> ImageData:
    """The dataset, subset as the preset says. With ``device``, data too large for the memory it may
    use there is not loaded but streamed (``compressor.loaders``); the decision is reported."""
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



def train_model(arch: str, data: ImageData, cfg: Config, out_path: str | Path, device: torch.device | None = None,
                reporter: Reporter = SILENT, resume: bool = False, speed: Speed | None = None) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Train ``arch`` from scratch on ``data`` with the preset recipe; save an atc checkpoint (rank 0 of a
    data-parallel run alone writes it)."""
    out_path = Path(out_path)
    mean, std = data.channel_stats()
    spec = replace(ModelSpec.for_arch(arch, data.num_classes), class_names=list(data.class_names),
                   input_size=tuple(data.input_size), mean=mean, std=std)
    torch.manual_seed(cfg.train.seed)
    model = spec.build()
    result = fit(model, data, cfg, state_dir_for(out_path), mean, std, device=device or pick_device(),
                 reporter=reporter, resume=resume, tag=spec.name, speed=speed)
    metrics = {"top1": result.final["test_top1"], "history": result.history, "train_seconds": result.seconds,
               "data": data.name, "preset": cfg.preset, "epochs": cfg.train.epochs}
    if result.compile_seconds:
        metrics["compile_seconds"] = result.compile_seconds
    if distributed.is_main():
        save_checkpoint(out_path, model.cpu(), spec, metrics)
    return model.cpu(), spec, metrics



def state_dir_for(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".state")



@dataclass
class DryRun:
    student: Candidate
    pairs: list[AttentionPair]
    initial_terms: dict[str, float]
    stages: list[dict[str, Any]] = field(default_factory=list)  # per stage: blocks and width, student vs teacher



def initial_terms(student: nn.Module, teacher: nn.Module, pairs: list[AttentionPair], data: ImageData, cfg: Config,
                  mean, std, method: str) -> dict[str, float]:
    """The loss terms on one training batch before any training: a check that β and α are sane."""
    from compressor.pair import Taps

    train_b, _ = make_batches(data, cfg, mean, std, torch.device("cpu"))
    x, y = next(iter(train_b))
    s_taps, t_taps = Taps(student, [p.student.module for p in pairs]), Taps(teacher, [p.teacher.module for p in pairs])
    student.train(), teacher.eval()
    with torch.no_grad():
        t_logits, logits = teacher(x), student(x)
    obj, grads = objective_from(cfg, method), None
    s_maps, t_maps = s_taps.take([p.student.module for p in pairs]), t_taps.take([p.teacher.module for p in pairs])
    if obj.gradient and obj.uses_at:
        xg = x.clone().requires_grad_(True)
        grads = (input_gradient(student, xg, y)[0], input_gradient(teacher, xg, y)[0])
    terms = distillation_terms(obj, logits, y, t_logits, list(zip(s_maps, t_maps)), input_grads=grads)
    s_taps.remove(), t_taps.remove()
    return {k: float(v) for k, v in terms.items()}



def plan(teacher: nn.Module, t_spec: ModelSpec, data: ImageData, cfg: Config, candidates: list[Candidate], method: str) -> list[DryRun]:
    mean, std = normalization(t_spec, data)
    example = torch.zeros(1, *t_spec.input_size)
    out = []
    for cand in candidates:
        torch.manual_seed(cfg.train.seed)
        student = cand.spec.build()
        pairs = find_pairs(student, teacher, example, cfg.distill.at_layers)
        stages = (cand.spec.plan or {}).get("stages") or describe_stages(teacher, student, t_spec.input_size)
        out.append(DryRun(cand, pairs, initial_terms(student, teacher, pairs, data, cfg, mean, std, method), stages))
    return out



def _student_dir(out: Path, cand: Candidate, method: str) -> Path:
    return out / "students" / f"{cand.name}-{method.replace('+', '_')}"



def distill_student(cand: Candidate, teacher: nn.Module, t_spec: ModelSpec, data: ImageData, cfg: Config, method: str,
                    out: Path, device: torch.device, reporter: Reporter = SILENT, resume: bool = False,
                    init: str = "auto", speed: Speed | None = None) -> dict[str, Any]:
    """Train one student (skipped when a finished checkpoint is already there and ``resume``). A derived
    student starts from the teacher's surviving weights (``init="inherit"``) or from a fresh initialisation."""
    mean, std = normalization(t_spec, data)
    spec = replace(cand.spec, mean=mean, std=std, class_names=list(t_spec.class_names or data.class_names))
    sdir = _student_dir(out, cand, method)
    ckpt = sdir / "student.pt"
    if resume and ckpt.exists():
        model, spec, metrics = load_model(ckpt)
        reporter.info(f"{cand.name} ({method}) already finished; reusing {ckpt}")
        return {"model": model, "spec": spec, "metrics": metrics, "dir": sdir}
    torch.manual_seed(cfg.train.seed)
    model = spec.build()
    init = resolve_init(init, spec)
    if init == "inherit":
        from compressor.derive.thinning import inherit

        model.load_state_dict(inherit(teacher, spec.plan).state_dict())
    example = torch.zeros(1, *spec.input_size)
    pairs = find_pairs(model, teacher, example, cfg.distill.at_layers)
    result = fit(model, data, cfg, sdir, mean, std, Teacher(teacher, pairs), objective_from(cfg, method), device, reporter,
                 resume=resume, tag=f"{cand.name} ({method})", speed=speed)
    metrics = {"top1": result.final["test_top1"], "history": result.history, "train_seconds": result.seconds,
               "method": method, "teacher": t_spec.name, "epochs": cfg.train.epochs, "init": init,
               "pairs": ["input gradient dL/dx"] if cfg.distill.attention == "gradient" else [p.describe() for p in pairs]}
    if result.compile_seconds:
        metrics["compile_seconds"] = result.compile_seconds
    if distributed.is_main():
        save_checkpoint(ckpt, model.cpu(), spec, metrics)
    return {"model": model.cpu(), "spec": spec, "metrics": metrics, "dir": sdir}



def compress(teacher_path: str | Path, data_spec: str | Path, cfg: Config, out_dir: str | Path, *, method: str | None = None,
             students: list[str] | None = None, n_students: int = 0, arch: str | None = None, trust: bool = False,
             overwrite: bool = False, resume: bool = False, strict_data: bool = False, device: str = "auto",
             threads: int | None = None, int8: bool = False, width: float | str | None = None,
             blocks_per_stage: int | None = None, target: Target | None = None, init: str = "auto",
             reporter: Reporter = SILENT, command: str = "", speed: Speed | None = None) -> dict[str, Any]:
    """Distil one or more students from a trained teacher and write the full output set.

    ``speed`` sets precision, channels_last, torch.compile and DataLoader workers. Run under torchrun
    (several processes), each rank trains on its shard; rank 0 alone exports, measures and writes the
    report, and the other ranks return an empty dict.

    ``width``/``blocks_per_stage`` derive a thinned student from any traceable CNN; ``target`` searches
    the width (and depth) that meets a speed-up; ``init`` says whether a derived student inherits the
    teacher's surviving weights (``auto``/``inherit``) or starts fresh (``scratch``).

    With ``int8`` each student is also quantized (static QDQ, calibrated on training images) and
    its INT8 accuracy and latency join the report.
    """
    out = prepare_output(out_dir, overwrite, resume, create=False)
    speed = speed or Speed()
    method = method or cfg.distill.method
    teacher, t_spec, t_metrics = load_model(teacher_path, arch=arch, trust=trust)
    dev = pick_device(device)
    data = load_data(data_spec, cfg, strict_data, reporter, device=dev, workers=speed.workers)
    if int8 and not isinstance(data, ImageData):
        raise ConfigError("--int8 needs the images in memory for calibration, but this dataset is streamed from disk; "
                          "quantize afterwards with `atc export --int8 --calib-data` on a smaller folder")
    if t_spec.family == "module":
        raise ConfigError("a pickled nn.Module teacher cannot be rebuilt by name; save its state_dict and pass --arch")
    t_spec = replace(t_spec, input_size=t_spec.input_size if t_spec.mean is not None else tuple(data.input_size))
    check_compatible(t_spec, data)
    mean, std = normalization(t_spec, data)
    t_spec = replace(t_spec, mean=mean, std=std, class_names=list(t_spec.class_names or data.class_names))
    candidates = choose_students(t_spec, cfg, students, n_students, teacher_model=teacher, width=width,
                                 blocks_per_stage=blocks_per_stage, target=target, reporter=reporter)
    for c in candidates:
        resolve_init(init, c.spec)  # fail before any training
    prepare_output(out, overwrite, resume)
    distributed.barrier()  # every rank has checked --out before any of them writes into it
    _, test_b = make_batches(data, cfg, mean, std, dev, workers=speed.workers)
    teacher.to(dev)
    t_top1 = evaluate(teacher, test_b, autocast_dtype(speed.precision, dev))["top1"]
    reporter.info(f"teacher {t_spec.name}: test top-1 {t_top1:.2f}% on {data.name}")
    results = [distill_student(c, teacher, t_spec, data, cfg, method, out, dev, reporter, resume, init, speed) for c in candidates]
    teacher.cpu()
    if not distributed.is_main():
        return {}
    report = build_report(teacher, t_spec, t_top1, results, candidates, data, cfg, method, out, threads, reporter, command, int8)
    _publish_primary(out, results[0])
    write_report(out, report)
    from compressor.report.plots import plot_curves

    plot_curves(out / "curves.png", (t_spec.name, t_metrics.get("history", [])),
                [(f"{c.name} ({method})", r["metrics"].get("history", [])) for c, r in zip(candidates, results)])
    return report



def _publish_primary(out: Path, primary: dict[str, Any]) -> None:
    """The first student's files also sit at the top of ``out`` (student.pt, student.onnx, metrics.jsonl)."""
    for name in ("student.pt", "student.onnx", METRICS_FILE):
        with fileio.atomic_path(out / name) as tmp:
            shutil.copyfile(primary["dir"] / name, tmp)



def build_report(teacher: nn.Module, t_spec: ModelSpec, t_top1: float, results: list[dict[str, Any]],
                 candidates: list[Candidate], data: ImageData, cfg: Config, method: str, out: Path,
                 threads: int | None, reporter: Reporter = SILENT, command: str = "", int8: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:  # one teacher export serves every latency comparison
        t_onnx = to_onnx(teacher, t_spec.input_size, Path(tmp) / "teacher.onnx")
        return _report(teacher, t_onnx, t_spec, t_top1, results, candidates, data, cfg, method, out, threads, reporter, command, int8)



def _report(teacher: nn.Module, t_onnx: Path, t_spec: ModelSpec, t_top1: float, results: list[dict[str, Any]],
            candidates: list[Candidate], data: ImageData, cfg: Config, method: str, out: Path,
            threads: int | None, reporter: Reporter, command: str, int8: bool) -> dict[str, Any]:
    t_params, t_macs = count_params(teacher)["total"], count_macs(teacher, t_spec.input_size).gmacs
    reporter.info("measuring teacher latency (onnxruntime CPU, batch 1)")
    t_lat = measure_latency(teacher, t_spec.input_size, "ort-cpu", 1, threads, Timing(min_time_s=0.5), onnx_path=t_onnx)
    students, speed = [], None
    for res, cand in zip(results, candidates):
        onnx_path = res["dir"] / "student.onnx"
        parity = export_checked(res["model"], res["spec"], onnx_path)
        reporter.info(f"{cand.name}: exported {onnx_path} (max |ORT - torch| {parity.worst:.1e}); timing against the teacher")
        speed = compare_latency(teacher, res["model"], t_spec.input_size, "ort-cpu", 1, threads, teacher_onnx=t_onnx,
                                student_onnx=onnx_path)
        top1 = res["metrics"]["top1"]
        students.append({
            "name": cand.name, "method": method, "role": "student", "params": cand.params, "gmacs": cand.gmacs,
            "gflops": 2 * cand.gmacs, "top1": top1, "top1_delta": top1 - t_top1, "param_ratio": cand.param_ratio,
            "mac_ratio": cand.mac_ratio, "latency_ms": speed.student_ms, "latency_speedup": speed.speedup,
            "latency_speedup_spread": list(speed.spread), "latency_speedup_quartiles": list(speed.quartiles), "checkpoint": str((res["dir"] / "student.pt").relative_to(out)),
            "onnx": str(onnx_path.relative_to(out)), "onnx_parity_max_abs_diff": {str(k): v for k, v in parity.max_abs_diff.items()},
            "train_seconds": res["metrics"].get("train_seconds"), "epochs": cfg.train.epochs,
            "attention_pairs": res["metrics"].get("pairs", []), "init": res["metrics"].get("init"),
        })
        if res["spec"].plan is not None:  # a derived student: its shape and, after a search, target vs achieved
            plan_ = res["spec"].plan
            students[-1]["derived"] = {"width": plan_.get("width"), "removed_blocks": plan_.get("removed_blocks", []),
                                       "stages": plan_.get("stages", []),
                                       "search": {k: v for k, v in plan_.get("search", {}).items() if k != "trials"} or None}
        if int8:
            students[-1]["int8"] = _int8_entry(t_onnx, res, onnx_path, data, t_spec, t_top1, threads, out, reporter)
    return {
        "atc_version": __version__, "report_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command,
        "preset": cfg.preset, "method": method, "epochs": cfg.train.epochs, "config": cfg.to_dict(),
        "data": {"name": data.name, "train": len(data.train_y), "test": len(data.test_y), "classes": data.num_classes},
        "units": {"gmacs": "fvcore multiply-adds, one multiply-add = one flop; GFLOPs = 2 x GMACs", "latency": "milliseconds"},
        "latency": {"runtime": "ort-cpu", "batch_size": 1, "threads": t_lat.threads, "rounds": speed.rounds if speed else 0,
                    "teacher_median_ms": t_lat.median_ms, "teacher_cv": t_lat.cv},
        "teacher": {"name": t_spec.name, "params": t_params, "gmacs": t_macs, "gflops": 2 * t_macs, "top1": t_top1,
                    "latency_ms": speed.teacher_ms if speed else t_lat.median_ms},
        "students": students, "environment": environment(),
    }



def _int8_entry(t_onnx: Path, res: dict[str, Any], onnx_path: Path, data: ImageData, t_spec: ModelSpec, t_top1: float,
                threads: int | None, out: Path, reporter: Reporter) -> dict[str, Any]:
    from compressor.export.int8 import int8_with_evaluation

    spec = res["spec"]
    q_path = onnx_path.with_name("student.int8.onnx")
    reporter.info(f"{spec.name}: INT8 static quantization (QDQ, U8 activations, S8 per-channel weights)")
    r = int8_with_evaluation(onnx_path, q_path, data, spec.mean, spec.std, spec.input_size, threads=threads)
    vs_teacher = compare_latency(None, None, t_spec.input_size, "ort-cpu", 1, threads, teacher_onnx=t_onnx, student_onnx=q_path)
    return {**r.to_dict(), "path": str(q_path.relative_to(out)), "top1_delta": r.top1_int8 - t_top1,
            "latency_speedup_vs_teacher": vs_teacher.speedup, "latency_ms": vs_teacher.student_ms}
