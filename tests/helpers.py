"""Helpers the tests share (not tests themselves): the repository root, tiny datasets and teacher
checkpoints on disk, a reporter that keeps its notes, and ways to run the CLI and check its errors.
Fixtures built on them live in ``tests/conftest.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from compressor.events import Reporter

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def make_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 16, test_name: str = "test", seed: int = 0) -> Path:
    """A learnable ImageFolder: each class is a different colour blob on noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), (test_name, max(2, per_class // 3))):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                img[size // 4: 3 * size // 4, size // 4: 3 * size // 4, c % 3] = 220
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


def save_teacher(path: Path, arch: str = "wrn-10-1", classes: int = 3, size: int = 16, *, mean: float | None = 0.2,
                 std: float | None = 0.25, class_names: Sequence[str] | None = None, seed: int = 0,
                 metrics: dict[str, Any] | None = None) -> Path:
    """An untrained ``arch`` checkpoint for ``classes`` classes of ``size``×``size`` RGB images, its weights
    drawn with ``seed`` (what the tests check does not need a trained teacher). ``mean``/``std``: the
    same value for every channel, or None for a checkpoint without normalisation; ``class_names``:
    default ``class0``… as ``make_image_folder`` names them, ``()`` for none."""
    from compressor.models.checkpoint import save_checkpoint
    from compressor.models.spec import ModelSpec

    names = [f"class{i}" for i in range(classes)] if class_names is None else list(class_names)
    spec = ModelSpec.for_arch(arch, classes, class_names=names, input_size=(3, size, size),
                              mean=None if mean is None else [mean] * 3, std=None if std is None else [std] * 3)
    torch.manual_seed(seed)
    save_checkpoint(path, spec.build(), spec, metrics)
    return path


class Messages(Reporter):
    """A reporter that keeps the progress notes, for asserting on them."""

    def __init__(self):
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


def run_atc(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          env=env, timeout=timeout)


def assert_error(r: subprocess.CompletedProcess, phrase: str, code: int = 2, only_line: bool = True) -> str:
    """The run failed with ``code`` and one ``error: …`` line holding ``phrase``; returns that line.

    ``only_line``: nothing else on stderr. Errors found once loading or training has begun come
    after the progress notes (lines starting with ``›``), so there the error is the last line.
    """
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert lines and lines[-1].startswith("error: "), r.stderr
    assert sum(ln.startswith("error:") for ln in lines) == 1, r.stderr
    if only_line:
        assert len(lines) == 1, r.stderr
    assert phrase in lines[-1], lines[-1]
    return lines[-1]


def hooked_env(folder: Path, code: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose Python processes (a `python -m cli` child and the workers it spawns) first run
    ``code``, as a ``sitecustomize`` found through PYTHONPATH: the tests that kill a run use it to hold the
    run at a known point, so the kill never races a run that finishes first on a fast or a loaded machine."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), str(ROOT), env.get("PYTHONPATH")]))
    return env


def slowed_call_hook(module: str, owner: str, attr: str, seconds: float, when: str) -> str:
    """``hooked_env`` code: ``owner.attr`` (``owner`` imported from ``module``) sleeps ``seconds`` before each
    call for which the expression ``when`` holds; ``when`` sees the call's ``args`` and ``calls``, the number
    of calls this process made before it."""
    return f"""
import time
from {module} import {owner}

_real = {owner}.{attr}
_calls = [0]

def _slowed(*args, **kwargs):
    calls = _calls[0]
    _calls[0] += 1
    if {when}:
        time.sleep({seconds!r})
    return _real(*args, **kwargs)

{owner}.{attr} = _slowed
"""


def late_epochs_hook(seconds: float) -> str:
    """``hooked_env`` code: every epoch after a process's first ends ``seconds`` late (before its state is
    saved), so the state of epoch 1 is on disk for that long while the run is still going."""
    return slowed_call_hook("compressor.distill.state", "TrainingState", "epoch_done", seconds, when="calls > 0")
