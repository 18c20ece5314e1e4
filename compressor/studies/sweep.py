"""Grid sweeps: distil one student per (grid cell, seed), aggregate top-1 per cell, plot it.

A grid axis is ``key=v1,v2,…``. Keys: ``beta``, ``attention`` (``sum-p:P``, ``max-p:P``,
``gradient``), the shorthands in ``SHORTHAND`` or any ``section.key`` of the config (not
``data.*``: every cell trains on the same images). Runs live in
``OUT/runs/<cell>/seed-<s>/`` with a ``run.json`` of the configuration they train with and, once
finished, the runner's ``cell.json``. The runs train on ``compressor.studies.runner`` (one after
another, in worker processes on the node's GPUs, or as Ray tasks); with ``resume`` a sweep keeps its
finished runs and continues the half-done ones from their last epoch. At β = 0 the attention
mechanism cannot change training, so those cells share one run per seed instead of training
identical students.

A ``method`` axis (``method=none,kd,fitnet,at,at+kd,dkd,at+dkd``) compares methods on equal terms: the
same student, recipe and seeds (so the same initial weights and batch order per seed); each cell then
also gets its paired difference from the ``none`` cell, seed by seed.

Outputs: ``sweep.json`` (every run and every cell's n, mean, sample std and median top-1, and with a
method axis ``vs_none``), ``sweep.md`` (the table) and ``sweep.png`` (top-1 against β on a log axis, one line per
mechanism; the β = 0 baseline as a dashed line).
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from compressor import fileio
from compressor.config import SECTIONS, Config, canonical_method, load_config, parse_attention, parse_method, parse_overrides
from compressor.derive.candidates import Candidate, StudentChoice, choose
from compressor.device import pick_device
from compressor.distill.loop import make_batches
from compressor.distill.student import distill_student
from compressor.errors import ConfigError, OutputError
from compressor.evaluate import evaluate
from compressor.events import SILENT, Reporter
from compressor.load import TeacherAndData, load_teacher_and_data
from compressor.options import RunOptions
from compressor.report.plots import plot_sweep
from compressor.report.tables import sweep_markdown as markdown
from compressor.studies.runner import Blob, CellContext, Engine, Task, import_ray, run_cells, runner_cache

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
            raise ConfigError(f"--grid {item!r} must look like key=v1,v2, e.g. beta=0,1e3 or attention=sum-p:2,gradient")
        if any(a.key == key for a in axes):
            raise ConfigError(f"--grid names {key!r} twice; give all its values in one --grid {key}=…")
        same = _repeated(vals)
        if same:
            raise ConfigError(f"--grid {key} repeats a value ({' and '.join(map(repr, same))} are the same setting); "
                              "list each value once")
        for v in vals:
            overrides_for(key, v)  # validates the key and, for attention, the value
            if SHORTHAND.get(key, key) == "distill.method":
                canonical_method(v)  # an invalid combination is refused before anything loads
        axes.append(Axis(key, vals))
    if not axes:
        raise ConfigError("a sweep needs at least one --grid key=v1,v2 (e.g. --grid beta=0,1e3)")
    return axes


def _repeated(values: Sequence[str]) -> tuple[str, ...]:
    """The first two values that mean the same setting (``1e3`` and ``1000``, ``sum-p:2`` and
    ``sum-p:2.0``): two cells would train the same student."""
    seen: dict[str, str] = {}
    for v in values:
        try:
            name, _, p = v.partition(":")
            key = f"{name}:{float(p)!r}" if p else repr(float(v))
        except ValueError:
            key = v
        if key in seen:
            return seen[key], v
        seen[key] = v
    return ()


def overrides_for(key: str, value: str) -> dict[str, dict[str, Any]]:
    """One grid setting as config overrides."""
    if key == "attention":
        name, p = parse_attention(value)
        return {"distill": {"attention": name, **({"p": p} if p is not None else {})}}
    dotted = SHORTHAND.get(key, key)
    section, dot, name = dotted.partition(".")
    if not dot or section not in SECTIONS:
        raise ConfigError(f"--grid key {key!r} is unknown; use attention, {', '.join(SHORTHAND)} or section.key (e.g. train.lr)")
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

    ``method`` is the sweep's; a ``method`` axis of the grid overrides it per cell. Where the AT term is off
    (β = 0 or a method without AT) the attention settings are dropped, so such cells share their run.
    """
    base = _merge(base, {"distill": {"method": canonical_method(method)}})
    probe = base
    for k, v in cell.params.items():
        probe = _merge(probe, overrides_for(k, v))
    cfg = load_config(preset, probe)
    at_on = "at" in parse_method(cfg.distill.method) and cfg.distill.beta > 0  # the cell's method (a grid axis, or the sweep's)
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


def paired_vs_none(cell: Cell, cells: Sequence[Cell]) -> dict[str, Any]:
    """With a ``method`` axis: the cell's top-1 minus that of the ``method=none`` cell with the same other
    settings, seed by seed (the same seeds: the same initial student and batch order), summarised as
    ``vs_none`` (n, mean, std, median of the differences, in points); nothing without such a cell."""
    if "method" not in cell.params:
        return {}
    ref = next((c for c in cells if c.params == {**cell.params, "method": "none"}), None)
    if ref is None or ref is cell:
        return {}
    base = {r["seed"]: r["top1"] for r in ref.runs if r.get("top1") is not None}
    diffs = [r["top1"] - base[r["seed"]] for r in cell.runs if r.get("top1") is not None and r["seed"] in base]
    return {"vs_none": summarize(diffs)}


def run_sweep(teacher_path: str | Path, data_spec: str | Path, out_dir: str | Path, preset: str | Path, grid: Sequence[str],
              *, overrides: dict[str, dict[str, Any]] | None = None, seeds: int = 1, method: str | None = None,
              student: str | None = None, engine: Engine = Engine(), options: RunOptions = RunOptions(),
              reporter: Reporter = SILENT) -> dict[str, Any]:
    """Train every (cell, seed) of the grid in ``out_dir``, then write sweep.json, sweep.md and sweep.png.

    ``engine`` says where the runs train (``compressor.studies.runner``): one after another here, in
    worker processes placed on the node's GPUs (small students leave a GPU mostly idle, and several side by
    side raise the total throughput), or as Ray tasks. The teacher is read once and every run gets the same
    bytes. ``options.resume`` continues a sweep in ``out_dir``: finished runs are kept, half-done ones go on
    from their last epoch, failed ones are tried again; without it an ``out_dir`` holding runs is refused.
    A run that fails is reported (sweep.json ``failed``) and the others go on. From ``options`` also:
    ``device``, how to read the teacher (``arch``, ``trust``) and the ``command`` recorded in sweep.json."""
    if seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    if engine.ray is not None:
        import_ray(local=engine.ray == "local")  # before an hour of loading and checking, not after
    axes = parse_grid(grid)
    base = {s: dict(v) for s, v in (overrides or {}).items()}
    base_cfg = load_config(preset, _merge(base, {"distill": {"method": canonical_method(method)}}) if method else base)
    method = base_cfg.distill.method  # every cell's config carries the method it trains with (a method axis overrides it)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; pass a folder")
    fileio.check_writable(out)
    loaded = load_teacher_and_data(teacher_path, data_spec, base_cfg, options, reporter=reporter)
    teacher_bytes = Blob.read(teacher_path)  # what every run trains against, even if the file changes meanwhile
    t_spec, data = loaded.spec, loaded.data
    mean, std = loaded.mean_std
    dev = pick_device(options.device)
    cand = choose(loaded, base_cfg, StudentChoice(names=(student,) if student else ()), reporter)[0]
    _, test_b = make_batches(data, base_cfg, mean, std, dev)
    with test_b:
        t_top1 = evaluate(loaded.model.to(dev), test_b).top1
    reporter.info(f"teacher {t_spec.name}: test top-1 {t_top1:.2f}% on {data.name} ({len(data.test_y)} test images)")
    cells = expand(axes)
    seed_list = [base_cfg.train.seed + i for i in range(seeds)]
    schedule = []
    for cell in cells:
        for s in seed_list:
            cfg, slug = cell_config(preset, base, cell, method, s)
            schedule.append((cell, s, cfg, out / "runs" / slug / f"seed-{s}"))
    spec = RunSpec(data_spec, base_cfg, options, cand, method)
    tasks: dict[str, Task] = {}
    for cell, s, cfg, run_dir in schedule:
        key = run_dir.relative_to(out).as_posix()
        if key not in tasks:
            _check_run_config(run_dir, cfg, cfg.distill.method, cand.name)
            tasks[key] = Task(key, run_dir, SweepRun(spec, cfg, s))
    reporter.info(f"{len(cells)} cells x {seeds} seeds = {len(schedule)} runs, {len(tasks)} distinct (β = 0 cells share theirs); "
                  f"student {cand.name}, method {method}")
    out.mkdir(parents=True, exist_ok=True)  # only now: a sweep refused on its grid, teacher or data leaves no folder
    cache_teacher(spec, teacher_bytes.sha256, loaded)  # runs in this process reuse the teacher and data loaded here
    engine = replace(engine, gpus=0) if dev.type == "cpu" else engine
    outcomes = {o.key: o for o in run_cells(train_run, list(tasks.values()), engine, resume=options.resume,
                                            shared={"teacher": teacher_bytes}, reporter=reporter)}
    for cell, s, cfg, run_dir in schedule:
        o = outcomes[run_dir.relative_to(out).as_posix()]
        if o.finished:
            cell.runs.append(o.value)
    failed = [{"run": o.key, "status": o.status, "error": o.error} for o in outcomes.values() if not o.finished]
    result = {
        "sweep_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": options.command,
        "teacher": {"name": t_spec.name, "top1": t_top1, "path": str(teacher_path), "sha256": teacher_bytes.sha256},
        "student": cand.name, "method": _method_shown(method, axes), "preset": base_cfg.preset, "epochs": base_cfg.train.epochs, "seeds": seed_list,
        "grid": {a.key: list(a.values) for a in axes},
        "data": {"name": data.name, "train": len(data.train_y), "test": len(data.test_y)},
        "cells": [{"params": c.params, **summarize(c.top1s), **paired_vs_none(c, cells), "runs": c.runs} for c in cells],
        "failed": failed, "config": base_cfg.to_dict(),
    }
    write_outputs(out, result)
    return result


@dataclass(frozen=True)
class RunSpec:
    """What every run of a sweep shares: where the data is and how to read it, the sweep's base recipe, the
    student and the method. The teacher travels apart, as bytes (``runner.Blob``)."""

    data_spec: str | Path
    base_cfg: Config
    options: RunOptions
    student: Candidate
    method: str


@dataclass(frozen=True)
class SweepRun:
    """One run: the shared spec, the recipe of its cell and its seed."""

    spec: RunSpec
    cfg: Config
    seed: int


def _teacher_key(spec: RunSpec, sha256: str) -> tuple:
    return ("sweep-teacher", sha256, str(spec.data_spec), json.dumps(spec.base_cfg.to_dict()["data"], sort_keys=True),
            spec.options.arch, spec.options.trust)


def cache_teacher(spec: RunSpec, sha256: str, loaded: TeacherAndData) -> None:
    runner_cache()[_teacher_key(spec, sha256)] = loaded


def train_run(run: SweepRun, ctx: CellContext) -> dict[str, Any]:
    """Train one run of a sweep wherever the runner put it; the teacher and data are loaded once per process."""
    spec = run.spec
    run_dir = ctx.folder
    _check_run_config(run_dir, run.cfg, run.cfg.distill.method, spec.student.name, write=True)
    key = _teacher_key(spec, ctx.sha256("teacher"))
    if key not in ctx.cache:
        ctx.cache[key] = load_teacher_and_data(ctx.path("teacher"), spec.data_spec, spec.base_cfg, spec.options)
    torch.manual_seed(run.seed)
    res = distill_student(spec.student, ctx.cache[key], run.cfg, run.cfg.distill.method, run_dir, pick_device(spec.options.device),
                          options=replace(spec.options, resume=ctx.resume), reporter=ctx.reporter)
    student = f"{ctx.key}/{res.dir.relative_to(run_dir).as_posix()}"  # relative to the sweep folder, as the key is
    return {"seed": run.seed, "top1": float(res.top1), "dir": student, "train_seconds": res.train_seconds,
            "checkpoint": f"{student}/student.pt"}


def _method_shown(method: str, axes: Sequence[Axis]) -> str:
    """The sweep's method, or with a ``method`` axis the methods it compares."""
    axis = next((a for a in axes if a.key == "method"), None)
    return method if axis is None else "methods " + ", ".join(axis.values)


def _check_run_config(run_dir: Path, cfg: Config, method: str, student: str, write: bool = False) -> None:
    """A run folder trained with other settings is refused; ``write``: record the settings of a new one."""
    want = {"config": cfg.to_dict(), "method": method, "student": student}
    path = run_dir / "run.json"
    if path.exists():
        try:
            have = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OutputError(f"{path} is damaged ({type(exc).__name__}); delete that run folder (it is trained again) "
                              "or use another --out") from None
        if not isinstance(have, dict) or not all(k in have for k in want):
            missing = next((k for k in want if not isinstance(have, dict) or k not in have), "config")
            raise OutputError(f"{path}: field {missing!r} is missing; delete that run folder (it is trained again) "
                              "or use another --out")
        if have != json.loads(json.dumps(want)):
            raise OutputError(f"{run_dir} was trained with other settings (preset, --set, --method or --student changed); "
                              "use another --out for this sweep or delete that folder")
    elif write:
        fileio.write_json(path, want)


def write_outputs(out: Path, result: dict[str, Any]) -> None:
    fileio.write_json(out / "sweep.json", result)
    fileio.write_text(out / "sweep.md", markdown(result))
    plot_sweep(result, out / "sweep.png")
