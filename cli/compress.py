"""``atc compress`` (and its ``--dry-run``) and ``atc demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from cli import common as opt
from cli.common import command_line, config_from, join_parallel, print_report, speed_from, stats_from, table
from cli.progress import RichReporter, stderr
from compressor.errors import AtcError


def compress(
    teacher: Path = typer.Option(..., "--teacher", help="Trained teacher: atc checkpoint or state_dict (with --arch).",
                                 rich_help_panel=opt.INPUT),
    data: str = typer.Option(..., "--data", help="Dataset folder or 'digits'.", rich_help_panel=opt.INPUT),
    preset: Optional[str] = opt.PRESET, overrides: Optional[List[str]] = opt.SET, arch: Optional[str] = opt.ARCH,
    mean: Optional[str] = opt.MEAN, std: Optional[str] = opt.STD,
    trust_checkpoint: bool = opt.TRUST, strict_data: bool = opt.STRICT_DATA,
    student: Optional[List[str]] = typer.Option(None, "--student", show_default="the preset's policy",
                                                help="Student architecture (repeatable).", rich_help_panel=opt.STUDENT),
    students: int = typer.Option(0, "--students", min=0, show_default="one", help="Distil N candidates from the derivation ladder.",
                                 rich_help_panel=opt.STUDENT),
    width_ratio: Optional[str] = typer.Option(None, "--width-ratio", help="Derive the student by thinning the teacher's own layers "
                                              "(Torch-Pruning, channels rounded to multiples of 8): e.g. 0.5, or per stage "
                                              "0.75,layer4=0.5.", rich_help_panel=opt.STUDENT),
    blocks_per_stage: Optional[int] = typer.Option(None, "--blocks-per-stage", min=1, help="Derived student: keep at most N "
                                                   "repeated blocks per stage (residual / inverted-residual stages); "
                                                   "alone, it keeps the full width.", rich_help_panel=opt.STUDENT),
    target_speedup: Optional[float] = typer.Option(None, "--target-speedup", help="Search the width (and depth) of a derived "
                                                   "student until it is this many times faster than the teacher (see --by).",
                                                   rich_help_panel=opt.STUDENT),
    by: Optional[str] = typer.Option(None, "--by", show_default="gmacs", help="Unit of --target-speedup: gmacs (fvcore multiply-adds), "
                                     "params, or latency (measured on the exported ONNX with onnxruntime).", rich_help_panel=opt.STUDENT),
    runtime: str = typer.Option("ort-cpu", "--runtime", help="Runtime for --by latency: ort-cpu, ort-cuda, torch-cpu, torch-cuda.",
                                rich_help_panel=opt.STUDENT),
    latency_batch: int = typer.Option(1, "--latency-batch-size", min=1, help="Batch size at which --by latency is measured.",
                                      rich_help_panel=opt.STUDENT),
    init: str = typer.Option("auto", "--init", help="Derived student's start: inherit (the teacher's surviving weights), scratch, "
                             "or auto (inherit for derived students, scratch for zoo ones).", rich_help_panel=opt.STUDENT),
    method: Optional[str] = typer.Option(None, "--method", show_default="the preset's: at+kd", help="none, or a feature term "
                                         "(at | fitnet) and/or a logit term (kd | dkd) joined with +: at+kd, fitnet+kd, at+dkd, dkd, ….",
                                         rich_help_panel=opt.DISTIL),
    attention: Optional[str] = typer.Option(None, "--attention", show_default="the preset's: sum-p:2",
                                            help="AT mechanism: sum-p[:P], max-p[:P] or gradient.", rich_help_panel=opt.DISTIL),
    at_form: Optional[str] = typer.Option(None, "--at-form", show_default="code", help="code (reference code's squared mean) or paper "
                                          "(eq. 2: β/2 · L2 norm, each pair weighted by β/(H·W), the paper's rule).",
                                          rich_help_panel=opt.DISTIL),
    at_layers: Optional[str] = typer.Option(None, "--at-layers", show_default="the preset's", help="AT stages: all, lastN or a comma "
                                            "list of stage names.", rich_help_panel=opt.DISTIL),
    beta: Optional[float] = typer.Option(None, "--beta", min=0.0, show_default="the preset's: 1000",
                                         help="AT weight β (the paper form divides it by each map's H·W).", rich_help_panel=opt.DISTIL),
    p: Optional[float] = typer.Option(None, "--p", min=0.0, show_default="2", help="Exponent p of the attention map |A|^p (the paper's "
                                      "|A|; for odd p, RepDistiller and mdistiller use the signed A^p).", rich_help_panel=opt.DISTIL),
    epochs: Optional[int] = opt.EPOCHS, batch_size: Optional[int] = opt.BATCH, lr: Optional[float] = opt.LR,
    seed: Optional[int] = opt.SEED, train_subset: Optional[int] = opt.SUBSET, device: str = opt.DEVICE,
    compile_: bool = opt.COMPILE, channels_last: Optional[bool] = opt.CHANNELS_LAST, precision: str = opt.PRECISION,
    cuda_graphs: Optional[bool] = opt.CUDA_GRAPHS,
    workers: Optional[int] = opt.WORKERS, nproc: int = opt.NPROC, nnodes: Optional[str] = opt.NNODES, node_rank: Optional[int] = opt.NODE_RANK,
    master_addr: Optional[str] = opt.MASTER_ADDR, master_port: Optional[int] = opt.MASTER_PORT,
    out: Optional[Path] = typer.Option(None, "--out", show_default="required unless --dry-run", help="Output folder.",
                                       rich_help_panel=opt.OUTPUT),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show students, attention pairs and initial losses; train and write "
                                 "nothing.", rich_help_panel=opt.OUTPUT),
    as_json: bool = typer.Option(False, "--json", help="Print report.json (with --dry-run: the plan) to stdout.",
                                 rich_help_panel=opt.OUTPUT),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out.", rich_help_panel=opt.OUTPUT),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run in --out.", rich_help_panel=opt.OUTPUT),
    pick: str = opt.PICK, threads: int = opt.THREADS,
    int8: bool = typer.Option(False, "--int8", help="Also quantize each student to INT8 (ORT static QDQ) and report it.",
                              rich_help_panel=opt.OUTPUT),
    keep_state: bool = opt.KEEP_STATE, tensorboard: Optional[Path] = opt.TENSORBOARD,
) -> None:
    """Distil a thinner, shallower student from a trained teacher; report and export it."""
    from compressor import pipeline
    from compressor.config import parse_attention
    from compressor.derive.candidates import StudentChoice
    from compressor.derive.search import make_target
    from compressor.dryrun import dry_run as rehearse
    from compressor.options import RunOptions
    from compressor.report.pick import parse_pick

    pick = parse_pick(pick)
    mech, mech_p = parse_attention(attention) if attention else (None, None)
    cfg = config_from(preset, overrides, data, distill__method=method, train__epochs=epochs, train__batch_size=batch_size, train__lr=lr,
                      train__seed=seed, data__train_subset=train_subset, distill__attention=mech, distill__at_form=at_form,
                      distill__at_layers=at_layers, distill__beta=beta, distill__p=p if p is not None else mech_p)
    reporter = RichReporter()
    choice = StudentChoice(names=tuple(student or ()), count=students, width=width_ratio, blocks_per_stage=blocks_per_stage,
                           target=make_target(target_speedup, by, runtime, latency_batch, threads), init=init)
    stats = stats_from(mean, std)
    if dry_run:
        plan = rehearse(teacher, data, cfg, choice, RunOptions(strict_data=strict_data, arch=arch, trust=trust_checkpoint, **stats),
                        reporter=reporter)
        if as_json:
            print(json.dumps(plan.to_dict(), indent=2))
        else:
            why = f" ({cfg.preset_reason}; --preset picks another)" if cfg.preset_reason else ""
            stderr.print(f"preset {cfg.preset}{why}: {cfg.train.epochs} epochs")
            _print_dry_run(plan)
        return
    if out is None:
        raise AtcError("--out DIR is required (only --dry-run runs without it)")
    speed = speed_from(precision, channels_last, compile_, workers, cuda_graphs)
    rank, device = join_parallel(device, nproc, nnodes, node_rank, master_addr, master_port)
    reporter.quiet = not rank.is_main
    options = RunOptions(device=device, speed=speed, threads=threads, int8=int8, tensorboard=tensorboard, resume=resume,
                         overwrite=overwrite, strict_data=strict_data, arch=arch, trust=trust_checkpoint, command=command_line(),
                         pick=pick, keep_state=keep_state, **stats)
    report = pipeline.compress(teacher, data, cfg, out, choice, options, method=method, reporter=reporter)
    if report is None:  # another rank than 0 of a data-parallel run: rank 0 reports
        return
    print_report(report.to_dict(), as_json)
    stderr.print(wrote_line(out, report.to_dict(), tensorboard))


def wrote_line(out: Path, report: dict, tensorboard: Path | None = None, extra: tuple[str, ...] = ()) -> str:
    """Everything a compress run wrote, in one line (the README's outputs table lists the same)."""
    files = ["report.json", "report.md", "tradeoff.png", "curves.png", "student.pt", "student.onnx", "metrics.jsonl", *extra]
    per_student = "student.pt, student.onnx, metrics.jsonl" + (", student.int8.onnx" if any(s.get("int8") for s in report["students"]) else "")
    line = f"wrote {out}/{{{', '.join(files)}}} and {out}/students/<name>-<method>/{{{per_student}}}"
    return line + (f"; TensorBoard runs in {tensorboard}" if tensorboard else "")


def _print_dry_run(dry) -> None:
    """A ``DryRunReport``: the teacher, then per student its size, stages, pairs and first loss terms."""
    stderr.print(f"teacher {dry.teacher}: {dry.teacher_params:,} params, {dry.teacher_gmacs:.4f} GMACs  "
                 f"(method {dry.method}, AT layers {dry.at_layers})")
    for s in dry.students:
        c = s.student
        stderr.print(f"\nstudent {c.name}: {c.params:,} params ({c.param_ratio:.2f}x fewer), {c.gmacs:.4f} GMACs ({c.mac_ratio:.2f}x fewer)")
        _print_derived(s, dry.init)
        if s.hint:
            stderr.print(f"  hint pair  {s.hint}; the regressor trains with the student and is not exported")
        for p in s.pairs if not s.hint else []:
            stderr.print(f"  AT pair  {p.describe()}")
        stderr.print("  initial loss terms: " + ", ".join(f"{k} {v:.4g}" for k, v in s.initial_terms.items()))
    stderr.print("\ndry run: nothing trained or written")


def _print_derived(student, init: str) -> None:
    """A ``DryRunStudent``'s per-stage depth and width, predicted speed-ups and, after a search, target vs achieved."""
    from compressor.derive.candidates import resolve_init

    c = student.student
    if student.stages:
        rows = [[r.stage, "" if r.blocks is None else f"{r.blocks}/{r.teacher_blocks}", f"{r.width}/{r.teacher_width}"]
                for r in student.stages]
        stderr.print(table("  stages (student/teacher)", ["stage", "blocks", "width (channels)"], rows))
    search = c.spec.plan.search if c.spec.plan is not None else None
    line = f"  counts: {c.mac_ratio:.2f}x fewer GMACs, {c.param_ratio:.2f}x fewer params (not a measured speed-up)"
    if search and search.by == "latency":
        lo, hi = search.spread or [float("nan")] * 2
        line += f", {search.achieved:.2f}x latency measured ({search.runtime}, batch {search.batch_size}, rounds {lo:.2f}-{hi:.2f}x)"
    stderr.print(line)
    if search:
        verdict = "within" if search.met else "outside"
        stderr.print(f"  target {search.target:g}x by {search.by}: achieved {search.achieved:.2f}x "
                     f"({verdict} ±{100 * search.tolerance:.0f}%; {len(search.trials)} candidate(s) measured)")
    if c.spec.plan is not None:
        stderr.print(f"  init: {resolve_init(init, c.spec)} (--init)")


DEMO_TRAINING_THREADS = 1  # the same sums on every machine, so the README's demo figures hold whatever the cores


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
    students: int = typer.Option(3, "--students", min=1, help="Students to distil from the derivation ladder (the first is the preset's)."),
    threads: int = opt.THREADS, pick: str = opt.PICK,
    device: str = opt.DEVICE,
) -> None:
    """The whole job on the bundled digits, on CPU in a few minutes: train a teacher, compress it."""
    from compressor import fileio, pipeline
    from compressor.config import load_config
    from compressor.derive.candidates import StudentChoice
    from compressor.device import pick_device, torch_threads
    from compressor.distill.scratch import train_model
    from compressor.load import load_data
    from compressor.options import RunOptions
    from compressor.report.pick import parse_pick

    pick = parse_pick(pick)
    reporter = RichReporter()
    fileio.prepare_output(out, overwrite)
    cfg = load_config("demo")
    dev = pick_device(device)
    ds = load_data("digits", cfg, reporter=reporter)
    options = RunOptions(device=device, threads=threads, overwrite=True, command=command_line(), pick=pick)
    with torch_threads(DEMO_TRAINING_THREADS):  # the README's figures on any machine, whatever its cores
        reporter.info(f"1/2 training a wrn-16-2 teacher on the bundled digits ({len(ds.train_y)} train / {len(ds.test_y)} test, "
                      f"16x16) on {dev}, {DEMO_TRAINING_THREADS} thread")
        train_model("wrn-16-2", ds, cfg, out / "teacher.pt", dev, reporter)
        reporter.info(f"2/2 deriving {students} student(s) and distilling them with AT+KD")
        rep = pipeline.compress(out / "teacher.pt", "digits", cfg, out, StudentChoice(count=students), options, reporter=reporter)
    assert rep is not None  # one process: this is rank 0
    print_report(rep.to_dict(), False)
    stderr.print(wrote_line(out, rep.to_dict(), extra=("teacher.pt",)))
