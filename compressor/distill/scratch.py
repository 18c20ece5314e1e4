"""Train a model from scratch with the preset's recipe (``atc train``, the demo's teacher): the same
loop as distillation, without a teacher; the checkpoint records the data's classes, input size and
normalisation, so the model can teach on that data later."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor import distributed
from compressor.config import Config
from compressor.data.open import Dataset
from compressor.device import Speed, example_input, pick_device
from compressor.distill.loop import FitOptions, fit, say_schedule
from compressor.distill.tensorboard import epoch_logger
from compressor.events import SILENT, Reporter, RunClock, calls_each
from compressor.fileio import kept_only_if_used, state_dir_for
from compressor.load import Normalization, choose_normalization
from compressor.models.checkpoint import save_checkpoint
from compressor.models.outputs import ensure_logits
from compressor.models.spec import ModelSpec


def train_model(arch: str, data: Dataset, cfg: Config, out_path: str | Path, device: torch.device | None = None,
                reporter: Reporter = SILENT, resume: bool = False, speed: Speed | None = None,
                tensorboard: str | Path | None = None, norm: Normalization | None = None) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Train ``arch`` from scratch on ``data`` with the preset recipe; save an atc checkpoint (rank 0 of a
    data-parallel run alone writes it). ``tensorboard``: a folder for per-epoch scalars; ``norm``: the
    normalisation to train with and store (default: the preset's, else the training images' statistics).
    After the first epoch the run says how long the rest will take."""
    out_path = Path(out_path)
    norm = norm or choose_normalization(cfg, data, teacher=False)
    mean, std = norm.mean, norm.std
    spec = replace(ModelSpec.for_arch(arch, data.num_classes), class_names=list(data.class_names),
                   input_size=tuple(data.input_size), mean=mean, std=std)
    torch.manual_seed(cfg.train.seed)
    model = spec.build()
    if note := ensure_logits(model, example_input(model, spec.input_size, batch=2), spec.name):
        reporter.info(note)
    say_schedule(cfg, reporter)
    clock = RunClock(cfg.train.epochs, reporter)
    options = FitOptions(resume, spec.name, speed, calls_each(epoch_logger(tensorboard, spec.name), clock.epoch_done),
                         run={"student": spec.name})
    clock.start()
    with kept_only_if_used(state_dir_for(out_path)) as state_dir:
        result = fit(model, data, cfg, state_dir, mean, std, device=device or pick_device(), reporter=reporter, options=options)
    metrics = {"top1": result.final["test_top1"], "history": result.history, "train_seconds": result.seconds,
               "data": data.name, "preset": cfg.preset, "epochs": cfg.train.epochs,
               "cuda_graphs": result.cuda_graphs.to_dict()}
    if result.compile_seconds:
        metrics["compile_seconds"] = result.compile_seconds
    if distributed.is_main():
        save_checkpoint(out_path, model.cpu(), spec, metrics)
    return model.cpu(), spec, metrics
