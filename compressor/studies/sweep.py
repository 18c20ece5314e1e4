"""Grid sweeps: distil one student per (grid cell, seed), aggregate top-1 per cell, plot it.

A grid axis is ``key=v1,v2,…``. Keys: ``beta``, ``attention`` (``sum-p:P``, ``max-p:P``,
``gradient``), the shorthands in ``SHORTHAND`` or any ``section.key`` of the config (not
``data.*``: every cell trains on the same images). Runs live in
``OUT/runs/<cell>/seed-<s>/`` with a ``run.json`` of the configuration they train with; a run
whose student checkpoint exists is reused, so re-running a sweep only trains what is missing
(and an interrupted run resumes from its last epoch). At β = 0 the attention mechanism cannot
change training, so those cells share one run per seed instead of training identical students.

Outputs: ``sweep.json`` (every run and every cell's n, mean, sample std and median top-1),
``sweep.md`` (the table) and ``sweep.png`` (top-1 against β on a log axis, one line per
mechanism; the β = 0 baseline as a dashed line).
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from compressor import fileio
from compressor.config import SECTIONS, Config, load_config, parse_attention, parse_overrides
from compressor.derive.candidates import Candidate, StudentChoice, choose
from compressor.device import pick_device
from compressor.distill.loop import make_batches
from compressor.distill.student import DistilledStudent, distill_student
from compressor.errors import ConfigError, OutputError
from compressor.evaluate import evaluate
from compressor.events import SILENT, Reporter
from compressor.load import load_teacher_and_data
from compressor.options import RunOptions
from compressor.report.plots import plot_sweep
from compressor.report.tables import sweep_markdown as markdown

SHORTHAND = {"beta": "distill.beta", "p": "distill.p", "method": "distill.method", "alpha": "distill.alpha",
             "at_form": "distill.at_form", "at_layers": "distill.at_layers", "beta_schedule": "distill.beta_schedule",
             "flip_beta": "distill.flip_beta", "temperature": "distill.temperature", "lr": "train.lr",
             "epochs": "train.epochs", "weight_decay": "train.weight_decay"}

ATTENTION_KEYS = ("attention", "distill.attention", "distill.p", "p", "at_form", "distill.at_form", "at_layers",
                  "distill.at_layers", "flip_beta", "distill.flip_beta", "beta_schedule", "distill.beta_schedule")


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple[str, ...]


@dataclass
class Cell:
    params: dict[str, str]  # grid key → value as the user wrote it
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def top1s(self) -> list[float]:
        return [r["top1"] for r in self.runs if r.get("top1") is not None]


def parse_grid(items: Sequence[str]) -> list[Axis]:
    """``["beta=0,1e3", "attention=sum-p:2,gradient"]`` → axes, each value checked."""
    axes: list[Axis] = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        vals = tuple(v.strip() for v in values.split(",") if v.strip())
        if not sep or not key or not vals:
            raise ConfigError(f"--grid '{item}' must look like key=v1,v2, e.g. beta=0,1e3 or attention=sum-p:2,gradient")
        if any(a.key == key for a in axes):
            raise ConfigError(f"--grid names '{key}' twice; give all its values in one --grid {key}=…")
        if len(set(vals)) != len(vals):
            raise ConfigError(f"--grid {key} repeats a value; list each value once")
        for v in vals:
            overrides_for(key, v)  # validates the key and, for attention, the value
        axes.append(Axis(key, vals))
    if not axes:
        raise ConfigError("a sweep needs at least one --grid key=v1,v2 (e.g. --grid beta=0,1e3)")
    return axes


def overrides_for(key: str, value: str) -> dict[str, dict[str, Any]]:
    """One grid setting as config overrides."""
    if key == "attention":
        name, p = parse_attention(value)
        return {"distill": {"attention": name, **({"p": p} if p is not None else {})}}
    dotted = SHORTHAND.get(key, key)
    section, dot, name = dotted.partition(".")
    if not dot or section not in SECTIONS:
        raise ConfigError(f"--grid key '{key}' is unknown; use attention, {', '.join(SHORTHAND)} or section.key (e.g. train.lr)")
    if section == "data":
        raise ConfigError(f"--grid {key}: data settings cannot vary within a sweep (every cell trains on the same images); "
                          "set them with --set for the whole sweep")
    return parse_overrides([f"{dotted}={value}"])


def expand(axes: Sequence[Axis]) -> list[Cell]:
    return [Cell(dict(zip([a.key for a in axes], combo))) for combo in itertools.product(*[a.values for a in axes])]


def _merge(into: dict[str, dict[str, Any]], more: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {s: dict(v) for s, v in into.items()}
    for s, v in more.items():
        out.setdefault(s, {}).update(v)
    return out


def _slug(params: dict[str, str]) -> str:
    text = "_".join(f"{k}={v}" for k, v in params.items()) or "base"
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", text)


def cell_config(preset: str | Path, base: dict[str, dict[str, Any]], cell: Cell, method: str, seed: int) -> tuple[Config, str]:
    """The configuration one (cell, seed) trains with and the folder name of its run.

    Where the AT term is off (β = 0 or a method without AT) the attention settings are dropped,
    so such cells share their run.
    """
    probe = base
    for k, v in cell.params.items():
        probe = _merge(probe, overrides_for(k, v))
    cfg = load_config(preset, probe)
    at_on = "at" in method.split("+") and cfg.distill.beta > 0
    params = {k: v for k, v in cell.params.items() if at_on or k not in ATTENTION_KEYS}
    merged = base
    for k, v in params.items():
        merged = _merge(merged, overrides_for(k, v))
    merged = _merge(merged, {"train": {"seed": seed}})
    return load_config(preset, merged), _slug(params)


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, sample standard deviation (0 for one value) and median."""
    if not values:
        return {"n": 0, "mean": None, "std": None, "median": None}
    return {"n": len(values), "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values)}


def run_sweep(teacher_path: str | Path, data_spec: str | Path, out_dir: str | Path, preset: str | Path, grid: Sequence[str],
              *, overrides: dict[str, dict[str, Any]] | None = None, seeds: int = 1, method: str | None = None,
              student: str | None = None, jobs: int = 1, options: RunOptions = RunOptions(),
              reporter: Reporter = SILENT) -> dict[str, Any]:
    """Train every (cell, seed) not finished yet in ``out_dir``, then write sweep.json, sweep.md and sweep.png.

    ``jobs`` > 1 trains that many runs at once, each in its own process with its own copy of the
    teacher and the data: small students leave a GPU (or a many-core CPU) mostly idle, and
    several of them side by side raise the total throughput. From ``options``: ``device``, how to
    read the teacher (``arch``, ``trust``) and the ``command`` recorded in sweep.json."""
    if jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    if seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    axes = parse_grid(grid)
    base = {s: dict(v) for s, v in (overrides or {}).items()}
    base_cfg = load_config(preset, base)
    method = method or base_cfg.distill.method
    if method not in ("none", "kd", "at", "at+kd"):
        raise ConfigError(f"--method {method} is unknown; choose none, kd, at or at+kd")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; pass a folder")
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_teacher_and_data(teacher_path, data_spec, base_cfg, options, reporter=reporter)
    teacher, t_spec, data = loaded.model, loaded.spec, loaded.data
    mean, std = loaded.mean_std
    dev = pick_device(options.device)
    cand = choose(loaded, base_cfg, StudentChoice(names=(student,) if student else ()), reporter)[0]
    _, test_b = make_batches(data, base_cfg, mean, std, dev)
    t_top1 = evaluate(teacher.to(dev), test_b).top1
    reporter.info(f"teacher {t_spec.name}: test top-1 {t_top1:.2f}% on {data.name} ({len(data.test_y)} test images)")
    cells = expand(axes)
    seed_list = [base_cfg.train.seed + i for i in range(seeds)]
    schedule = []
    for cell in cells:
        for s in seed_list:
            cfg, slug = cell_config(preset, base, cell, method, s)
            schedule.append((cell, s, cfg, out / "runs" / slug / f"seed-{s}"))
    unique = {str(d) for *_, d in schedule}
    reporter.info(f"{len(cells)} cells x {seeds} seeds = {len(schedule)} runs, {len(unique)} distinct (β = 0 cells share theirs); "
                  f"student {cand.name}, method {method}")
    todo = {}
    for i, (cell, s, cfg, run_dir) in enumerate(schedule, 1):
        if str(run_dir) not in todo:
            _check_run_config(run_dir, cfg, method, cand.name)
            todo[str(run_dir)] = (i, cell, s, cfg, run_dir)
    runs = RunSpec(teacher_path, data_spec, base_cfg, options, cand, method)
    if jobs > 1 and len(todo) > 1:
        done = _train_in_processes(runs, list(todo.values()), jobs, len(schedule), reporter)
    else:
        done = {}
        for key, (i, cell, s, cfg, run_dir) in todo.items():
            reporter.info(f"[{i}/{len(schedule)}] {_describe(cell)} seed {s}")
            torch.manual_seed(s)
            res = distill_student(cand, loaded, cfg, method, run_dir, dev, options=RESUMING, reporter=reporter)
            done[key] = _run_entry(res, s)
    for cell, s, cfg, run_dir in schedule:
        entry = dict(done[str(run_dir)])
        entry["dir"], entry["checkpoint"] = str(Path(entry["dir"]).relative_to(out)), str(Path(entry["checkpoint"]).relative_to(out))
        cell.runs.append(entry)
    result = {
        "sweep_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": options.command,
        "teacher": {"name": t_spec.name, "top1": t_top1, "path": str(teacher_path)}, "student": cand.name, "method": method,
        "preset": base_cfg.preset, "epochs": base_cfg.train.epochs, "seeds": seed_list,
        "grid": {a.key: list(a.values) for a in axes},
        "data": {"name": data.name, "train": len(data.train_y), "test": len(data.test_y)},
        "cells": [{"params": c.params, **summarize(c.top1s), "runs": c.runs} for c in cells],
        "config": base_cfg.to_dict(),
    }
    write_outputs(out, result)
    return result


def _describe(cell: Cell) -> str:
    return " ".join(f"{k}={v}" for k, v in cell.params.items())


RESUMING = RunOptions(resume=True)  # a sweep run whose student is finished is reused, an unfinished one continues


def _run_entry(res: DistilledStudent, seed: int) -> dict[str, Any]:
    """One finished run as sweep.json lists it (absolute paths; made relative by the caller)."""
    return {"seed": seed, "top1": float(res.top1), "dir": str(res.dir), "train_seconds": res.train_seconds,
            "checkpoint": str(res.dir / "student.pt")}


@dataclass(frozen=True)
class RunSpec:
    """What a worker process needs to train runs of a sweep on its own: where the teacher and data
    are and how to load them, the student and the method."""

    teacher_path: str | Path
    data_spec: str | Path
    base_cfg: Config
    options: RunOptions
    student: Candidate
    method: str


_WORKER: dict[str, Any] = {}  # per worker process: the teacher and data it loaded once


def _train_one(runs: RunSpec, cfg: Config, seed: int, run_dir: Path) -> dict[str, Any]:
    if "loaded" not in _WORKER:
        _WORKER["loaded"] = load_teacher_and_data(runs.teacher_path, runs.data_spec, runs.base_cfg, runs.options)
    loaded = _WORKER["loaded"]
    torch.manual_seed(seed)
    res = distill_student(runs.student, loaded, cfg, runs.method, run_dir, pick_device(runs.options.device), options=RESUMING)
    return _run_entry(res, seed)


def _train_in_processes(runs: RunSpec, todo: list, jobs: int, total: int, reporter: Reporter) -> dict[str, dict[str, Any]]:
    """Train ``todo`` on ``jobs`` worker processes (spawned: CUDA cannot be forked); report each run as it ends."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    reporter.info(f"training {len(todo)} runs, {min(jobs, len(todo))} at a time in separate processes")
    done: dict[str, dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_one, runs, cfg, s, run_dir): (i, cell, s, run_dir) for i, cell, s, cfg, run_dir in todo}
        for fut in as_completed(futures):
            i, cell, s, run_dir = futures[fut]
            done[str(run_dir)] = entry = fut.result()
            reporter.info(f"[{i}/{total}] {_describe(cell)} seed {s}: top-1 {entry['top1']:.2f}%")
    return done


def _check_run_config(run_dir: Path, cfg: Config, method: str, student: str) -> None:
    want = {"config": cfg.to_dict(), "method": method, "student": student}
    path = run_dir / "run.json"
    if path.exists():
        have = json.loads(path.read_text())
        if have != json.loads(json.dumps(want)):
            raise OutputError(f"{run_dir} was trained with other settings (preset, --set, --method or --student changed); "
                              "use another --out for this sweep or delete that folder")
    else:
        fileio.write_json(path, want)


def write_outputs(out: Path, result: dict[str, Any]) -> None:
    fileio.write_json(out / "sweep.json", result)
    fileio.write_text(out / "sweep.md", markdown(result))
    plot_sweep(result, out / "sweep.png")
