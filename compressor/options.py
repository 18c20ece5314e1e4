"""How a run runs, as one object: the options that every command shares and that travel from the
CLI through the pipeline to the steps (what is computed is the preset's ``Config``; which students
are trained is a ``derive.candidates.StudentChoice``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compressor.device import Speed
from compressor.errors import ConfigError


@dataclass(frozen=True)
class RunOptions:
    """``device``: auto (CUDA when present), cpu or cuda; ``speed``: precision, memory format,
    compilation, CUDA graphs and DataLoader workers; ``threads``: CPU threads for latency;
    ``int8``: also quantize each student; ``tensorboard``: a folder for per-epoch scalars;
    ``resume``/``overwrite``: what to do with an output that exists; ``strict_data``: stop at the
    first unreadable image; ``arch``/``trust``: how to read the teacher checkpoint (the
    architecture of a plain state_dict; allow pickles that run code); ``mean``/``std``: the
    teacher's normalisation as the user states it (``--mean``/``--std``; it comes before the
    checkpoint's and the preset's); ``command``: the command line, recorded in the report; ``pick``:
    the rule that chooses the published student (``compressor.report.pick``: auto, accurate, fastest
    or a speed-up such as 3x); ``keep_state``: keep each finished student's training state
    (``train_state.pt``), which is otherwise removed."""

    device: str = "auto"
    speed: Speed = field(default_factory=Speed)
    threads: int | None = None
    int8: bool = False
    tensorboard: str | Path | None = None
    resume: bool = False
    overwrite: bool = False
    strict_data: bool = False
    arch: str | None = None
    trust: bool = False
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    command: str = ""
    pick: str = "auto"
    keep_state: bool = False

    def __post_init__(self):
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite starts it again from nothing; pass one of them")
