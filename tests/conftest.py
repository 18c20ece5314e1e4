"""Shared fixtures: tiny datasets on disk and a way to run the CLI in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.events import Reporter

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def _hypothesis_profiles() -> None:
    """Property tests: random examples locally ("dev"), the same examples on every CI run ("ci",
    loaded when the environment variable CI is set; ``--hypothesis-profile`` still picks another)."""
    try:
        from hypothesis import settings
    except ImportError:  # hypothesis is a test extra; tests that need it import it themselves
        return
    settings.register_profile("ci", derandomize=True, print_blob=True)
    settings.register_profile("dev")
    settings.load_profile("ci" if os.environ.get("CI") else "dev")


_hypothesis_profiles()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Decoded-dataset caches go to a temporary folder, never the user's ~/.cache."""
    monkeypatch.setenv("ATC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "atc-cache"))
    torch.manual_seed(0)


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


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "tiny")


class Messages(Reporter):
    """A reporter that keeps the progress notes, for asserting on them."""

    def __init__(self):
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for the test: small models run faster and timings are steadier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_atc(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def atc():
    """The ``atc`` entry point, forked per call from a process that imported torch once (tests/forked_cli.py)."""
    if not hasattr(os, "fork"):
        pytest.skip("the forked CLI runner needs os.fork")
    from tests.forked_cli import ForkedCli

    cli = ForkedCli({**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    yield cli
    cli.close()
