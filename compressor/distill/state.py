"""The resumable training state of one run: model (and FitNet's regressor), optimizer, scheduler, fp16
loss scale, RNGs, epoch, step within the epoch, the epoch's running sums, the history, and the run's identity
(recipe and data size), written atomically after every epoch and when a stop signal arrives.
Only the process that writes (rank 0) touches the files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from compressor import fileio
from compressor.config import Config
from compressor.data.open import Dataset
from compressor.errors import CheckpointError, ConfigError, shown
from compressor.events import Reporter

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


def run_identity(cfg: Config, data: Dataset, student: nn.Module | None = None,
                 run: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a resumed run must share with the saved one to repeat it: the recipe; the data (its
    size, classes, input size and a digest of its labels in order: another folder, subset or split
    differs); the student's layer names and shapes (another architecture differs); and what the
    caller adds in ``run`` (the student's name, the teacher's weights digest)."""
    ident = {f"{section}.{k}": v for section in ("data", "train", "distill") for k, v in getattr(cfg, section).__dict__.items()}
    ident = {k: list(v) if isinstance(v, tuple) else v for k, v in ident.items()}
    ident["images"] = [len(data.train_y), len(data.test_y)]
    ident["data.classes"] = list(data.class_names)
    ident["data.input_size"] = list(data.input_size)
    ident["data.labels"] = _digest(f"{len(data.train_y)}:{len(data.test_y)}".encode(),
                                   *(y.detach().cpu().to(torch.int64).numpy().tobytes() for y in (data.train_y, data.test_y)))
    if student is not None:
        ident["student.layers"] = _digest(*(f"{k}:{tuple(v.shape)}".encode() for k, v in student.state_dict().items()))
    ident.update(run or {})
    return ident


def _digest(*parts: bytes) -> str:
    import hashlib

    h = hashlib.sha256()
    for part in parts:
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def check_finished(metrics: Any, where: str | Path) -> dict[str, Any]:
    """The metrics of a finished checkpoint that ``--resume`` reuses instead of training again: a
    top-1 between 0 and 100 and a history, as atc writes them; anything else was not finished by atc."""
    top1 = metrics.get("top1") if isinstance(metrics, dict) else None
    if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not 0 <= top1 <= 100:
        raise CheckpointError(f"{where}: field 'metrics.top1' must be a top-1 in % (0 to 100), got {top1!r}; it was not finished by "
                              "this run, so delete it (or pass --overwrite) and resume again")
    if not isinstance(metrics.get("history", []), list):
        raise CheckpointError(f"{where}: field 'metrics.history' must be a list of epoch records; delete the file and resume again")
    return metrics


START_AGAIN = "pass --overwrite instead of --resume to start this run again (the state is replaced)"


def read_state(path: Path) -> dict[str, Any]:
    """A training state, read safely and checked field by field; a problem names the file and the field."""
    damaged = fileio.damaged_record(path)
    if damaged is not None:
        raise CheckpointError(f"the training state {path} is damaged (its record {damaged} fails the CRC check); {START_AGAIN}")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise CheckpointError(f"the training state {path} is unreadable or truncated ({type(exc).__name__}); {START_AGAIN}") from None
    if not isinstance(st, dict):
        raise CheckpointError(f"the training state {path} holds a {type(st).__name__}, not a training state; {START_AGAIN}")
    for name, ok, want in _STATE_FIELDS:
        if name not in st and name in _OPTIONAL_FIELDS:
            continue
        if name not in st or not ok(st[name]):
            got = "is missing" if name not in st else f"must be {want}, got {type(st[name]).__name__}"
            raise CheckpointError(f"the training state {path}: field {name!r} {got}; {START_AGAIN}")
    return st


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


_STATE_FIELDS = (
    ("model", lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()), "a dict of tensors"),
    ("optimizer", lambda v: isinstance(v, dict) and "state" in v and isinstance(v.get("param_groups"), list), "an optimizer state"),
    ("scheduler", lambda v: isinstance(v, dict), "a scheduler state"),
    ("epoch", _whole, "a whole number"),
    ("step", _whole, "a whole number"),
    ("history", lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of epoch records"),
    ("stats", lambda v: v is None or isinstance(v, dict), "a dict or None"),
    ("rng", lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8, "a CPU RNG state (uint8 tensor)"),
    ("run", lambda v: v is None or isinstance(v, dict), "the run's identity (a dict)"),
    ("train_seconds", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
)
_OPTIONAL_FIELDS = {"run", "train_seconds", "stats"}  # states of older atc versions lack them


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
        st = read_state(self.path)
        self._check_same_run(st.get("run"))
        self._restore(st)
        self.history = list(st["history"])
        self.train_seconds = float(st.get("train_seconds", 0.0))
        reporter.info(f"resuming {tag or 'training'} at epoch {st['epoch'] + 1}, step {st['step']}")
        if self.writes:
            fileio.write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))
        return Resumed(st["epoch"], st["step"], st["stats"])

    def _restore(self, st: dict[str, Any]) -> None:
        """Model, optimizer, scheduler, loss scale and RNGs from a checked state; a part that does
        not fit this run (another architecture, another optimizer layout) is named in one line."""
        loaders = (("model", self.model.load_state_dict), ("optimizer", lambda saved: load_optimizer_state(self.optimizer, saved)),
                   ("scheduler", self.scheduler.load_state_dict))
        for part, load in loaders:
            try:
                load(st[part])
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
                first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"the training state {self.path}: its {part} does not fit this run ({first}); resume with the "
                                      "same --arch and options, or pass --overwrite to start again") from None
        if self.regressor is not None:
            if st.get("regressor") is None:
                raise CheckpointError(f"the training state {self.path} holds no FitNet regressor; {START_AGAIN}")
            self.regressor.load_state_dict(st["regressor"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])  # the loss scale it had found, not a fresh 65536
        torch.set_rng_state(st["rng"])
        if st.get("cuda_rng") and torch.cuda.is_available() and len(st["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(st["cuda_rng"])

    def _check_same_run(self, saved: dict[str, Any] | None) -> None:
        """Refuse a state of another run: every identity field both runs know must agree (a state
        of an older atc lacks the newer fields, which are then not compared)."""
        if not saved:
            return
        diff = [k for k in self.identity if k in saved and saved[k] != self.identity[k]]
        diff.sort(key=lambda k: k in _DIGESTS)  # the readable differences first
        if diff:
            listed = ", ".join(f"{k}={_brief(saved[k])} (now {_brief(self.identity[k])})" for k in diff[:3])
            raise ConfigError(f"the training state in {self.out_dir} was made with {listed}; resume with the same options and data, "
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
_DIGESTS = ("data.labels", "student.layers")


def _brief(value: Any) -> str:
    """An identity value for a message: long lists and digests shortened, user text escaped."""
    if isinstance(value, list) and len(value) > 4:
        value = [*value[:3], f"… {len(value)} in all"]
    text = value if isinstance(value, str) else repr(value)
    return shown(text if len(text) <= 40 else text[:37] + "...")
