"""``atc train``: train a model from scratch with a preset's recipe (e.g. a teacher)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cli.common import (
    BATCH,
    CHANNELS_LAST,
    COMPILE,
    CUDA_GRAPHS,
    DEVICE,
    EPOCHS,
    LR,
    MASTER_ADDR,
    MASTER_PORT,
    NNODES,
    NODE_RANK,
    NPROC,
    OVERWRITE,
    PRECISION,
    PRESET,
    RESUME,
    SEED,
    SET,
    STRICT_DATA,
    SUBSET,
    TENSORBOARD,
    WORKERS,
    config_from,
    join_parallel,
    speed_from,
)
from cli.progress import RichReporter, stderr


def train(
    arch: str = typer.Option(..., "--arch", help="Architecture to train, e.g. wrn-16-2 (see `atc models`)."),
    data: str = typer.Option(..., "--data", help="Dataset folder (ImageFolder train/+test/, torchvision CIFAR) or 'digits'."),
    out: Path = typer.Option(..., "--out", help="Checkpoint file to write, e.g. teacher.pt."),
    preset: str = PRESET, overrides: Optional[List[str]] = SET, epochs: Optional[int] = EPOCHS, batch_size: Optional[int] = BATCH,
    lr: Optional[float] = LR, seed: Optional[int] = SEED, train_subset: Optional[int] = SUBSET, device: str = DEVICE,
    overwrite: bool = OVERWRITE, resume: bool = RESUME, strict_data: bool = STRICT_DATA,
    compile_: bool = COMPILE, channels_last: Optional[bool] = CHANNELS_LAST, precision: str = PRECISION,
    cuda_graphs: Optional[bool] = CUDA_GRAPHS,
    workers: Optional[int] = WORKERS, nproc: int = NPROC, nnodes: Optional[str] = NNODES, node_rank: Optional[int] = NODE_RANK,
    master_addr: Optional[str] = MASTER_ADDR, master_port: Optional[int] = MASTER_PORT,
    tensorboard: Optional[Path] = TENSORBOARD,
) -> None:
    """Train a model from scratch with the preset's recipe (e.g. a teacher)."""
    from compressor import pipeline
    from compressor.models.registry import parse_arch
    from compressor.report.tables import plural

    parse_arch(arch)
    pipeline.check_train_output(out, overwrite, resume)
    cfg = config_from(preset, overrides, train__epochs=epochs, train__batch_size=batch_size, train__lr=lr, train__seed=seed,
                      data__train_subset=train_subset)
    speed = speed_from(precision, channels_last, compile_, workers, cuda_graphs)
    rank, device = join_parallel(device, nproc, nnodes, node_rank, master_addr, master_port)
    reporter = RichReporter(quiet=not rank.is_main)
    _, spec, metrics = pipeline.train(arch, data, cfg, out, device=device, overwrite=overwrite, resume=resume,
                                      strict_data=strict_data, reporter=reporter, speed=speed, tensorboard=tensorboard)
    if rank.is_main:
        stderr.print(f"saved {out}: {spec.name}, test top-1 {metrics['top1']:.2f}% after {plural(cfg.train.epochs, 'epoch')}")
