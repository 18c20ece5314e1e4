"""The resumable training state of one run: model (and FitNet's regressor), optimizer, scheduler, fp16
loss scale, RNGs, epoch, step within the epoch, the epoch's running sums, the history, and the run's identity
(recipe and data size), written atomically after every epoch and when a stop signal arrives.
Only the process that writes (rank 0) touches the files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor import fileio
from compressor.config import Config
from compressor.data.images import ImageData
from compressor.errors import CheckpointError, ConfigError
from compressor.events import Reporter

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


def run_identity(cfg: Config, data: ImageData) -> dict[str, Any]:
    """What a resumed run must share with the saved one to repeat it: the recipe and the data's size."""
    ident = {f"{section}.{k}": v for section in ("data", "train", "distill") for k, v in getattr(cfg, section).__dict__.items()}
    ident = {k: list(v) if isinstance(v, tuple) else v for k, v in ident.items()}
    ident["images"] = [len(data.train_y), len(data.test_y)]
    return ident


@dataclass
class Resumed:
    """Where training picks up: the epoch (0-based), the step within it and the epoch's sums so far."""

    epoch: int = 0
    step: int = 0
    stats: dict[str, Any] | None = None


@dataclass
class TrainingState:
    out_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    identity: dict[str, Any]
    writes: bool = True  # rank 0 of a data-parallel run alone writes
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0  # training time of the epochs before a resume, so the total counts them too
    regressor: nn.Module | None = None  # FitNet's hint regressor: trained with the model, saved here only

    @property
    def path(self) -> Path:
        return self.out_dir / STATE_FILE

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_FILE

    def kept(self) -> str:
        """What a failure leaves behind, for its message."""
        if self.path.exists():
            return f"the last good training state is kept in {self.path}; --resume continues from it"
        return "no epoch had finished, so no training state was saved"

    def save(self, epoch: int, step: int, stats: dict[str, Any] | None = None) -> None:
        if not self.writes:
            return
        fileio.torch_save(self.path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "epoch": epoch, "step": step, "history": self.history, "stats": stats,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "run": self.identity, "train_seconds": self.train_seconds,
            "regressor": None if self.regressor is None else self.regressor.state_dict(),
        })

    def epoch_done(self, record: dict[str, float], seconds: float) -> None:
        """The state first: it holds the history, and --resume rebuilds metrics.jsonl from it."""
        self.history.append(record)
        self.train_seconds += seconds
        self.save(record["epoch"], 0)
        if self.writes:
            fileio.append_jsonl(self.metrics_path, record)

    def start(self, resume: bool, reporter: Reporter, tag: str) -> Resumed:
        """Load the saved state on ``resume``; otherwise clear what an earlier run left, so that its
        metrics or state are never mixed with this run's."""
        if resume and self.path.exists():
            return self._load(reporter, tag)
        if resume:
            reporter.info(f"no training state in {self.out_dir}; {tag or 'training'} starts from epoch 1")
        if self.writes:
            for stale in (self.path, self.metrics_path):
                stale.unlink(missing_ok=True)
        return Resumed()

    def _load(self, reporter: Reporter, tag: str) -> Resumed:
        try:
            st = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"the training state {self.path} is unreadable ({type(exc).__name__}); "
                                  "start again without --resume") from exc
        self._check_same_run(st.get("run"))
        self.model.load_state_dict(st["model"])
        if self.regressor is not None:
            if st.get("regressor") is None:
                raise CheckpointError(f"the training state {self.path} holds no FitNet regressor; start again without --resume")
            self.regressor.load_state_dict(st["regressor"])
        load_optimizer_state(self.optimizer, st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])  # the loss scale it had found, not a fresh 65536
        torch.set_rng_state(st["rng"])
        if st.get("cuda_rng") and torch.cuda.is_available() and len(st["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        self.history = list(st["history"])
        self.train_seconds = float(st.get("train_seconds", 0.0))
        reporter.info(f"resuming {tag or 'training'} at epoch {st['epoch'] + 1}, step {st['step']}")
        if self.writes:
            fileio.write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))
        return Resumed(st["epoch"], st["step"], st["stats"])

    def _check_same_run(self, saved: dict[str, Any] | None) -> None:
        if not saved:
            return
        diff = [k for k in self.identity if k in saved and saved[k] != self.identity[k]]
        if diff:
            shown = ", ".join(f"{k}={saved[k]} (now {self.identity[k]})" for k in diff[:3])
            raise ConfigError(f"the training state in {self.out_dir} was made with {shown}; resume with the same options and data, "
                              "or pass --overwrite to start again")


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """``optimizer.load_state_dict``, keeping each group's tensor learning rate: loading replaces the
    groups with the saved ones (whose rates were loaded onto the CPU), and a CPU rate would make the
    fused CUDA kernel read it on the host at every step. The saved value is filled into the device
    tensor the run made, which is the one a captured CUDA graph reads."""
    kept = [g["lr"] for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, lr in zip(optimizer.param_groups, kept):
        if isinstance(lr, torch.Tensor):
            value = group["lr"]
            lr.fill_(float(value) if isinstance(value, torch.Tensor) else value)  # a host number: no copy onto the device
            group["lr"] = lr
