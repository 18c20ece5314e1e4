"""Commands that look at one model or finished runs: ``inspect``, ``derive``, ``profile``, ``export``, ``report``, ``models``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from cli import common as opt
from cli.common import ARCH, JSON, THREADS, TRUST, config_from, parse_ints, parse_size, print_report, stats_from, stdout, table
from cli.progress import RichReporter, stderr
from compressor.errors import AtcError
from compressor.report.tables import noisy_profile_note


def derive(
    teacher: str = typer.Option(..., "--teacher", help="Teacher checkpoint or architecture name (see `atc models`)."),
    arch: Optional[str] = ARCH, trust_checkpoint: bool = TRUST,
    input_size: str = typer.Option("3x32x32", "--input-size", help="Input size for architecture names or state_dicts."),
    num_classes: int = typer.Option(10, "--num-classes", min=1, help="Classes, for architecture names."),
    as_json: bool = typer.Option(False, "--json", help="Print the ladder as JSON on stdout."),
) -> None:
    """List thinner/shallower student candidates with params, GMACs and ratios."""
    from compressor.derive.candidates import teacher_ladder

    spec, cands = teacher_ladder(teacher, arch=arch, trust=trust_checkpoint, input_size=parse_size(input_size), num_classes=num_classes)
    if as_json:
        print(json.dumps([{"name": c.name, "params": c.params, "gmacs": c.gmacs, "param_ratio": c.param_ratio,
                           "mac_ratio": c.mac_ratio} for c in cands], indent=2))
        return
    rows = [[c.name, f"{c.params:,}", f"{c.gmacs:.4f}", f"{c.param_ratio:.2f}", f"{c.mac_ratio:.2f}"] for c in cands]
    stdout.print(table(f"students of {spec.name} at {'x'.join(map(str, spec.input_size))}",
                       ["student", "params", "GMACs", "params ×", "GMACs ×"], rows))


def profile(
    model: str = typer.Argument(..., help="atc checkpoint, state_dict (with --arch), ONNX file (e.g. student.int8.onnx) or "
                                "architecture name."),
    arch: Optional[str] = ARCH, trust_checkpoint: bool = TRUST,
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C x H x W, e.g. 3x224x224 (default: the checkpoint's, or 3x32x32)."),
    num_classes: int = typer.Option(10, "--num-classes", min=1, help="Classes, for architecture names (ImageNet ResNets default to 1000)."),
    batch_sizes: str = typer.Option("1", "--batch-sizes", help="Comma list of batch sizes."),
    runtimes: str = typer.Option("ort-cpu,torch-cpu", "--runtimes", help="Comma list: ort-cpu, torch-cpu, ort-cuda, torch-cuda, torch-cuda-graph "
                                 "(the forward replayed as a CUDA graph)."),
    threads: int = THREADS,
    min_time: float = typer.Option(1.0, "--min-time", min=0.0, help="Minimum seconds of timed runs per setting."),
    by_module: bool = typer.Option(False, "--by-module", help="Show GMACs per module."),
    depth: int = typer.Option(2, "--depth", min=0, help="Module-tree depth for --by-module."),
    as_json: bool = JSON,
) -> None:
    """Params, fvcore GMACs and latency of one model (an ONNX file: its tensors and its onnxruntime latency)."""
    from compressor.models.checkpoint import open_model
    from compressor.profiling.summary import profile_model, profile_onnx

    kinds = [rt.strip() for rt in runtimes.split(",")]
    sizes = parse_ints(batch_sizes, "--batch-sizes")
    if model.lower().endswith(".onnx") and Path(model).is_file():
        prof = profile_onnx(model, kinds, sizes, threads, min_time, parse_size(input_size) if input_size else None)
    else:
        m, spec = open_model(model, arch, trust_checkpoint, parse_size(input_size) if input_size else None, num_classes)
        prof = profile_model(m, spec.name, spec.input_size, kinds, sizes, threads, min_time, depth if by_module else None)
    result = prof.to_dict()
    if as_json:
        print(json.dumps(result, indent=2))
        return
    size = "x".join(map(str, prof.input_size))
    if prof.gmacs is None:
        stdout.print(f"[bold]{prof.model}[/bold] at {size}: {prof.params['total']:,} stored values (weights, biases and, in an INT8 "
                     f"file, its scales); GMACs {prof.mac_unit}")
    else:
        stdout.print(f"[bold]{prof.model}[/bold] at {size}: {prof.params['total']:,} params "
                     f"({prof.params['trainable']:,} trainable), {prof.gmacs:.4f} GMACs = {prof.gflops:.4f} GFLOPs")
        stdout.print(f"  {prof.mac_unit}; convolutions and matrix products alone (torchvision's convention): "
                     f"{prof.gmacs_conv_linear:.4f} GMACs")
    if prof.skipped_ops:
        stdout.print("  operators fvcore skipped (not counted): " + ", ".join(f"{k} ×{v}" for k, v in prof.skipped_ops.items()))
    if prof.by_module_gmacs is not None:
        stdout.print(table("GMACs by module", ["module", "GMACs"], [[k or "(total)", f"{v:.4f}"] for k, v in prof.by_module_gmacs.items()]))
    rows = [[lat["runtime"], str(lat["batch_size"]), str(lat["threads"]), f"{lat['median_ms']:.3f}", f"{lat['p90_ms']:.3f}",
             f"{lat['p99_ms']:.3f}", f"{lat['cold_ms']:.2f}", f"{100 * lat['cv']:.1f}%", str(lat["runs"]), f"{lat['images_per_s']:,.0f}",
             ",".join(lat["providers"])] for lat in result["latency"]]
    stdout.print(table("latency", ["runtime", "batch", "threads", "median ms", "p90 ms", "p99 ms", "cold ms", "CV", "runs", "img/s",
                                   "providers"], rows))
    for note in prof.notes:
        stderr.print(f"note: {note}")
    if note := noisy_profile_note(result["latency"]):
        stderr.print(f"note: {note}")
    if prof.gpu_latency:
        gpu_rows = [[lat["runtime"], str(lat["batch_size"]), f"{lat['median_ms']:.3f}", f"{lat['p90_ms']:.3f}", f"{lat['cold_ms']:.2f}",
                     f"{100 * lat['cv']:.1f}%", str(lat["runs"]), f"{lat['images_per_s']:,.0f}",
                     f"{lat.get('precision', 'fp32')}, {lat.get('memory_format', 'contiguous')}", lat.get("label", "")]
                    for lat in result["gpu_latency"]["runs"]]
        stdout.print(table(f"GPU latency ({prof.gpu_latency['device']}, CUDA events around one call after warm-up)",
                           ["runtime", "batch", "median ms", "p90 ms", "cold ms", "CV", "runs", "img/s", "arithmetic", "what it is"],
                           gpu_rows))
    for note in prof.gpu_notes:
        stdout.print(f"[dim]note: {note}[/dim]")
    env = prof.environment
    stdout.print(f"[dim]{env['cpu']} ({env['cores']} cores), GPU {env['gpu']}, torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
                 f"fvcore {env['fvcore']}[/dim]")


def export(
    checkpoint: Path = typer.Argument(..., help="atc checkpoint (or state_dict with --arch)."),
    out: Path = typer.Option(..., "--out", help="ONNX file to write."),
    arch: Optional[str] = ARCH, trust_checkpoint: bool = TRUST,
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C x H x W for state_dicts."),
    atol: float = typer.Option(1e-4, "--atol", min=0.0, help="Parity tolerance: |onnxruntime − torch| ≤ atol + rtol·|torch| "
                               "elementwise (rtol = atol unless --rtol)."),
    rtol: Optional[float] = typer.Option(None, "--rtol", min=0.0, help="Relative part of the parity tolerance (default: --atol)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
    int8: bool = typer.Option(False, "--int8", help="Also write OUT with .int8.onnx: static QDQ quantization, U8 activations, S8 per-channel weights."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Dataset for INT8 calibration and its top-1 check (train/ and test/)."),
    calib_images: int = typer.Option(256, "--calib-images", min=1, help="Training images used for calibration."),
    threads: int = THREADS, as_json: bool = JSON,
) -> None:
    """Export to one ONNX file (dynamic batch, metadata) and check parity with onnxruntime."""
    from compressor import pipeline
    from compressor.options import RunOptions

    options = RunOptions(arch=arch, trust=trust_checkpoint, overwrite=overwrite, int8=int8, threads=threads)
    done = pipeline.export(checkpoint, out, options, input_size=parse_size(input_size) if input_size else None, atol=atol, rtol=rtol,
                           calib_data=calib_data, calib_images=calib_images, reporter=RichReporter())
    if as_json:
        print(json.dumps(done.to_dict(), indent=2))
        return
    p = done.parity
    diffs = ", ".join(f"batch {b}: {d:.2e} (relative {p.max_rel_diff[b]:.2e})" for b, d in p.max_abs_diff.items())
    stdout.print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); max |onnxruntime - torch| {diffs} (atol {atol:g}, rtol {p.rtol:g})")
    if (r := done.int8) is not None:
        stdout.print(f"wrote {r.path} ({r.path.stat().st_size / 1e6:.2f} MB), calibrated on {r.calibration_images} images; "
                     f"top-1 FP32 {r.top1_fp32:.2f}% → INT8 {r.top1_int8:.2f}% ({r.top1_int8 - r.top1_fp32:+.2f}); "
                     f"ORT CPU batch-1 latency {r.fp32_ms:.3f} → {r.int8_ms:.3f} ms, speed-up {r.speedup:.2f}× "
                     f"(rounds {r.spread[0]:.2f}–{r.spread[1]:.2f}×)")
        if r.agreement is not None:
            stdout.print(f"INT8 top-1 equals the QDQ graph's (onnx reference evaluator) on {r.agreement.agree} of "
                         f"{r.agreement.images} test images")
        for note in r.notes():
            stderr.print(f"note: {note}", highlight=False)


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
    merged = merge_reports(reports, [str(d) for d in run_dirs])
    write_report(out or run_dirs[0], merged)
    print_report(merged, as_json)


def models(
    pattern: Optional[str] = typer.Argument(None, help="Only names matching this (a word or a glob like 'mobilenet*')."),
    as_json: bool = JSON,
) -> None:
    """The model families atc knows and how to name any other model."""
    from compressor.models.registry import describe_models

    entries = describe_models(pattern)
    if pattern is not None and not entries:
        raise AtcError(f"no architecture matches {pattern!r}; run `atc models` without a pattern for how to name models")
    if as_json:
        print(json.dumps(entries, indent=2))
        return
    t = table("architectures (--arch, --student, --teacher NAME)", ["family", "names", "about"],
              [[e["family"], e["names"], e["about"]] for e in entries])
    for column in t.columns:
        column.justify = "left"
    stdout.print(t)


def inspect_checkpoint(
    checkpoint: Path = typer.Argument(..., help="A teacher checkpoint: atc's, a state_dict or another project's (see the README)."),
    arch: Optional[str] = ARCH, trust_checkpoint: bool = TRUST, preset: str = opt.PRESET,
    mean: Optional[str] = opt.MEAN, std: Optional[str] = opt.STD, as_json: bool = JSON,
) -> None:
    """What a checkpoint is and how atc would read it: format, architecture, classes, input size and
    normalisation, without loading any data."""
    from compressor.load import inspect_teacher
    from compressor.options import RunOptions

    cfg = config_from(preset, None)
    info = inspect_teacher(checkpoint, cfg, RunOptions(arch=arch, trust=trust_checkpoint, **stats_from(mean, std)))
    if as_json:
        print(json.dumps(info.to_dict(), indent=2))
        return

    def numbers(values) -> str:
        return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"

    names = ", ".join(info.class_names[:5]) + (", …" if len(info.class_names) > 5 else "") if info.class_names else "not stored"
    rows = [["file", f"{info.path} ({info.container})"], ["format", info.format],
            ["architecture", f"{info.architecture} (family {info.family}; {info.architecture_from})"],
            ["parameters", f"{info.params:,}"], ["classes", f"{info.num_classes} ({names})"],
            ["input", f"{'×'.join(map(str, info.input_size))} ({info.input_size_from})"],
            ["normalisation", (f"mean {numbers(info.mean)}, std {numbers(info.std)}, " if info.mean else "") + info.normalisation_from],
            ["output", info.output]]
    rows += [["metric " + k, f"{v:.2f}" if isinstance(v, float) else str(v)] for k, v in info.metrics.items()
             if isinstance(v, (int, float, str))]
    rows += [["note", n] for n in info.notes]
    t = table(f"atc inspect {checkpoint.name}", ["", ""], rows)
    t.show_header = False
    for column in t.columns:
        column.justify = "left"
    stdout.print(t)
