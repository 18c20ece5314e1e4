"""Shared fixtures: tiny datasets and teacher checkpoints on disk, and a way to run the CLI in-process.
The plain helpers they use are in ``tests/helpers.py``, which tests import directly."""

from __future__ import annotations

import os

# One thread for torch, OpenMP and MKL, in this process and every atc it starts (before torch is
# imported): the tests' models are tiny, and with two threads on a two-core machine that other jobs
# share, each parallel region waits for a descheduled thread — a WRN-10-1 step took 490 ms instead
# of 4 ms here. The figures tests assert do not depend on the thread count.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import make_image_folder, save_teacher  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "tiny")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_teacher(arch="wrn-10-1", classes=3, size=16, *, path=None, mean=0.2, std=0.25, class_names=None,
    seed=0, metrics=None)`` writes an untrained teacher checkpoint and returns its path (a fresh
    temporary file unless ``path`` is given); see ``tests.helpers.save_teacher`` for the rest."""

    def make(arch: str = "wrn-10-1", classes: int = 3, size: int = 16, *, path: Path | None = None, mean: float | None = 0.2,
             std: float | None = 0.25, class_names: Sequence[str] | None = None, seed: int = 0,
             metrics: dict[str, Any] | None = None) -> Path:
        path = path or tmp_path_factory.mktemp("teacher") / "teacher.pt"
        return save_teacher(path, arch, classes, size, mean=mean, std=std, class_names=class_names, seed=seed, metrics=metrics)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for the test: small models run faster and timings are steadier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def atc():
    """The ``atc`` entry point, forked per call from a process that imported torch once (tests/forked_cli.py)."""
    if not hasattr(os, "fork"):
        pytest.skip("the forked CLI runner needs os.fork")
    from tests.forked_cli import ForkedCli

    cli = ForkedCli({**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    yield cli
    cli.close()
