"""One model's profile: parameters, fvcore GMACs (and GFLOPs = 2 x GMACs) and latency on each
runtime and batch size asked for — the data behind ``atc profile``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from torch import nn

from compressor.profiling.counts import MAC_UNIT, count_macs, count_params
from compressor.profiling.latency import Latency, Timing, environment, measure_latency


@dataclass
class Profile:
    model: str
    input_size: list[int]
    params: dict[str, int]
    gmacs: float
    gflops: float
    skipped_ops: dict[str, int]
    latency: list[Latency]
    mac_unit: str = MAC_UNIT
    environment: dict[str, Any] = field(default_factory=environment)
    by_module_gmacs: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.by_module_gmacs is None:
            del d["by_module_gmacs"]
        return d


def profile_model(model: nn.Module, name: str, input_size: tuple[int, int, int], runtimes: Sequence[str] = ("ort-cpu", "torch-cpu"),
                  batch_sizes: Sequence[int] = (1,), threads: int | None = None, min_time_s: float = 1.0,
                  module_depth: int | None = None) -> Profile:
    """Count and time ``model``; ``module_depth`` also keeps GMACs per module down to that depth."""
    macs = count_macs(model, input_size)
    lat = [measure_latency(model, input_size, rt, bs, threads, Timing(min_time_s=min_time_s)) for rt in runtimes for bs in batch_sizes]
    by_module = None if module_depth is None else {k: v for k, v in macs.by_module.items() if k.count(".") < module_depth}
    return Profile(name, list(input_size), count_params(model), macs.gmacs, macs.gflops, macs.skipped_ops, lat,
                   by_module_gmacs=by_module)
