"""Acceptance of FitNet and DKD at the command line: `atc compress --method fitnet|dkd|at+dkd` end to end
on the digits and on the CIFAR-10 copy, the exported student exactly the student (no regressor), and a
killed FitNet run resumed bit-identical. All slow: each runs real compress commands (training, export,
latency)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import onnx
import pytest
import torch

from compressor.distill.state import STATE_FILE
from compressor.export.onnx import export_checked
from compressor.models.checkpoint import load_model
from tests.helpers import ROOT, SHARED_CIFAR, hooked_env, late_epochs_hook, make_image_folder, run_atc

pytestmark = pytest.mark.slow

TERMS = {"fitnet": {"ce", "hint", "loss"}, "dkd": {"ce", "tckd", "nckd", "loss"}, "at+dkd": {"ce", "tckd", "nckd", "at", "loss"}}


def _initializers(path: Path) -> dict[str, tuple[int, ...]]:
    return {i.name: tuple(i.dims) for i in onnx.load(str(path)).graph.initializer}


def _check_run(out: Path, method: str, tmp_path: Path) -> None:
    report = json.loads((out / "report.json").read_text())
    s = report["students"][0]
    assert s["method"] == method and set(s["loss_terms"]) == TERMS[method]
    model, spec, metrics = load_model(out / "student.pt")
    fresh = spec.build()
    # the checkpoint and the report hold exactly the student's parameters: no regressor
    assert list(model.state_dict()) == list(fresh.state_dict())
    assert s["params"] == sum(p.numel() for p in fresh.parameters())
    # the ONNX file has the initializers a plain export of the checkpoint's student has, no more
    export_checked(model.eval(), spec, tmp_path / f"plain-{method.replace('+', '_')}.onnx")
    assert _initializers(out / "student.onnx") == _initializers(tmp_path / f"plain-{method.replace('+', '_')}.onnx")
    if method == "fitnet":
        assert "1×1 conv" in s["hint"] and "hint pair" in (out / "report.md").read_text()
        assert "regressor" in torch.load(next(out.glob(f"students/*/{STATE_FILE}")), weights_only=True)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {f"train_{t}" for t in TERMS[method]} <= set(first)


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("digits") / "teacher.pt"
    r = run_atc("train", "--arch", "wrn-10-2", "--data", "digits", "--preset", "demo", "--epochs", "1", "--out", str(path))
    assert r.returncode == 0, r.stderr
    return path


@pytest.mark.parametrize("method", ["fitnet", "dkd", "at+dkd"])
def test_compress_on_the_digits(method, digits_teacher, tmp_path):
    out = tmp_path / "out"
    r = run_atc("compress", "--teacher", str(digits_teacher), "--data", "digits", "--preset", "demo", "--epochs", "1",
                "--method", method, "--student", "wrn-10-1", "--train-subset", "256", "--out", str(out), "--keep-state")
    assert r.returncode == 0, r.stderr
    _check_run(out, method, tmp_path)


def _cifar_subset(dest, per_class: dict[str, int]):
    """The first ``per_class[split]`` images of every class of the shared CIFAR-10 copy, under ``dest``."""
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(SHARED_CIFAR) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or parts[-3] not in per_class:
                continue
            key = (parts[-3], parts[-2])
            if taken.get(key, 0) < per_class[parts[-3]]:
                taken[key] = taken.get(key, 0) + 1
                tar.extract(member, dest, filter="data")
    return next(p.parent for p in dest.rglob("train") if p.is_dir())


@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason=f"the CIFAR-10 copy is not at {SHARED_CIFAR}")
def test_compress_on_the_cifar10_copy(tmp_path):
    # real CIFAR-10 images, 40 a class to train on and 10 to test: the whole copy took 15 minutes here
    data = _cifar_subset(tmp_path / "data", {"train": 40, "test": 10})
    teacher = tmp_path / "teacher.pt"
    r = run_atc("train", "--arch", "wrn-16-2", "--data", str(data), "--preset", "cifar", "--epochs", "1",
                "--out", str(teacher))
    assert r.returncode == 0, r.stderr
    for method in ("fitnet", "dkd", "at+dkd"):
        out = tmp_path / method.replace("+", "_")
        r = run_atc("compress", "--teacher", str(teacher), "--data", str(data), "--preset", "cifar", "--epochs", "1",
                    "--method", method, "--student", "wrn-16-1", "--out", str(out), "--keep-state")
        assert r.returncode == 0, r.stderr
        _check_run(out, method, tmp_path)


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_a_killed_fitnet_compress_resumes_bit_identical(tmp_path, tiny_teacher):
    data = make_image_folder(tmp_path / "data")
    tiny_teacher("wrn-10-2", 3, 16, path=tmp_path / "teacher.pt")
    args = ["compress", "--teacher", str(tmp_path / "teacher.pt"), "--data", str(data), "--preset", "demo", "--epochs", "4",
            "--batch-size", "2", "--seed", "3", "--method", "fitnet", "--student", "wrn-10-1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}  # one thread count for every run: the same sums

    def atc(*more: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli", *args, *more], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)

    r = atc("--out", str(tmp_path / "ref"))
    assert r.returncode == 0, r.stderr

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args, "--out", str(out)], cwd=ROOT,
                            env=hooked_env(tmp_path / "hook", late_epochs_hook(3600), env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 300
    while not list(out.glob(f"students/*/{STATE_FILE}")):  # epoch 1 saved: kill during epoch 2
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()[1] if proc.poll() is not None else "timeout"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (out / "report.json").exists()
    saved = torch.load(next(out.glob(f"students/*/{STATE_FILE}")), weights_only=True)
    assert saved["regressor"] is not None and saved["epoch"] == 1

    r = atc("--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming wrn-10-1 (fitnet) at epoch" in r.stderr
    a, b = torch.load(tmp_path / "ref" / "student.pt", weights_only=True), torch.load(out / "student.pt", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    timing = {"images_per_s"}
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k not in timing} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(tmp_path / "ref" / "metrics.jsonl") == strip(out / "metrics.jsonl")


def test_fitnet_under_two_data_parallel_processes(tmp_path, tiny_teacher):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=12, size=16)
    teacher = tiny_teacher("wrn-10-2", 3, 16, path=tmp_path / "teacher.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    base = [sys.executable, "-m", "cli", "compress", "--teacher", str(teacher), "--data", str(data), "--preset", "demo",
            "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--threads", "1", "--nproc", "2", "--method", "fitnet",
            "--student", "wrn-10-1"]
    r = subprocess.run([*base, "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["train_hint"] > 0 and record["train_ce"] > 0
    stage1 = subprocess.run([*base, "--out", str(tmp_path / "s1"), "--set", "distill.fitnet_stage1_epochs=1", "--epochs", "2"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert stage1.returncode != 0 and "fitnet_stage1_epochs needs a single process" in stage1.stderr
