"""Data-parallel distillation: two processes on the CPU with gloo, as torchrun starts them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from compressor.distributed import launch_command, strip_launch_flags
from tests.helpers import ROOT, make_image_folder


def _env(tmp_path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "ATC_CACHE_DIR": str(tmp_path / "cache")}


@pytest.mark.slow
def test_two_gloo_ranks_end_with_identical_students(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=12, size=16)  # 36 train, 12 test images
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(ROOT / "tests" / "distill" / "ddp_worker.py"), str(data), str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["initial"] == r1["initial"] and r0["hash"] != r0["initial"]  # both started alike and trained
    assert r0["hash"] == r1["hash"]  # parameters and BN buffers identical on both ranks
    assert r0["pairs"] == 3  # AT on all three groups, with KD
    # global batch 8 = 4 per rank over each rank's half (18 images): 4 steps per epoch, 2 epochs;
    # without sharding it would be 9 steps per epoch
    assert r0["steps"] == 8
    # the sharded evaluation, summed over ranks, equals one process evaluating the whole test set
    assert r0["final"]["test_top1"] == r1["final"]["test_top1"] == r0["unsharded"]["top1"]
    assert r0["final"]["test_loss"] == pytest.approx(r0["unsharded"]["loss"], rel=1e-5)
    # rank 0 alone wrote the metrics (two epochs, not four lines) and the state
    assert len((out / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (out / "run").iterdir()) == ["metrics.jsonl", "train_state.pt"]


@pytest.mark.slow
def test_atc_compress_nproc_2_writes_one_report(tmp_path, tiny_teacher):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=12, size=16)
    # untrained: what is checked does not need a good teacher
    teacher = tiny_teacher("wrn-10-1", 3, 16, path=tmp_path / "teacher.pt", mean=0.2, std=0.2)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "cli", "compress", "--teacher", str(teacher), "--data", str(data), "--preset", "demo",
                        "--epochs", "1", "--batch-size", "8", "--out", str(out), "--device", "cpu", "--threads", "1",
                        "--nproc", "2", "--json"], capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)  # rank 0 alone printed: a second report would make this invalid JSON
    assert report == json.loads((out / "report.json").read_text())
    assert "--nproc 2" in report["command"]  # the command as typed, not the relaunched one
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert r.stderr.count("teacher wrn-10-1: test top-1") == 1 and r.stderr.count("wrote ") == 1


def test_launch_command_passes_multi_node_flags_to_torchrun():
    argv = ["compress", "--teacher", "t.pt", "--nproc", "4", "--nnodes=2", "--node-rank", "1", "--master-addr", "10.0.0.1",
            "--master-port", "29500", "--data", "d"]
    assert strip_launch_flags(argv) == ["compress", "--teacher", "t.pt", "--data", "d"]
    cmd = launch_command(argv, 4, nnodes="2", node_rank=1, master_addr="10.0.0.1", master_port=29500)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "4", "--nnodes", "2", "--node-rank", "1",
                       "--master-addr", "10.0.0.1", "--master-port", "29500", "-m", "cli", "compress", "--teacher", "t.pt",
                       "--data", "d"]
    single = launch_command(["train", "--nproc", "2"], 2)
    assert "--standalone" in single and single[-2:] == ["cli", "train"]


@pytest.mark.slow
def test_a_failing_nproc_run_exits_2_with_the_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cli", "train", "--arch", "wrn-10-1", "--data", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "t.pt"), "--device", "cpu", "--nproc", "2"],
                       capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path), timeout=300)
    assert r.returncode == 2
    assert "error: data folder" in r.stderr and "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr
