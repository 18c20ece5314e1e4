"""Studies over trained models: ``atc attention`` (maps, agreement, localisation) and ``atc sweep``
(a grid of distillation settings over seeds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from cli import common
from cli.common import (
    ARCH,
    DEVICE,
    EPOCHS,
    INPUT,
    OUTPUT,
    PRESET,
    SET,
    SUBSET,
    TRUST,
    command_line,
    config_from,
    overrides_from,
    stdout,
    table,
)
from cli.progress import RichReporter, stderr
from compressor.report.tables import fmt_optional, plural


def attention(
    teacher: Path = typer.Option(..., "--teacher", help="Teacher checkpoint (atc format).", rich_help_panel=INPUT),
    student_checkpoint: Optional[Path] = typer.Option(None, "--student-checkpoint", help="Trained student's checkpoint to compare "
                                                      "with the teacher (e.g. runs/x/student.pt).", rich_help_panel=INPUT),
    old_student: Optional[str] = typer.Option(None, "--student", hidden=True),
    data: str = typer.Option(..., "--data", help="Dataset folder, 'digits' or 'shapes' (generated, with object masks).",
                             rich_help_panel=INPUT),
    out: Path = typer.Option(Path("maps.png"), "--out", help="PNG to write: input, teacher map and student map per stage.",
                             rich_help_panel=OUTPUT),
    overlay: bool = typer.Option(False, "--overlay", help="Draw each map over its image (in grey) instead of alone.",
                                 rich_help_panel=OUTPUT),
    images: int = typer.Option(8, "--images", min=1, max=64, help="Rows (test images) in the grid."),
    test_images: int = typer.Option(2000, "--test-images", min=0, help="Test images for the per-stage numbers (0 = all)."),
    mechanism: Optional[str] = typer.Option(None, "--attention", help="sum-p[:P], max-p[:P] or gradient (default: the preset's)."),
    p: Optional[float] = typer.Option(None, "--p", min=0.0, help="Exponent p of |A|^p (default: the preset's; 1 for gradient)."),
    at_layers: Optional[str] = typer.Option(None, "--at-layers", help="all, lastN or comma list of stage names."),
    localization: bool = typer.Option(False, "--localization", help="Also score the share of attention on the object (needs --data shapes)."),
    dilate: int = typer.Option(0, "--dilate", min=0, help="Grow the object masks by N pixels for --localization (edges count)."),
    preset: Optional[str] = PRESET,
    overrides: Optional[List[str]] = SET,
    device: str = DEVICE,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    trust_checkpoint: bool = TRUST, arch: Optional[str] = ARCH, mean: Optional[str] = common.MEAN, std: Optional[str] = common.STD,
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON on stdout."),
) -> None:
    """Attention maps of a teacher (and student) per AT stage, their agreement and object localisation."""
    from compressor.config import parse_attention
    from compressor.errors import ConfigError, OutputError
    from compressor.options import RunOptions
    from compressor.studies.attention import AttentionOptions, attention_report

    if old_student is not None:  # one word per meaning: --student names an architecture in compress and sweep
        raise ConfigError(f"atc attention takes the trained student's checkpoint as --student-checkpoint {old_student} "
                          "(--student names a student architecture in compress and sweep)")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    name, mp = parse_attention(mechanism) if mechanism else (None, None)
    cfg = config_from(preset, overrides, data)
    view = AttentionOptions(images=images, test_images=test_images, attention=name, p=p if p is not None else mp, layers=at_layers,
                            localization=localization, dilate_px=dilate, overlay=overlay)
    result = attention_report(teacher, data, out, cfg, student_path=student_checkpoint, view=view,
                              options=RunOptions(device=device, trust=trust_checkpoint, arch=arch,
                                                 **common.stats_from(mean, std)), reporter=RichReporter())
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    s = result.student
    subset = f"top-1 on these {result.test_images:,} test images"  # not the full test set's figure unless --test-images 0
    who = f"teacher {result.teacher['name']} ({subset} {result.teacher['top1']:.2f}%)"
    if s:
        who += f" vs student {s['name']} ({result.student['top1']:.2f}%)"
    cols = ["stage", "resolution"]
    if s:
        cols += ["AT distance", "spatial corr"]
    if localization:
        cols += ["teacher on object", "student on object"] if s else ["teacher on object"]
        cols += ["chance (uniform)", "prior (ignores image)"]
    rows = []
    for st in result.stages:
        row = [st.label, f"{st.resolution[0]}×{st.resolution[1]}"]
        if s:
            row += [fmt_optional(st.at_distance, ".3e"), fmt_optional(st.correlation, ".3f")]
        if localization:
            row += [fmt_optional(st.teacher_localization, ".3f")] + ([fmt_optional(st.student_localization, ".3f")] if s else []) + [fmt_optional(st.chance, ".3f"), fmt_optional(st.position_prior, ".3f")]
        rows.append(row)
    title = (f"{result.data}: {who}; {result.attention} p={result.p:g}, {result.test_images} test images"
             + (f"; masks grown by {dilate} px" if localization and dilate else "")
             + ("; AT distance = mean((Q_s-Q_t)^2), no β" if s else ""))
    stdout.print(title, highlight=False)
    stdout.print(table("", cols, rows))
    stderr.print(f"wrote {out}")


def sweep(
    teacher: Path = typer.Option(..., "--teacher", help="Teacher checkpoint (atc format)."),
    data: str = typer.Option(..., "--data", help="Dataset folder, 'digits' or 'shapes'; with --ray, a path every node can read."),
    out: Path = typer.Option(Path("runs/sweep"), "--out", help="Sweep folder: one folder per run under runs/ (with --ray, on "
                             "storage every node shares)."),
    grid: List[str] = typer.Option(..., "--grid", help="Axis key=v1,v2 (repeatable), e.g. beta=0,1e3 or attention=sum-p:2,gradient."),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Seeds per cell (preset seed, +1, …)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", min=1, help="Runs trained at once, each in its own worker process, placed "
                                       "round-robin on the GPUs of this machine (default 1; with --ray, as many as the cluster "
                                       "has room for)."),
    gpus_per_run: Optional[float] = typer.Option(None, "--gpus-per-run", help="Share of one GPU each run takes, e.g. "
                                                 "0.25 packs four small students per GPU (default: 1, or what spreads --jobs "
                                                 "evenly over the GPUs)."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="[ADDRESS]", help="Run each cell as a Ray task: on the cluster at "
                                      "ADDRESS (auto, HOST:6379, ray://HOST:10001) or, without one, on a Ray started for this "
                                      "sweep on this machine (needs pip install 'atc[ray]')."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="CPU cores each run reserves and computes with (Ray's "
                                          "num_cpus and torch threads, at least 1), also its DataLoader processes for data "
                                          "too large for the device (default: this process's threads; 1 CPU with --ray)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a sweep in --out: finished runs are kept, half-done ones go "
                                "on from their last epoch, failed ones are tried again."),
    preset: Optional[str] = PRESET,
    overrides: Optional[List[str]] = SET,
    method: Optional[str] = typer.Option(None, "--method", help="none, or a feature term (at | fitnet) and/or a logit term (kd | dkd) joined with +: at+kd, fitnet+kd, at+dkd, dkd, … (default: the preset's)."),
    student: Optional[str] = typer.Option(None, "--student", help="Student architecture (default: the preset's policy)."),
    epochs: Optional[int] = EPOCHS,
    train_subset: Optional[int] = SUBSET,
    device: str = DEVICE,
    trust_checkpoint: bool = TRUST, arch: Optional[str] = ARCH, mean: Optional[str] = common.MEAN, std: Optional[str] = common.STD,
    as_json: bool = typer.Option(False, "--json", help="Print sweep.json to stdout."),
) -> None:
    """Distil a student for every grid cell and seed; write sweep.json, sweep.md and sweep.png."""
    from compressor.device import Speed
    from compressor.options import RunOptions
    from compressor.report.tables import table_rows
    from compressor.studies.runner import Engine
    from compressor.studies.sweep import run_sweep

    if preset is None:  # as config_from: the data decides (digits → demo), and a line says so
        from compressor.load import preset_for_data

        preset, why = preset_for_data(data)
        stderr.print(f"[dim]›[/dim] preset {preset} ({why}; --preset picks another)", highlight=False)  # a sweep trains at once
    merged = overrides_from(overrides, train__epochs=epochs, data__train_subset=train_subset)
    engine = Engine(jobs=jobs, gpus_per_run=gpus_per_run, ray=ray,
                    cpus_per_run=None if workers is None else max(1, workers))
    options = RunOptions(device=device, speed=Speed(workers=workers), resume=resume, trust=trust_checkpoint, arch=arch,
                         command=command_line(), **common.stats_from(mean, std))
    result = run_sweep(teacher, data, out, preset, grid, overrides=merged, seeds=seeds, method=method, student=student,
                       engine=engine, options=options, reporter=RichReporter())
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        head, rows = table_rows(result)
        t = result["teacher"]
        stdout.print(table(f"{result['data']['name']}: {t['name']} ({t['top1']:.2f}%) → {result['student']}, {result['method']}, "
                           f"{plural(result['epochs'], 'epoch')}; top-1 %", head, rows))
        stderr.print(f"wrote {out}/sweep.json, sweep.md, sweep.png")
    if result["failed"]:
        first = result["failed"][0]
        stderr.print(f"error: {len(result['failed'])} run(s) did not finish ({first['run']}: {first['error']}"
                     f"{'; …' if len(result['failed']) > 1 else ''}); tracebacks in each run's error.txt; fix the cause and "
                     "run the same command with --resume", highlight=False, markup=False)
        raise typer.Exit(1)
