"""atc: compress a trained CNN teacher into a smaller student with attention transfer.

The public API, enough for a five-line script:

    from compressor import StudentChoice, compress, load_config
    report = compress("teacher.pt", "cifar10/", load_config("cifar"), "runs/x", StudentChoice(names=["wrn-16-1"]))
    print(report.students[0].top1)

and the method itself: ``attention_map``, ``at_loss``, ``kd_loss``, and its rivals' ``hint_loss`` (FitNet) and
``dkd_loss``. Names are imported on first
use, so ``import compressor`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_API = {
    "AtcError": "compressor.errors",
    "Config": "compressor.config",
    "load_config": "compressor.config",
    "compress": "compressor.pipeline",
    "train": "compressor.pipeline",
    "dry_run": "compressor.dryrun",
    "load_model": "compressor.models.checkpoint",
    "create_model": "compressor.models.registry",
    "list_models": "compressor.models.registry",
    "describe_models": "compressor.models.registry",
    "StudentChoice": "compressor.derive.candidates",
    "RunOptions": "compressor.options",
    "Report": "compressor.report.build",
    "attention_map": "compressor.distill.losses",
    "at_loss": "compressor.distill.losses",
    "kd_loss": "compressor.distill.losses",
    "hint_loss": "compressor.distill.losses",
    "dkd_loss": "compressor.distill.losses",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
