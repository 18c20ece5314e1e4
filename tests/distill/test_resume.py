"""Crash-safe resume: a killed run, resumed, ends with exactly the weights and metrics of an uninterrupted one.

The CLI tests run real ``python -m cli train`` processes and kill them with SIGKILL (the state
saved after the last finished epoch is all that survives) or SIGTERM (the state is saved at the
next step boundary). Timing fields of metrics.jsonl (``images_per_s``) and the checkpoint's
``train_seconds`` differ between runs by nature; every other field is compared exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compressor.config import load_config
from compressor.data.open import open_dataset
from compressor.distill.failures import StopRequested
from compressor.distill.loop import FitOptions, fit
from compressor.distill.state import STATE_FILE
from compressor.errors import ConfigError
from compressor.events import SILENT, Reporter
from compressor.models import create_model
from tests.helpers import ROOT, hooked_env, late_epochs_hook, make_image_folder

TIMING = {"images_per_s", "train_seconds", "seconds"}
EPOCHS = 4
TRAIN = ["train", "--arch", "wrn-10-1", "--preset", "demo", "--epochs", str(EPOCHS), "--batch-size", "2", "--seed", "3"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _start(*args: str, late: float, hook: Path) -> subprocess.Popen:
    """A run whose epochs after the first end ``late`` seconds late, so that the signal sent once epoch 1's
    state is saved always finds it still running."""
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, env=hooked_env(hook, late_epochs_hook(late), _env()),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _atc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll (no sleep-based assertion) until ``path`` exists; fail if the run ends first."""
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared: {proc.communicate()[1]}"
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.005)


def _metrics(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


def _assert_same_run(a: Path, b: Path) -> None:
    """Two `atc train` outputs are the same run: weights bit for bit, metrics and recorded history."""
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for key, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][key]), key
    assert ca["metrics"]["top1"] == cb["metrics"]["top1"]
    strip = lambda hist: [{k: v for k, v in r.items() if k not in TIMING} for r in hist]  # noqa: E731
    assert strip(ca["metrics"]["history"]) == strip(cb["metrics"]["history"])
    ma, mb = _metrics(Path(f"{a}.state") / "metrics.jsonl"), _metrics(Path(f"{b}.state") / "metrics.jsonl")
    assert len(ma) == EPOCHS and ma == mb


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("resume") / "tiny")


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "t.pt"
    r = _atc(*TRAIN, "--data", str(tiny), "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_sigkill_then_resume_ends_exactly_like_an_uninterrupted_run(tiny, reference, tmp_path):
    out = tmp_path / "t.pt"
    state = tmp_path / "t.pt.state" / STATE_FILE
    proc = _start(*TRAIN, "--data", str(tiny), "--out", str(out), late=3600, hook=tmp_path / "hook")
    _wait_for(state, proc)  # epoch 1 is done; epoch 2 is under way
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # really interrupted before the end
    saved = torch.load(state, weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 0)  # SIGKILL: only epoch-end states survive

    r = _atc(*TRAIN, "--data", str(tiny), "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resuming wrn-10-1 at epoch {saved['epoch'] + 1}, step 0" in r.stderr
    _assert_same_run(reference, out)


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_sigterm_saves_at_a_step_boundary_and_resume_ends_the_same(tiny, reference, tmp_path):
    out = tmp_path / "t.pt"
    state = tmp_path / "t.pt.state" / STATE_FILE
    proc = _start(*TRAIN, "--data", str(tiny), "--out", str(out), late=3, hook=tmp_path / "hook")
    _wait_for(state, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM ") and last.endswith("run the same command with --resume to continue")
    assert "Traceback" not in err and not out.exists()
    saved = torch.load(state, weights_only=True)
    if saved["step"] > 0:  # the usual case: the signal landed within an epoch
        assert f"at epoch {saved['epoch'] + 1};" in last and saved["stats"]["steps"] == saved["step"]
    else:  # it landed during an evaluation: the run stopped at the epoch boundary
        assert f"after epoch {saved['epoch']};" in last

    r = _atc(*TRAIN, "--data", str(tiny), "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resuming wrn-10-1 at epoch {saved['epoch'] + 1}, step {saved['step']}" in r.stderr
    _assert_same_run(reference, out)


# --- the library, in-process: a deterministic mid-epoch stop ------------------------------------


class _SignalAt(Reporter):
    """Sends SIGTERM to this process after ``step`` steps of epoch ``epoch`` (1-based)."""

    def __init__(self, epoch: int, step: int):
        self.epoch, self.step, self.current, self.done_steps = epoch, step, 0, 0

    def task(self, description: str, total: int) -> None:
        self.current, self.done_steps = self.current + 1, 0

    def advance(self, steps: int = 1, **fields: float) -> None:
        self.done_steps += steps
        if (self.current, self.done_steps) == (self.epoch, self.step):
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return open_dataset(make_image_folder(tmp_path_factory.mktemp("lib") / "d", per_class=8), image_size=16)


def _fit(data, cfg, out: Path, reporter=SILENT, **kw):
    torch.manual_seed(0)
    model = create_model("wrn-10-1", data.num_classes)
    mean, std = data.channel_stats()
    return model, fit(model, data, cfg, out, mean, std, device=torch.device("cpu"), reporter=reporter, options=FitOptions(**kw))


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_mid_epoch_stop_and_resume_is_bit_exact(small_data, tmp_path):
    cfg = load_config("demo", {"train": {"epochs": 3, "batch_size": 4, "seed": 5}})
    ref_model, ref = _fit(small_data, cfg, tmp_path / "ref")

    with pytest.raises(StopRequested, match="stopped by SIGTERM at epoch 2; the training state is saved in"):
        _fit(small_data, cfg, tmp_path / "run", reporter=_SignalAt(epoch=2, step=3))
    saved = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 3)  # 0-based epoch 1 = the second, three steps into it

    model, res = _fit(small_data, cfg, tmp_path / "run", resume=True)
    for key, value in ref_model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    strip = lambda hist: [{k: v for k, v in r.items() if k not in TIMING} for r in hist]  # noqa: E731
    assert strip(res.history) == strip(ref.history) and len(res.history) == 3


def test_resume_refuses_a_changed_recipe(small_data, tmp_path):
    cfg = load_config("demo", {"train": {"epochs": 1, "batch_size": 4}})
    _fit(small_data, cfg, tmp_path)
    changed = load_config("demo", {"train": {"epochs": 1, "batch_size": 8}})
    with pytest.raises(ConfigError, match=r"was made with train.batch_size=4 \(now 8\); resume with the same options"):
        _fit(small_data, changed, tmp_path, resume=True)


def test_fresh_start_drops_an_earlier_runs_metrics(small_data, tmp_path):
    cfg = load_config("demo", {"train": {"epochs": 2, "batch_size": 4}})
    _fit(small_data, cfg, tmp_path)
    _fit(small_data, cfg, tmp_path)  # --overwrite: a new run in the same place
    assert [r["epoch"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())] == [1, 2]


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_sigkill_then_resume_of_atc_compress(tiny, tmp_path, tiny_teacher):
    """`atc compress` killed while distilling, then `--resume`: the same student as an uninterrupted run."""
    tiny_teacher("wrn-10-1", 3, 16, path=tmp_path / "teacher.pt", mean=0.2, std=0.25)
    args = ["compress", "--teacher", str(tmp_path / "teacher.pt"), "--data", str(tiny), "--preset", "demo",
            "--epochs", str(EPOCHS), "--batch-size", "2", "--seed", "3"]
    r = _atc(*args, "--out", str(tmp_path / "ref"))
    assert r.returncode == 0, r.stderr

    out = tmp_path / "run"
    proc = _start(*args, "--out", str(out), late=3600, hook=tmp_path / "hook")
    end = time.monotonic() + 300
    while not list(out.glob(f"students/*/{STATE_FILE}")):
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()[1] if proc.poll() is not None else "timeout"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (out / "report.json").exists()

    r = _atc(*args, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming wrn-10-0.5 (at+kd) at epoch" in r.stderr
    a, b = torch.load(tmp_path / "ref" / "student.pt", weights_only=True), torch.load(out / "student.pt", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert _metrics(tmp_path / "ref" / "metrics.jsonl") == _metrics(out / "metrics.jsonl")
