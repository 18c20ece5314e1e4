"""Whether a dataset is kept on the training device or streamed from disk: the memory-budget decision.

The decision compares the bytes a dataset takes as uint8 tensors (train + test, N×3×H×W) with a
budget: ``DEFAULT_FRACTION`` of the free memory of the CUDA device, or of the available RAM when
training on the CPU (a folder that fits is decoded into RAM first, so on CUDA it must fit both).
The environment variable ``ATC_DATA_BUDGET_MB`` replaces the budget, e.g. to force streaming.
``compressor.data.open.open_for_device`` makes the decision and reports it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from compressor.errors import DataError

DEFAULT_FRACTION = 0.5

BUDGET_ENV = "ATC_DATA_BUDGET_MB"

_MB = 1 << 20


def available_ram() -> int:
    """Bytes of RAM the kernel says can be allocated without swapping (MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def memory_budget(device: torch.device, fraction: float = DEFAULT_FRACTION, decode_in_ram: bool = False) -> tuple[int, str]:
    """The bytes a dataset may take on ``device`` and what they are a share of.

    On CUDA: ``fraction`` of its free memory (and, when the data must first be decoded into RAM,
    no more than ``fraction`` of the available RAM). On the CPU: ``fraction`` of the available RAM.
    """
    env = os.environ.get(BUDGET_ENV)
    if env:
        try:
            mb = float(env)
        except ValueError:
            mb = float("nan")
        if not (math.isfinite(mb) and mb >= 0):  # inf would overflow int(), nan compares false, negative means nothing
            raise DataError(f"{BUDGET_ENV}={env!r} is not a number of megabytes (finite, 0 or more); set it to e.g. 2048 "
                            "or unset it") from None
        return int(mb * _MB), f"{BUDGET_ENV}={env}"
    pct = f"{100 * fraction:.0f}%"
    ram = int(available_ram() * fraction)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        gpu = int(free * fraction)
        if decode_in_ram and ram < gpu:
            return ram, f"{pct} of available RAM, which the images are decoded into first"
        return gpu, f"{pct} of free memory on {device}"
    return ram, f"{pct} of available RAM"


@dataclass(frozen=True)
class Residency:
    """Whether a dataset is kept on the training device, and the numbers behind the answer."""

    fits: bool
    need_bytes: int
    budget_bytes: int
    budget_of: str
    images: int
    device: str

    def message(self, workers: int) -> str:
        need, budget = self.need_bytes / _MB, self.budget_bytes / _MB
        head = f"data: {self.images:,} images take {need:,.2f} MB as uint8; budget {budget:,.2f} MB ({self.budget_of})"
        if self.fits:
            return f"{head}: kept on {self.device}, cropped, flipped and normalised there per batch"
        return (f"{head}: too large to keep on {self.device}, streaming with a DataLoader ({workers} worker"
                f"{'s' if workers != 1 else ''}{', pinned memory' if self.device.startswith('cuda') else ''})")


def decide(need_bytes: int, images: int, device: torch.device, budget_bytes: int | None = None,
           fraction: float = DEFAULT_FRACTION, decode_in_ram: bool = False) -> Residency:
    """Compare ``need_bytes`` with ``budget_bytes`` (default: ``memory_budget(device, fraction)``)."""
    if budget_bytes is None:
        budget_bytes, of = memory_budget(device, fraction, decode_in_ram)
    else:
        of = "given budget"
    return Residency(need_bytes <= budget_bytes, int(need_bytes), int(budget_bytes), of, int(images), str(device))


def default_workers() -> int:
    """DataLoader workers per process: the CPU cores shared by the local ranks, one left for the main process, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cores // local - 1))
