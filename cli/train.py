"""``atc train``: train a model from scratch with a preset's recipe (e.g. a teacher)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cli import common as opt
from cli.common import config_from, join_parallel, speed_from, stats_from
from cli.progress import RichReporter, stderr


def train(
    arch: str = typer.Option(..., "--arch", help="Architecture to train, e.g. wrn-16-2 (see `atc models`).", rich_help_panel=opt.INPUT),
    data: str = typer.Option(..., "--data", help="Dataset folder (ImageFolder train/+test/, torchvision CIFAR) or 'digits'.",
                             rich_help_panel=opt.INPUT),
    out: Path = typer.Option(..., "--out", help="Checkpoint file to write, e.g. teacher.pt.", rich_help_panel=opt.OUTPUT),
    preset: Optional[str] = opt.PRESET, overrides: Optional[List[str]] = opt.SET, epochs: Optional[int] = opt.EPOCHS, batch_size: Optional[int] = opt.BATCH,
    lr: Optional[float] = opt.LR, seed: Optional[int] = opt.SEED, train_subset: Optional[int] = opt.SUBSET, device: str = opt.DEVICE,
    overwrite: bool = opt.OVERWRITE, resume: bool = opt.RESUME, strict_data: bool = opt.STRICT_DATA,
    compile_: bool = opt.COMPILE, channels_last: Optional[bool] = opt.CHANNELS_LAST, precision: str = opt.PRECISION,
    cuda_graphs: Optional[bool] = opt.CUDA_GRAPHS,
    workers: Optional[int] = opt.WORKERS, nproc: int = opt.NPROC, nnodes: Optional[str] = opt.NNODES, node_rank: Optional[int] = opt.NODE_RANK,
    master_addr: Optional[str] = opt.MASTER_ADDR, master_port: Optional[int] = opt.MASTER_PORT,
    tensorboard: Optional[Path] = opt.TENSORBOARD,
    mean: Optional[str] = typer.Option(None, "--mean", help="Normalisation mean to train with and store: one value or one per RGB "
                                       "channel (with --std). Default: the preset's data.mean, else the training images' statistics."),
    std: Optional[str] = typer.Option(None, "--std", help="Normalisation std to train with and store (with --mean)."),
) -> None:
    """Train a model from scratch with the preset's recipe (e.g. a teacher)."""
    from compressor import fileio, pipeline
    from compressor.models.registry import parse_arch
    from compressor.options import RunOptions
    from compressor.report.tables import plural

    parse_arch(arch)
    fileio.check_train_output(out, overwrite, resume)
    cfg = config_from(preset, overrides, data, train__epochs=epochs, train__batch_size=batch_size, train__lr=lr, train__seed=seed,
                      data__train_subset=train_subset)
    speed = speed_from(precision, channels_last, compile_, workers, cuda_graphs)
    rank, device = join_parallel(device, nproc, nnodes, node_rank, master_addr, master_port)
    reporter = RichReporter(quiet=not rank.is_main)
    options = RunOptions(device=device, speed=speed, tensorboard=tensorboard, resume=resume, overwrite=overwrite,
                         strict_data=strict_data, **stats_from(mean, std))
    _, spec, metrics = pipeline.train(arch, data, cfg, out, options, reporter=reporter)
    if rank.is_main:
        stderr.print(f"saved {out}: {spec.name}, test top-1 {metrics['top1']:.2f}% after {plural(cfg.train.epochs, 'epoch')}")
