"""``atc``: derive → distil → measure → report → export, one command per step.

Each command parses its options, calls the library and prints. Errors the user can fix
print one line, ``error: …``, and exit with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import shlex
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from compressor.errors import AtcError
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
) -> None:
    """Train a model from scratch with the preset's recipe (e.g. a teacher)."""
    from compressor.errors import OutputError
    from compressor.models.registry import parse_arch
    from compressor.pipeline import load_data, train_model
    from compressor.distill import pick_device

    parse_arch(arch)
    if out.exists() and not (overwrite or resume):
        raise OutputError(f"{out} exists; pass --overwrite to replace it, --resume to continue its run, or another --out")
    cfg = _config(preset, overrides, train__epochs=epochs, train__batch_size=batch_size, train__lr=lr, train__seed=seed,
                  data__train_subset=train_subset)
    dev = pick_device(device)
    reporter = RichReporter()
    ds = load_data(data, cfg, strict_data, reporter)
    reporter.info(f"training {arch} on {ds.name} ({len(ds.train_y)} train / {len(ds.test_y)} test) on {dev}")
    _, spec, metrics = train_model(arch, ds, cfg, out, dev, reporter, resume)
    stderr.print(f"saved {out}: {spec.name}, test top-1 {metrics['top1']:.2f}% after {cfg.train.epochs} epochs")


@app.command()
def compress(
    teacher: Path = typer.Option(..., "--teacher", help="Trained teacher: atc checkpoint or state_dict (with --arch)."),
    data: str = typer.Option(..., "--data", help="Dataset folder or 'digits'."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    preset: str = PRESET, overrides: Optional[List[str]] = SET,
    method: Optional[str] = typer.Option(None, "--method", help="none | kd | at | at+kd (default: the preset's)."),
    student: Optional[List[str]] = typer.Option(None, "--student", help="Student architecture (repeatable); default: preset policy."),
    students: int = typer.Option(0, "--students", min=0, help="Distil N candidates from the derivation ladder."),
    arch: Optional[str] = ARCH, epochs: Optional[int] = EPOCHS, batch_size: Optional[int] = BATCH, lr: Optional[float] = LR,
    seed: Optional[int] = SEED, train_subset: Optional[int] = SUBSET, device: str = DEVICE,
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for latency measurement."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show students, attention pairs and initial losses; do not train."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run in --out."),
    trust_checkpoint: bool = TRUST,
    strict_data: bool = typer.Option(False, "--strict-data", help="Stop at the first corrupt image instead of skipping it."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
) -> None:
    """Distil a thinner, shallower student from a trained teacher; report and export it."""
    from compressor import pipeline

    cfg = _config(preset, overrides, distill__method=method, train__epochs=epochs, train__batch_size=batch_size, train__lr=lr,
                  train__seed=seed, data__train_subset=train_subset)
    reporter = RichReporter()
    if dry_run:
        return _dry_run(teacher, data, cfg, student, students, arch, trust_checkpoint, strict_data, reporter)
    report = pipeline.compress(teacher, data, cfg, out, students=student, n_students=students, arch=arch,
                               trust=trust_checkpoint, overwrite=overwrite, resume=resume, strict_data=strict_data,
                               device=device, threads=threads, reporter=reporter, command=shlex.join(["atc"] + sys.argv[1:]))
    _print_report(report, as_json)
    stderr.print(f"wrote {out}/report.json, report.md, tradeoff.png, student.pt, student.onnx, metrics.jsonl")


def _dry_run(teacher, data, cfg, names, count, arch, trust, strict, reporter) -> None:
    from dataclasses import replace

    from compressor import pipeline
    from compressor.checkpoint import load_model

    model, spec, _ = load_model(teacher, arch=arch, trust=trust)
    ds = pipeline.load_data(data, cfg, strict, reporter)
    if spec.mean is None:
        spec = replace(spec, input_size=tuple(ds.input_size))
    pipeline.check_compatible(spec, ds)
    from compressor.profiling import count_macs, count_params

    tp, tm = count_params(model)["total"], count_macs(model, spec.input_size).gmacs
    stderr.print(f"teacher {spec.name}: {tp:,} params, {tm:.4f} GMACs  (method {cfg.distill.method}, AT layers {cfg.distill.at_layers})")
    for dr in pipeline.plan(model, spec, ds, cfg, pipeline.choose_students(spec, cfg, names, count), cfg.distill.method):
        c = dr.student
        stderr.print(f"\nstudent {c.name}: {c.params:,} params ({c.param_ratio:.2f}x fewer), {c.gmacs:.4f} GMACs ({c.mac_ratio:.2f}x fewer)")
        for p in dr.pairs:
            stderr.print(f"  AT pair  {p.describe()}")
        stderr.print("  initial loss terms: " + ", ".join(f"{k} {v:.4g}" for k, v in dr.initial_terms.items()))
    stderr.print("\ndry run: nothing trained or written")


def _print_report(report: dict, as_json: bool) -> None:
    from compressor.report import COLUMNS, rows

    if as_json:
        print(json.dumps(report, indent=2))
    else:
        stdout.print(_table(f"{report['data']['name']}: teacher vs students (GMACs = multiply-adds; latency: ORT CPU batch 1)",
                            list(COLUMNS), rows(report)))


@app.command()
def derive(
    teacher: str = typer.Option(..., "--teacher", help="Teacher checkpoint or zoo name."),
    arch: Optional[str] = ARCH, trust_checkpoint: bool = TRUST,
    input_size: str = typer.Option("3x32x32", "--input-size", help="Input size for zoo names or state_dicts."),
    num_classes: int = typer.Option(10, "--num-classes", min=1, help="Classes, for zoo names."),
    as_json: bool = typer.Option(False, "--json", help="Print the ladder as JSON on stdout."),
) -> None:
    """List thinner/shallower student candidates with params, GMACs and ratios."""
    from compressor.checkpoint import ModelSpec, load_model
    from compressor.derive import ladder

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
    from compressor.profiling import MAC_UNIT, Timing, count_macs, count_params, environment, measure_latency

    m, spec = _model_from(model, arch, trust_checkpoint, input_size, num_classes)
    size = spec.input_size
    macs = count_macs(m, size)
    lat = [measure_latency(m, size, rt.strip(), bs, threads, Timing(min_time_s=min_time)).to_dict()
           for rt in runtimes.split(",") for bs in _parse_ints(batch_sizes, "--batch-sizes")]
    result = {"model": spec.name, "input_size": list(size), "params": count_params(m), "gmacs": macs.gmacs, "gflops": macs.gflops,
              "mac_unit": MAC_UNIT, "skipped_ops": macs.skipped_ops, "latency": lat, "environment": environment()}
    if by_module:
        result["by_module_gmacs"] = {k: v for k, v in macs.by_module.items() if k.count(".") < depth and (k or depth >= 0)}
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

    from compressor.checkpoint import ModelSpec, load_model
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
    return m.eval(), spec


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="atc checkpoint (or state_dict with --arch)."),
    out: Path = typer.Option(..., "--out", help="ONNX file to write."),
    arch: Optional[str] = ARCH, trust_checkpoint: bool = TRUST,
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C x H x W for state_dicts."),
    atol: float = typer.Option(1e-4, "--atol", min=0.0, help="Max allowed |onnxruntime - torch|."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
) -> None:
    """Export to one ONNX file (dynamic batch, metadata) and check parity with onnxruntime."""
    from compressor.errors import OutputError
    from compressor.export import export_checked

    if out.exists() and not overwrite:
        raise OutputError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    m, spec = _model_from(str(checkpoint), arch, trust_checkpoint, input_size, 10)
    parity = export_checked(m, spec, out, atol=atol)
    diffs = ", ".join(f"batch {b}: {d:.2e}" for b, d in parity.max_abs_diff.items())
    stdout.print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); max |onnxruntime - torch| {diffs} (atol {atol:g})")


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., help="One or more atc compress --out folders."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write a merged report (required for several runs)."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
) -> None:
    """Rebuild report.md, report.json and tradeoff.png from finished runs and print the table."""
    from compressor.report import merge_reports, read_report, write_report

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
    device: str = DEVICE,
) -> None:
    """The whole job on the bundled digits, on CPU in a few minutes: train a teacher, compress it."""
    from compressor import pipeline
    from compressor.config import load_config
    from compressor.distill import pick_device

    reporter = RichReporter()
    pipeline.prepare_output(out, overwrite)
    cfg = load_config("demo")
    dev = pick_device(device)
    ds = pipeline.load_data("digits", cfg, reporter=reporter)
    reporter.info(f"1/2 training a wrn-16-2 teacher on the bundled digits ({len(ds.train_y)} train / {len(ds.test_y)} test, 16x16) on {dev}")
    pipeline.train_model("wrn-16-2", ds, cfg, out / "teacher.pt", dev, reporter)
    reporter.info("2/2 deriving a student and distilling it with AT+KD")
    rep = pipeline.compress(out / "teacher.pt", "digits", cfg, out, overwrite=True, device=device, reporter=reporter,
                            command=shlex.join(["atc"] + sys.argv[1:]))
    _print_report(rep, False)
    stderr.print(f"wrote {out}/report.json, report.md, tradeoff.png, student.pt, student.onnx, teacher.pt")


def run() -> None:
    """Console entry point: one-line errors and exit code 2 for anything the user can fix."""
    try:
        code = app(standalone_mode=False)
    except AtcError as exc:
        if STATE["debug"]:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
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
        print("error: interrupted; the last epoch's training state is saved, continue with --resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
