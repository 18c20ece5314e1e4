"""What every command shares: typed options with one help text each, the flag-to-config merge,
small parsers, tables and the report printout. Nothing here does the library's work."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from cli.progress import stderr
from compressor.config import MAX_IMAGE_SIZE
from compressor.errors import AtcError

stdout = Console()
if not stdout.is_terminal:
    stdout = Console(width=200)  # pipes and CI logs: keep tables whole instead of truncating cells


OPTIONAL_VALUES = {"--ray": "local"}  # options whose value may be left out, and what that means


def fill_optional_values(args: list[str]) -> list[str]:
    """``--ray`` alone (at the end, or before another option) means ``--ray local``: click options cannot
    take an optional value through Typer, so the missing value is written in before parsing."""
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in OPTIONAL_VALUES and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append(OPTIONAL_VALUES[arg])
    return out


class OptionalValues(typer.core.TyperCommand):
    """A command whose ``OPTIONAL_VALUES`` options may be given without their value."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, fill_optional_values(args))


class PanelCommand(OptionalValues):
    """``--help`` with the options in groups (each option's ``rich_help_panel``: Input, Student,
    Distillation, Training, Speed, Output), in the order the groups first appear; click's plain layout,
    so it reads at 80 columns and in logs. Its options may leave out the values ``OPTIONAL_VALUES`` lists."""

    def format_options(self, ctx, formatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        args = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append(record)
            else:
                groups.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl(args)
        for title, records in sorted(groups.items(), key=lambda kv: kv[0] == "Options"):  # the ungrouped last
            with formatter.section(title):
                formatter.write_dl(records)


def overrides_from(overrides: list[str] | None, **flags: Any) -> dict[str, dict[str, Any]]:
    """``--set`` overrides, then named flags (``section__key=value``; None = not given), as preset sections."""
    from compressor.config import parse_overrides

    merged = parse_overrides(overrides or [])
    for key, value in flags.items():
        if value is not None:
            section, name = key.split("__")
            merged.setdefault(section, {})[name] = value
    return merged


def config_from(preset: str | None, overrides: list[str] | None, data: str | None = None, **flags: Any):
    """The preset with ``--set`` overrides and named flags applied. Without ``--preset`` the data decides
    (digits → demo; ``compressor.load.preset_for_data``) and the run's schedule line says so."""
    from compressor.config import load_config

    if preset is None:
        import dataclasses

        from compressor.load import preset_for_data

        preset, why = preset_for_data(data or "")
        return dataclasses.replace(load_config(preset, overrides_from(overrides, **flags)), preset_reason=why)
    return load_config(preset, overrides_from(overrides, **flags))


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise AtcError(f"--input-size {text!r} must look like 3x32x32 (channels x height x width)")
    if max(parts[1:]) > MAX_IMAGE_SIZE or parts[0] > 64:  # a forward pass at 99999x99999 would allocate ~120 GB
        raise AtcError(f"--input-size {text!r} is larger than atc takes (at most 64 channels and {MAX_IMAGE_SIZE} pixels a side)")
    return parts  # type: ignore[return-value]


def parse_stats(text: str | None, option: str) -> tuple[float, ...]:
    """``--mean``/``--std``: one number or a comma list (empty tuple when not given)."""
    if text is None:
        return ()
    try:
        values = tuple(float(v) for v in text.strip("()[] ").split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v != v or abs(v) == float("inf") for v in values):
        raise AtcError(f"{option} {text!r} must be a number or a comma list of numbers, one per channel, e.g. 0.4914,0.4822,0.4465")
    return values


def stats_from(mean: str | None, std: str | None) -> dict[str, tuple[float, ...]]:
    """``--mean``/``--std`` checked together before anything is loaded, as ``RunOptions`` keywords."""
    from compressor.config import check_mean_std

    stats = {"mean": parse_stats(mean, "--mean"), "std": parse_stats(std, "--std")}
    check_mean_std(stats["mean"], stats["std"], "--mean/--std")
    return stats


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise AtcError(f"{option} {text!r} must be a comma list of positive whole numbers, e.g. 1,64")
    return values


def table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i < 2 else "right")
    for r in rows:
        t.add_row(*r)
    return t


def command_line() -> str:
    import os
    import shlex

    return os.environ.get("ATC_COMMAND") or shlex.join(["atc"] + sys.argv[1:])


def speed_from(precision: str, channels_last, compile_: bool, workers, cuda_graphs=None):
    from compressor.device import Speed

    return Speed(precision=precision, channels_last=channels_last, compile=compile_, workers=workers,
                 **({} if cuda_graphs is None else {"cuda_graphs": cuda_graphs}))


def join_parallel(device: str, nproc: int, nnodes, node_rank, master_addr, master_port):
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


def print_report(report: dict, as_json: bool) -> None:
    """The trade-off table on stdout (or report.json with ``as_json``); the notes (published student, latency
    trust, INT8 meaning) on stderr either way."""
    from compressor.report.tables import GPU_COLUMNS, columns, gpu_rows, report_notes, rows

    if as_json:
        print(json.dumps(report, indent=2))
    else:
        lat = report.get("latency", {})
        stdout.print(table(f"{report['data']['name']}: teacher vs students (GMACs = multiply-adds; latency: ORT CPU batch "
                           f"{lat.get('batch_size', 1)})", columns(report), rows(report)))
        if gpu := gpu_rows(report):
            stdout.print(table(f"GPU latency ({lat.get('gpu', {}).get('device', 'CUDA')}, fp32)", list(GPU_COLUMNS), gpu))
            for note in lat.get("gpu_notes", []):  # what GPU timing left out (CPU-only runs stay quiet)
                stderr.print(f"note: {note}")
    for note in report_notes(report):
        stderr.print(f"note: {note}", highlight=False)


# Options shared by several commands: one definition, one help text, one group (``PanelCommand``).
INPUT, STUDENT, DISTIL, TRAINING, SPEED, OUTPUT = "Input", "Student", "Distillation", "Training", "Speed", "Output"
PRESETS_EPOCHS = "the preset's: cifar 200, imagenet 100, finetune 60, demo 12"

PRESET = typer.Option(None, "--preset", show_default="from the data: digits → demo, CIFAR-100 → cifar100, else cifar",
                      help="Shipped preset name (cifar, cifar100, imagenet, finetune, demo) or a TOML path.", rich_help_panel=INPUT)
SET = typer.Option(None, "--set", help="Override a preset key, e.g. --set train.epochs=10 (repeatable).", rich_help_panel=INPUT)
EPOCHS = typer.Option(None, "--epochs", min=1, show_default=PRESETS_EPOCHS, help="Epochs (milestones scale with it).",
                      rich_help_panel=TRAINING)
BATCH = typer.Option(None, "--batch-size", min=1, show_default="the preset's: cifar 128", help="Batch size.", rich_help_panel=TRAINING)
LR = typer.Option(None, "--lr", min=0.0, show_default="the preset's: cifar 0.1", help="Initial learning rate.", rich_help_panel=TRAINING)
SEED = typer.Option(None, "--seed", min=0, show_default="the preset's: 0", help="Random seed.", rich_help_panel=TRAINING)
SUBSET = typer.Option(None, "--train-subset", min=0, show_default="all", help="Use only N training images (0 = all), for short runs.",
                      rich_help_panel=TRAINING)
DEVICE = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda.", rich_help_panel=TRAINING)
TRUST = typer.Option(False, "--trust-checkpoint", help="Allow checkpoints that run code when unpickled (only for files you trust).",
                     rich_help_panel=INPUT)
ARCH = typer.Option(None, "--arch", help="Architecture of a plain state_dict, e.g. wrn-40-4 (see `atc models`); inferred from "
                    "the weights for the zoo families when left out.", rich_help_panel=INPUT)
MEAN = typer.Option(None, "--mean", show_default="the checkpoint's, else the preset's data.mean, else the training images'",
                    help="The teacher's normalisation mean: one value, or one per RGB channel, e.g. 0.4914,0.4822,0.4465 "
                    "(with --std).", rich_help_panel=INPUT)
STD = typer.Option(None, "--std", help="The teacher's normalisation std, e.g. 0.247,0.2435,0.2616 (with --mean).",
                   rich_help_panel=INPUT)
COMPILE = typer.Option(False, "--compile", help="torch.compile the student and teacher (compile time is reported apart).",
                       rich_help_panel=SPEED)
CHANNELS_LAST = typer.Option(None, "--channels-last/--no-channels-last", show_default="on with CUDA", help="NHWC memory format.",
                             rich_help_panel=SPEED)
CUDA_GRAPHS = typer.Option(None, "--cuda-graphs/--no-cuda-graphs", show_default="on with CUDA where it applies",
                           help="Record each training step once as a CUDA graph and replay it (a note says when it does not apply).",
                           rich_help_panel=SPEED)
PRECISION = typer.Option("auto", "--precision", help="auto (bf16 on CUDA, fp16 with loss scaling where bf16 is missing, "
                         "fp32 on CPU), bf16, fp16 or fp32.", rich_help_panel=SPEED)
WORKERS = typer.Option(None, "--workers", min=0, show_default="one per spare core, at most 8",
                       help="DataLoader processes when the data is too large to keep on the device.", rich_help_panel=SPEED)
NPROC = typer.Option(1, "--nproc", min=1, help="Data-parallel processes on this node (DDP); runs the command again through "
                     "torch.distributed.run, like torchrun --nproc-per-node N -m cli ….", rich_help_panel=SPEED)
NNODES = typer.Option(None, "--nnodes", help="Nodes of a multi-node run (passed to torchrun).", rich_help_panel=SPEED)
NODE_RANK = typer.Option(None, "--node-rank", min=0, help="This node's rank in a multi-node run (passed to torchrun).",
                         rich_help_panel=SPEED)
MASTER_ADDR = typer.Option(None, "--master-addr", help="Address of node 0 in a multi-node run (passed to torchrun).",
                           rich_help_panel=SPEED)
MASTER_PORT = typer.Option(None, "--master-port", min=1, help="Port on node 0 (passed to torchrun).", rich_help_panel=SPEED)
TENSORBOARD = typer.Option(None, "--tensorboard", help="Write per-epoch scalars (loss terms, top-1, lr, images/s) for TensorBoard "
                           "into this folder, one run per trained model (needs pip install 'atc[tensorboard]').", rich_help_panel=OUTPUT)
OVERWRITE = typer.Option(False, "--overwrite", help="Replace existing outputs.", rich_help_panel=OUTPUT)
RESUME = typer.Option(False, "--resume", help="Continue a killed run from its saved training state.", rich_help_panel=OUTPUT)
STRICT_DATA = typer.Option(False, "--strict-data", help="Stop at the first corrupt image instead of skipping it.", rich_help_panel=INPUT)
JSON = typer.Option(False, "--json", help="Machine-readable output on stdout.", rich_help_panel=OUTPUT)
THREADS = typer.Option(1, "--threads", min=1, help="CPU threads for every latency figure (one: the same figure on any machine "
                       "and beside other jobs; more to see what a multi-core deployment gets).", rich_help_panel=OUTPUT)
PICK = typer.Option("auto", "--pick", help="Which student is published as student.pt/student.onnx: auto (the first choice unless "
                    "another is both more accurate and faster), accurate, fastest, or a speed-up such as 3x (the most accurate "
                    "student at least that fast).", rich_help_panel=OUTPUT)
KEEP_STATE = typer.Option(False, "--keep-state", help="Keep each finished student's training state (train_state.pt); "
                          "otherwise it is removed once the student is saved.", rich_help_panel=OUTPUT)
