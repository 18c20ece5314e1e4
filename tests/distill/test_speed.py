"""Speed options of the training loop: they change how it computes, not what."""

from __future__ import annotations

import pytest
import torch

from compressor.config import load_config
from compressor.data.open import open_dataset
from compressor.device import Speed, autocast_dtype
from compressor.distill.loop import FitOptions, fit, objective_from
from compressor.distill.runtime import Teacher
from compressor.distill.state import STATE_FILE
from compressor.errors import ConfigError
from compressor.events import Reporter
from compressor.models import create_model
from compressor.pair import find_pairs
from tests.helpers import Messages, make_image_folder

CPU = torch.device("cpu")


def test_precision_choices():
    assert autocast_dtype("auto", CPU) is None and autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16 and autocast_dtype("fp16", CPU) is torch.float16
    with pytest.raises(ConfigError, match="--precision fp8 is unknown"):
        Speed(precision="fp8")
    with pytest.raises(ConfigError, match="--workers"):
        Speed(workers=-1)


def _distil(tmp_path, name: str, speed: Speed | None, reporter: Reporter = Reporter(), batch_size: int = 8):
    data = open_dataset(make_image_folder(tmp_path / "d", classes=3, per_class=8, size=16), image_size=16)
    cfg = load_config("demo", {"train": {"epochs": 1, "batch_size": batch_size}})
    mean, std = data.channel_stats()
    torch.manual_seed(0)
    teacher, student = create_model("wrn-10-1", 3), create_model("wrn-10-0.5", 3)
    pairs = find_pairs(student, teacher, torch.zeros(1, 3, 16, 16), "all")
    result = fit(student, data, cfg, tmp_path / name, mean, std, Teacher(teacher, pairs), objective_from(cfg, "at+kd"), CPU,
                 reporter, FitOptions(speed=speed))
    return student, result


@pytest.mark.slow
def test_compiled_channels_last_run_matches_the_plain_run(tmp_path):
    plain, _ = _distil(tmp_path, "plain", None)
    msgs = Messages()
    # aot_eager traces forward and backward as inductor does, without generating kernels (seconds, not minutes)
    fast, result = _distil(tmp_path, "fast", Speed(channels_last=True, compile=True, compile_backend="aot_eager"), msgs)
    assert result.compile_seconds > 0 and any(m.startswith("compiled the student and teacher in") for m in msgs.lines)
    assert fast.conv0.weight.is_contiguous()  # handed back in the ordinary layout
    a, b = plain.state_dict(), fast.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # the warm-up compile step left weights and BN statistics alone; only rounding differs
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-4, rtol=1e-4), k


def test_fp16_with_loss_scaling_trains(tmp_path):
    torch.manual_seed(0)
    before = create_model("wrn-10-0.5", 3).state_dict()
    # 12 steps: the first few overflow at the initial scale 2^16 and are skipped while the scale halves
    student, result = _distil(tmp_path, "fp16", Speed(precision="fp16"), batch_size=2)
    assert torch.isfinite(torch.tensor(result.final["train_loss"]))
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert not torch.equal(before["fc.weight"], student.state_dict()["fc.weight"])  # later steps were taken
    saved = torch.load(tmp_path / "fp16" / STATE_FILE, weights_only=True)
    assert 0 < saved["scaler"]["scale"] < 2.0 ** 16  # the loss scale it settled on is kept for --resume


def test_cuda_graphs_option_reaches_speed():
    from cli.common import speed_from

    assert speed_from("auto", None, False, None).cuda_graphs is None  # auto: on with CUDA where it applies
    assert speed_from("auto", None, False, None, False).cuda_graphs is False  # --no-cuda-graphs


def _bench(*args: str):
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.slow
def test_throughput_benchmark_runs_every_part_on_the_cpu(tmp_path):
    import json

    r = _bench("benchmarks/throughput.py", "--teacher", "wrn-10-1", "--student", "wrn-10-0.5", "--batch-size", "8", "--steps", "2",
               "--warmup", "1", "--rounds", "1", "--images", "32", "--product-images", "32", "--product-batch-size", "16",
               "--product-epochs", "1", "--workers", "0", "--out", str(tmp_path / "t.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "t.json").read_text())
    assert set(out["images_per_s"]) == {"reference", "atc_before", "atc", "teacher_forward", "student_ce_step"}
    assert all(v > 0 for v in out["images_per_s"].values()) and out["product_images_per_s"] > 0
    cpu = {"state": "off", "captures": 0, "replays": 0, "why": "training on cpu, not on a CUDA device"}
    assert out["batch_size"] == 8 and out["device"] and out["cuda_graphs"] == cpu and out["product"]["cuda_graphs"] == cpu
    assert "CPU: sync-free loop" in r.stdout and r.stdout.strip().splitlines()[-1].startswith("throughput: atc ")


@pytest.mark.slow
def test_speed_parity_benchmark_runs_on_the_cpu(tmp_path):
    import json

    data = make_image_folder(tmp_path / "d", classes=3, per_class=6, size=16)
    r = _bench("benchmarks/speed_parity.py", "--data", str(data), "--preset", "demo", "--teacher-arch", "wrn-10-1", "--student",
               "wrn-10-0.5", "--teacher-epochs", "1", "--epochs", "1", "--seeds", "2", "--batch-size", "6", "--out", str(tmp_path / "p"))
    assert r.returncode in (0, 1), r.stderr[-2000:]  # 1 = outside the seed spread, which two 1-epoch seeds may well be
    out = json.loads((tmp_path / "p" / "parity.json").read_text())
    assert [len(out["runs"][k]) for k in ("plain", "fast")] == [2, 2]
    assert out["stats"]["plain"]["min"] <= out["stats"]["plain"]["mean"] <= out["stats"]["plain"]["max"]
    assert "parity: plain " in r.stdout.strip().splitlines()[-1]
