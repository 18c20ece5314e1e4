"""``atc``: derive → distil → measure → report → export, one command per step.

Each command parses its options, calls the library and prints. Errors the user can fix
print one line, ``error: …``, and exit with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from compressor.errors import AtcError, Interrupted
from cli.progress import RichReporter, stderr

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="atc: compress a trained CNN teacher into a faster student with attention transfer + KD.")
stdout = Console()
if not stdout.is_terminal:
    stdout = Console(width=200)  # pipes and CI logs: keep tables whole instead of truncating cells
STATE = {"debug": False}


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    STATE["debug"] = debug


def _config(preset: str, overrides: list[str], **flags):
    from compressor.config import load_config, parse_overrides

    merged = parse_overrides(overrides or [])
    for key, value in flags.items():
        if value is not None:
            section, name = key.split("__")
            merged.setdefault(section, {})[name] = value
    return load_config(preset, merged)


def _parse_size(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise AtcError(f"--input-size '{text}' must look like 3x32x32 (channels x height x width)")
    return parts  # type: ignore[return-value]


def _parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise AtcError(f"{option} '{text}' must be a comma list of positive whole numbers, e.g. 1,64")
    return values


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i < 2 else "right")
    for r in rows:
        table.add_row(*r)
    return table


PRESET = typer.Option("cifar", "--preset", help="Shipped preset name (cifar, cifar100, imagenet, finetune, demo) or a TOML path.")
SET = typer.Option(None, "--set", help="Override a preset key, e.g. --set train.epochs=10 (repeatable).")
EPOCHS = typer.Option(None, "--epochs", min=1, help="Epochs (milestones scale with it).")
BATCH = typer.Option(None, "--batch-size", min=1, help="Batch size.")
LR = typer.Option(None, "--lr", min=0.0, help="Initial learning rate.")
SEED = typer.Option(None, "--seed", min=0, help="Random seed.")
SUBSET = typer.Option(None, "--train-subset", min=0, help="Use only N training images (0 = all), for short runs.")
DEVICE = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda.")
TRUST = typer.Option(False, "--trust-checkpoint", help="Allow checkpoints that run code when unpickled (only for files you trust).")
ARCH = typer.Option(None, "--arch", help="Architecture of a plain state_dict, e.g. wrn-40-4.")
COMPILE = typer.Option(False, "--compile", help="torch.compile the student and teacher (compile time is reported apart).")
CHANNELS_LAST = typer.Option(None, "--channels-last/--no-channels-last", help="NHWC memory format (default: on with CUDA).")
PRECISION = typer.Option("auto", "--precision", help="auto (bf16 on CUDA, fp16 with loss scaling where bf16 is missing, "
                         "fp32 on CPU), bf16, fp16 or fp32.")
WORKERS = typer.Option(None, "--workers", min=0, help="DataLoader processes when the data is too large to keep on the device "
                       "(default: one per spare core, at most 8).")
NPROC = typer.Option(1, "--nproc", min=1, help="Data-parallel processes on this node (DDP); runs the command again through "
                     "torch.distributed.run, like torchrun --nproc-per-node N -m cli ….")
NNODES = typer.Option(None, "--nnodes", help="Nodes of a multi-node run (passed to torchrun).")
NODE_RANK = typer.Option(None, "--node-rank", min=0, help="This node's rank in a multi-node run (passed to torchrun).")
MASTER_ADDR = typer.Option(None, "--master-addr", help="Address of node 0 in a multi-node run (passed to torchrun).")
MASTER_PORT = typer.Option(None, "--master-port", min=1, help="Port on node 0 (passed to torchrun).")


def _speed(precision: str, channels_last, compile_: bool, workers):
    from compressor.device import Speed

    return Speed(precision=precision, channels_last=channels_last, compile=compile_, workers=workers)


def _parallel(device: str, nproc: int, nnodes, node_rank, master_addr, master_port):
    """``--nproc N`` (or ``--nnodes``) outside torchrun: run this command again as N processes per node
    through torch.distributed.run and exit with its code. Inside torchrun: join the process group;
    return this rank and the device it trains on."""
    import atexit

    from compressor import distributed

    if (nproc > 1 or nnodes is not None) and not distributed.launched_by_torchrun():
        raise typer.Exit(distributed.relaunch(sys.argv[1:], nproc, nnodes=nnodes, node_rank=node_rank,
                                              master_addr=master_addr, master_port=master_port))
    rank, device = distributed.init(device)
    if rank.world_size > 1:
        atexit.register(distributed.shutdown)
    return rank, device


@app.command()
def train(
    arch: str = typer.Option(..., "--arch", help="Zoo architecture to train, e.g. wrn-16-2."),
    data: str = typer.Option(..., "--data", help="Dataset folder (ImageFolder train/+test/, torchvision CIFAR) or 'digits'."),
    out: Path = typer.Option(..., "--out", help="Checkpoint file to write, e.g. teacher.pt."),
    preset: str = PRESET, overrides: Optional[List[str]] = SET, epochs: Optional[int] = EPOCHS, batch_size: Optional[int] = BATCH,
    lr: Optional[float] = LR, seed: Optional[int] = SEED, train_subset: Optional[int] = SUBSET, device: str = DEVICE,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing checkpoint."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its saved training state."),
    strict_data: bool = typer.Option(False, "--strict-data", help="Stop at the first corrupt image instead of skipping it."),
    compile_: bool = COMPILE, channels_last: Optional[bool] = CHANNELS_LAST, precision: str = PRECISION,
    workers: Optional[int] = WORKERS, nproc: int = NPROC, nnodes: Optional[str] = NNODES, node_rank: Optional[int] = NODE_RANK,
    master_addr: Optional[str] = MASTER_ADDR, master_port: Optional[int] = MASTER_PORT,
) -> None:
    """Train a model from scratch with the preset's recipe (e.g. a teacher)."""
    from compressor.errors import OutputError
    from compressor.models.registry import parse_arch
    from compressor.pipeline import load_data, train_model
    from compressor.device import pick_device

    from compressor.models.checkpoint import check_input_fits
    from compressor.pipeline import state_dir_for

    parse_arch(arch)
    if out.exists() and not (overwrite or resume):
        raise OutputError(f"{out} exists; pass --overwrite to replace it, --resume to continue its run, or another --out")
    state = state_dir_for(out)
    if not out.exists() and state.is_dir() and any(state.iterdir()) and not (overwrite or resume):
        raise OutputError(f"{state} holds the state of an unfinished run; pass --resume to continue it, --overwrite to start again, "
                          "or another --out")
    cfg = _config(preset, overrides, train__epochs=epochs, train__batch_size=batch_size, train__lr=lr, train__seed=seed,
                  data__train_subset=train_subset)
    speed = _speed(precision, channels_last, compile_, workers)
    rank, device = _parallel(device, nproc, nnodes, node_rank, master_addr, master_port)
    dev = pick_device(device)
    reporter = RichReporter(quiet=not rank.is_main)
    ds = load_data(data, cfg, strict_data, reporter, device=dev, workers=workers)
    check_input_fits(parse_arch(arch).build(ds.num_classes), ds.input_size, arch)
    where = f"{dev}" if rank.world_size == 1 else f"{rank.world_size} processes ({rank.backend}, {dev} on rank 0)"
    reporter.info(f"training {arch} on {ds.name} ({len(ds.train_y)} train / {len(ds.test_y)} test) on {where}")
    _, spec, metrics = train_model(arch, ds, cfg, out, dev, reporter, resume, speed)
    if rank.is_main:
        stderr.print(f"saved {out}: {spec.name}, test top-1 {metrics['top1']:.2f}% after {cfg.train.epochs} epochs")


@app.command()
def compress(
    teacher: Path = typer.Option(..., "--teacher", help="Trained teacher: atc checkpoint or state_dict (with --arch)."),
    data: str = typer.Option(..., "--data", help="Dataset folder or 'digits'."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (required unless --dry-run)."),
    preset: str = PRESET, overrides: Optional[List[str]] = SET,
    method: Optional[str] = typer.Option(None, "--method", help="none | kd | at | at+kd (default: the preset's)."),
    student: Optional[List[str]] = typer.Option(None, "--student", help="Student architecture (repeatable); default: preset policy."),
    width_ratio: Optional[str] = typer.Option(None, "--width-ratio", help="Derive the student by thinning the teacher's own layers "
                                              "(Torch-Pruning, channels rounded to multiples of 8): e.g. 0.5, or per stage 0.75,layer4=0.5."),
    blocks_per_stage: Optional[int] = typer.Option(None, "--blocks-per-stage", min=1, help="Derived student: keep at most N "
                                                   "repeated blocks per stage (residual / inverted-residual stages)."),
    target_speedup: Optional[float] = typer.Option(None, "--target-speedup", help="Search the width (and depth) of a derived "
                                                   "student until it is this many times faster than the teacher (see --by)."),
    by: Optional[str] = typer.Option(None, "--by", help="Unit of --target-speedup: gmacs (fvcore multiply-adds; the default), "
                                     "params, or latency (measured on the exported ONNX with onnxruntime)."),
    runtime: str = typer.Option("ort-cpu", "--runtime", help="Runtime for --by latency: ort-cpu, ort-cuda, torch-cpu, torch-cuda."),
    latency_batch: int = typer.Option(1, "--latency-batch-size", min=1, help="Batch size at which --by latency is measured."),
    init: str = typer.Option("auto", "--init", help="Derived student's start: inherit (the teacher's surviving weights), scratch, "
                             "or auto (inherit for derived students, scratch for zoo ones)."),
    students: int = typer.Option(0, "--students", min=0, help="Distil N candidates from the derivation ladder."),
    arch: Optional[str] = ARCH, epochs: Optional[int] = EPOCHS, batch_size: Optional[int] = BATCH, lr: Optional[float] = LR,
    seed: Optional[int] = SEED, train_subset: Optional[int] = SUBSET, device: str = DEVICE,
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for latency measurement."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show students, attention pairs and initial losses; do not train."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run in --out."),
    trust_checkpoint: bool = TRUST,
    strict_data: bool = typer.Option(False, "--strict-data", help="Stop at the first corrupt image instead of skipping it."),
    int8: bool = typer.Option(False, "--int8", help="Also quantize each student to INT8 (ORT static QDQ) and report it."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
    attention: Optional[str] = typer.Option(None, "--attention", help="AT mechanism: sum-p[:P], max-p[:P] or gradient."),
    at_form: Optional[str] = typer.Option(None, "--at-form", help="code (reference code's squared mean) or paper (eq. 2: β/2, L2 norm)."),
    at_layers: Optional[str] = typer.Option(None, "--at-layers", help="AT stages: all, lastN or a comma list of stage names."),
    beta: Optional[float] = typer.Option(None, "--beta", min=0.0, help="AT weight β."),
    p: Optional[float] = typer.Option(None, "--p", min=0.0, help="Exponent p of the attention map |A|^p."),
    compile_: bool = COMPILE, channels_last: Optional[bool] = CHANNELS_LAST, precision: str = PRECISION,
    workers: Optional[int] = WORKERS, nproc: int = NPROC, nnodes: Optional[str] = NNODES, node_rank: Optional[int] = NODE_RANK,
    master_addr: Optional[str] = MASTER_ADDR, master_port: Optional[int] = MASTER_PORT,
) -> None:
    """Distil a thinner, shallower student from a trained teacher; report and export it."""
    from compressor import pipeline
    from compressor.config import parse_attention

    mech, mech_p = parse_attention(attention) if attention else (None, None)
    cfg = _config(preset, overrides, distill__method=method, train__epochs=epochs, train__batch_size=batch_size, train__lr=lr,
                  train__seed=seed, data__train_subset=train_subset, distill__attention=mech, distill__at_form=at_form,
                  distill__at_layers=at_layers, distill__beta=beta, distill__p=p if p is not None else mech_p)
    reporter = RichReporter()
    derive_opts = _derive_options(student, width_ratio, blocks_per_stage, target_speedup, by, runtime, latency_batch, threads, init)
    if dry_run:
        return _dry_run(teacher, data, cfg, student, students, arch, trust_checkpoint, strict_data, reporter, derive_opts)
    if out is None:
        raise AtcError("--out DIR is required (only --dry-run runs without it)")
    speed = _speed(precision, channels_last, compile_, workers)
    rank, device = _parallel(device, nproc, nnodes, node_rank, master_addr, master_port)
    reporter.quiet = not rank.is_main
    report = pipeline.compress(teacher, data, cfg, out, students=student, n_students=students, arch=arch,
                               trust=trust_checkpoint, overwrite=overwrite, resume=resume, strict_data=strict_data,
                               device=device, threads=threads, int8=int8, reporter=reporter,
                               command=os.environ.get("ATC_COMMAND") or shlex.join(["atc"] + sys.argv[1:]), speed=speed,
                               **derive_opts)
    if not rank.is_main:
        return
    _print_report(report, as_json)
    stderr.print(f"wrote {out}/report.json, report.md, tradeoff.png, student.pt, student.onnx, metrics.jsonl")


def _derive_options(names, width_ratio, blocks_per_stage, target_speedup, by, runtime, latency_batch, threads, init) -> dict:
    """--width-ratio / --blocks-per-stage / --target-speedup / --init → pipeline keyword arguments."""
    from compressor.errors import ConfigError
    from compressor.derive.candidates import INITS
    from compressor.derive.search import Target
    from compressor.derive.thinning import parse_widths

    if names and (width_ratio is not None or blocks_per_stage is not None or target_speedup is not None):
        raise ConfigError("--student names a zoo student; drop it to derive one with --width-ratio/--blocks-per-stage/--target-speedup")
    if target_speedup is not None and width_ratio is not None:
        raise ConfigError("--target-speedup searches the width itself; drop --width-ratio (or --target-speedup)")
    if init not in INITS:
        raise ConfigError(f"--init {init} is unknown; choose one of {', '.join(INITS)}")
    if by is not None and target_speedup is None:
        raise ConfigError("--by says how --target-speedup is measured; add --target-speedup N (e.g. 3)")
    if width_ratio is not None:
        parse_widths(width_ratio)  # reject a malformed value before loading anything
    target = Target(target_speedup, by or "gmacs", runtime, latency_batch, threads) if target_speedup is not None else None
    return {"width": width_ratio, "blocks_per_stage": blocks_per_stage, "target": target, "init": init}


def _print_derived(dr, init: str) -> None:
    """Per-stage depth and width, predicted speed-ups and, after a search, target vs achieved."""
    from compressor.derive.candidates import resolve_init

    c = dr.student
    if dr.stages:
        rows = [[r["stage"], "" if r["blocks"] is None else f"{r['blocks']}/{r['teacher_blocks']}",
                 f"{r['width']}/{r['teacher_width']}"] for r in dr.stages]
        stderr.print(_table("  stages (student/teacher)", ["stage", "blocks", "width (channels)"], rows))
    search = (c.spec.plan or {}).get("search")
    line = f"  predicted speed-up: {c.mac_ratio:.2f}x fewer GMACs, {c.param_ratio:.2f}x fewer params"
    if search and search.get("by") == "latency":
        lo, hi = search.get("spread", [float("nan")] * 2)
        line += f", {search['achieved']:.2f}x latency measured ({search['runtime']}, batch {search['batch_size']}, rounds {lo:.2f}-{hi:.2f}x)"
    stderr.print(line)
    if search:
        verdict = "within" if search["met"] else "outside"
        stderr.print(f"  target {search['target']:g}x by {search['by']}: achieved {search['achieved']:.2f}x "
                     f"({verdict} ±{100 * search['tolerance']:.0f}%; {len(search['trials'])} candidate(s) measured)")
    if c.spec.plan is not None:
        stderr.print(f"  init: {resolve_init(init, c.spec)} (--init)")


def _dry_run(teacher, data, cfg, names, count, arch, trust, strict, reporter, derive_opts=None) -> None:
    from dataclasses import replace

    from compressor import pipeline
    from compressor.models.checkpoint import load_model

    model, spec, _ = load_model(teacher, arch=arch, trust=trust)
    ds = pipeline.load_data(data, cfg, strict, reporter)
    if spec.mean is None:
        spec = replace(spec, input_size=tuple(ds.input_size))
    pipeline.check_compatible(spec, ds)
    from compressor.profiling.counts import count_macs, count_params

    tp, tm = count_params(model)["total"], count_macs(model, spec.input_size).gmacs
    stderr.print(f"teacher {spec.name}: {tp:,} params, {tm:.4f} GMACs  (method {cfg.distill.method}, AT layers {cfg.distill.at_layers})")
    opts = dict(derive_opts or {})
    init = opts.pop("init", "auto")
    cands = pipeline.choose_students(spec, cfg, names, count, teacher_model=model, reporter=reporter, **opts)
    for dr in pipeline.plan(model, spec, ds, cfg, cands, cfg.distill.method):
        c = dr.student
        stderr.print(f"\nstudent {c.name}: {c.params:,} params ({c.param_ratio:.2f}x fewer), {c.gmacs:.4f} GMACs ({c.mac_ratio:.2f}x fewer)")
        _print_derived(dr, init)
        for p in dr.pairs:
            stderr.print(f"  AT pair  {p.describe()}")
        stderr.print("  initial loss terms: " + ", ".join(f"{k} {v:.4g}" for k, v in dr.initial_terms.items()))
    stderr.print("\ndry run: nothing trained or written")


def _print_report(report: dict, as_json: bool) -> None:
    from compressor.report.tables import COLUMNS, NOISY_SPREAD, noisy_latency, rows

    if as_json:
        print(json.dumps(report, indent=2))
    else:
        stdout.print(_table(f"{report['data']['name']}: teacher vs students (GMACs = multiply-adds; latency: ORT CPU batch 1)",
                            list(COLUMNS), rows(report)))
    if noisy := noisy_latency(report):
        stderr.print(f"note: the middle half of the latency rounds of {', '.join(noisy)} spans more than {NOISY_SPREAD}x: "
                     "the CPU was busy, or too many threads for a model this small (try --threads 1); "
                     "measure again on an idle machine before trusting the latency columns")


@app.command()
def derive(
    teacher: str = typer.Option(..., "--teacher", help="Teacher checkpoint or zoo name."),
    arch: Optional[str] = ARCH, trust_checkpoint: bool = TRUST,
    input_size: str = typer.Option("3x32x32", "--input-size", help="Input size for zoo names or state_dicts."),
    num_classes: int = typer.Option(10, "--num-classes", min=1, help="Classes, for zoo names."),
    as_json: bool = typer.Option(False, "--json", help="Print the ladder as JSON on stdout."),
) -> None:
    """List thinner/shallower student candidates with params, GMACs and ratios."""
    from compressor.models.checkpoint import load_model
    from compressor.models.spec import ModelSpec
    from compressor.derive.candidates import ladder

    if Path(teacher).exists():
        _, spec, _ = load_model(teacher, arch=arch, trust=trust_checkpoint, input_size=_parse_size(input_size))
    else:
        spec = ModelSpec.for_arch(teacher, num_classes, input_size=_parse_size(input_size))
    cands = ladder(spec)
    if as_json:
        print(json.dumps([{"name": c.name, "params": c.params, "gmacs": c.gmacs, "param_ratio": c.param_ratio,
                           "mac_ratio": c.mac_ratio} for c in cands], indent=2))
        return
    rows = [[c.name, f"{c.params:,}", f"{c.gmacs:.4f}", f"{c.param_ratio:.2f}", f"{c.mac_ratio:.2f}"] for c in cands]
    stdout.print(_table(f"students of {spec.name} at {'x'.join(map(str, spec.input_size))}", ["student", "params", "GMACs", "params ×", "GMACs ×"], rows))


@app.command()
def profile(
    model: str = typer.Argument(..., help="atc checkpoint, state_dict (with --arch) or zoo name."),
    arch: Optional[str] = ARCH, trust_checkpoint: bool = TRUST,
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C x H x W, e.g. 3x224x224 (default: the checkpoint's, or 3x32x32)."),
    num_classes: int = typer.Option(10, "--num-classes", min=1, help="Classes, for zoo names (ImageNet ResNets default to 1000)."),
    batch_sizes: str = typer.Option("1", "--batch-sizes", help="Comma list of batch sizes."),
    runtimes: str = typer.Option("ort-cpu,torch-cpu", "--runtimes", help="Comma list: ort-cpu, torch-cpu, ort-cuda, torch-cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads for torch and onnxruntime."),
    min_time: float = typer.Option(1.0, "--min-time", min=0.0, help="Minimum seconds of timed runs per setting."),
    by_module: bool = typer.Option(False, "--by-module", help="Show GMACs per module."),
    depth: int = typer.Option(2, "--depth", min=0, help="Module-tree depth for --by-module."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
) -> None:
    """Params, fvcore GMACs and latency of one model."""
    from compressor.profiling.counts import MAC_UNIT, count_macs, count_params
    from compressor.profiling.latency import Timing, environment, measure_latency

    m, spec = _model_from(model, arch, trust_checkpoint, input_size, num_classes)
    size = spec.input_size
    macs = count_macs(m, size)
    lat = [measure_latency(m, size, rt.strip(), bs, threads, Timing(min_time_s=min_time)).to_dict()
           for rt in runtimes.split(",") for bs in _parse_ints(batch_sizes, "--batch-sizes")]
    result = {"model": spec.name, "input_size": list(size), "params": count_params(m), "gmacs": macs.gmacs, "gflops": macs.gflops,
              "mac_unit": MAC_UNIT, "skipped_ops": macs.skipped_ops, "latency": lat, "environment": environment()}
    if by_module:
        result["by_module_gmacs"] = {k: v for k, v in macs.by_module.items() if k.count(".") < depth}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    stdout.print(f"[bold]{spec.name}[/bold] at {'x'.join(map(str, size))}: {result['params']['total']:,} params "
                 f"({result['params']['trainable']:,} trainable), {macs.gmacs:.4f} GMACs = {macs.gflops:.4f} GFLOPs")
    stdout.print(f"  {MAC_UNIT}")
    if macs.skipped_ops:
        stdout.print("  operators fvcore skipped (not counted): " + ", ".join(f"{k} ×{v}" for k, v in macs.skipped_ops.items()))
    if by_module:
        rows = [[k or "(total)", f"{v:.4f}"] for k, v in result["by_module_gmacs"].items()]
        stdout.print(_table("GMACs by module", ["module", "GMACs"], rows))
    rows = [[l["runtime"], str(l["batch_size"]), str(l["threads"]), f"{l['median_ms']:.3f}", f"{l['p90_ms']:.3f}", f"{l['p99_ms']:.3f}",
             f"{l['cold_ms']:.2f}", f"{100 * l['cv']:.1f}%", str(l["runs"]), f"{l['images_per_s']:,.0f}", ",".join(l["providers"])] for l in lat]
    stdout.print(_table("latency", ["runtime", "batch", "threads", "median ms", "p90 ms", "p99 ms", "cold ms", "CV", "runs", "img/s", "providers"], rows))
    env = result["environment"]
    stdout.print(f"[dim]{env['cpu']} ({env['cores']} cores), GPU {env['gpu']}, torch {env['torch']}, onnxruntime {env['onnxruntime']}, fvcore {env['fvcore']}[/dim]")


def _model_from(model: str, arch, trust, input_size, num_classes):
    from dataclasses import replace

    from compressor.models.checkpoint import load_model
    from compressor.models.spec import ModelSpec
    from compressor.models.registry import parse_arch

    size = _parse_size(input_size) if input_size else None
    if Path(model).exists():
        m, spec, _ = load_model(model, arch=arch, trust=trust, input_size=size)
        if size:
            spec = replace(spec, input_size=size)
    else:
        a = parse_arch(model)
        classes = 1000 if a.family == "resnet" and num_classes == 10 and not a.kwargs.get("cifar_stem") else num_classes
        spec = ModelSpec(a.family, dict(a.kwargs), classes, input_size=size or ((3, 224, 224) if classes == 1000 else (3, 32, 32)))
        m = spec.build()
    from compressor.models.checkpoint import check_input_fits

    check_input_fits(m, spec.input_size, spec.name)
    return m.eval(), spec


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="atc checkpoint (or state_dict with --arch)."),
    out: Path = typer.Option(..., "--out", help="ONNX file to write."),
    arch: Optional[str] = ARCH, trust_checkpoint: bool = TRUST,
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C x H x W for state_dicts."),
    atol: float = typer.Option(1e-4, "--atol", min=0.0, help="Max allowed |onnxruntime - torch|."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
    int8: bool = typer.Option(False, "--int8", help="Also write OUT with .int8.onnx: static QDQ quantization, U8 activations, S8 per-channel weights."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Dataset for INT8 calibration and its top-1 check (train/ and test/)."),
    calib_images: int = typer.Option(256, "--calib-images", min=1, help="Training images used for calibration."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads for the INT8 latency comparison."),
) -> None:
    """Export to one ONNX file (dynamic batch, metadata) and check parity with onnxruntime."""
    from compressor.errors import OutputError
    from compressor.export.int8 import int8_with_evaluation
    from compressor.export.onnx import export_checked

    int8_out = out.with_name(out.stem + ".int8.onnx")
    if int8 and not calib_data:
        raise AtcError("--int8 needs --calib-data DIR (a few hundred training images calibrate the activation ranges)")
    for path in (out, int8_out) if int8 else (out,):
        if path.exists() and not overwrite:
            raise OutputError(f"{path} exists; pass --overwrite to replace it or choose another --out")
    m, spec = _model_from(str(checkpoint), arch, trust_checkpoint, input_size, 10)
    parity = export_checked(m, spec, out, atol=atol)
    diffs = ", ".join(f"batch {b}: {d:.2e}" for b, d in parity.max_abs_diff.items())
    stdout.print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); max |onnxruntime - torch| {diffs} (atol {atol:g})")
    if int8:
        from compressor.data.open import open_dataset

        data = open_dataset(calib_data, image_size=spec.input_size[1] if calib_data == "digits" else None)
        r = int8_with_evaluation(out, int8_out, data, spec.mean, spec.std, spec.input_size, calib_images, threads)
        stdout.print(f"wrote {int8_out} ({int8_out.stat().st_size / 1e6:.2f} MB), calibrated on {r.calibration_images} images; "
                     f"top-1 FP32 {r.top1_fp32:.2f}% → INT8 {r.top1_int8:.2f}% ({r.top1_int8 - r.top1_fp32:+.2f}); "
                     f"ORT CPU batch-1 latency {r.fp32_ms:.3f} → {r.int8_ms:.3f} ms, speed-up {r.speedup:.2f}× "
                     f"(rounds {r.spread[0]:.2f}–{r.spread[1]:.2f}×)")


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., help="One or more atc compress --out folders."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write a merged report (required for several runs)."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
) -> None:
    """Rebuild report.md, report.json and tradeoff.png from finished runs and print the table."""
    from compressor.report.build import merge_reports, read_report, write_report

    reports = [read_report(d) for d in run_dirs]
    if len(reports) > 1 and out is None:
        raise AtcError("several runs need --out DIR for the merged report")
    merged = merge_reports(reports)
    write_report(out or run_dirs[0], merged)
    _print_report(merged, as_json)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
    students: int = typer.Option(3, "--students", min=1, help="Students to distil from the derivation ladder (the first is the preset's)."),
    threads: int = typer.Option(1, "--threads", min=1, help="Threads for latency (one keeps sub-millisecond timings steady)."),
    device: str = DEVICE,
) -> None:
    """The whole job on the bundled digits, on CPU in a few minutes: train a teacher, compress it."""
    from compressor import pipeline
    from compressor.config import load_config
    from compressor.device import pick_device

    reporter = RichReporter()
    pipeline.prepare_output(out, overwrite)
    cfg = load_config("demo")
    dev = pick_device(device)
    ds = pipeline.load_data("digits", cfg, reporter=reporter)
    reporter.info(f"1/2 training a wrn-16-2 teacher on the bundled digits ({len(ds.train_y)} train / {len(ds.test_y)} test, 16x16) on {dev}")
    pipeline.train_model("wrn-16-2", ds, cfg, out / "teacher.pt", dev, reporter)
    reporter.info(f"2/2 deriving {students} student(s) and distilling them with AT+KD")
    rep = pipeline.compress(out / "teacher.pt", "digits", cfg, out, n_students=students, overwrite=True, device=device, reporter=reporter,
                            threads=threads, command=shlex.join(["atc"] + sys.argv[1:]))
    _print_report(rep, False)
    stderr.print(f"wrote {out}/report.json, report.md, tradeoff.png, student.pt, student.onnx, teacher.pt")


from cli.analysis_cmds import register as _register_analysis  # noqa: E402  (atc attention, atc sweep)

_register_analysis(app)


def run() -> None:
    """Console entry point: one-line errors and exit code 2 for anything the user can fix."""
    try:
        code = app(standalone_mode=False)
    except AtcError as exc:
        if STATE["debug"]:
            traceback.print_exc()
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as exc:  # SIGINT/SIGTERM during training: the state is saved, --resume continues
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:
        msg = exc.format_message().replace("\n", " ")
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print(f"error: {msg}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code if exc.exit_code != 1 else 2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # the environment failed, not atc: a full disk, device memory; anything else is a bug
        message = _environment_error(exc)
        if message is None:
            raise
        if STATE["debug"]:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _environment_error(exc: BaseException) -> str | None:
    """A one-line message for failures of the machine that reach the CLI outside atc's own checks."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"no space left on the device while writing {exc.filename or 'output'}; free some space and run the command again"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or exc}; check that you can read the inputs and write the output folder"
    if type(exc).__name__ == "OutOfMemoryError":
        return "CUDA ran out of memory; pass a smaller --batch-size or use --device cpu"
    return None


if __name__ == "__main__":
    run()
