"""timm and torchvision models by name through the whole command line, as a user would run them:
train → compress --width-ratio 0.5 --dry-run → a one-epoch compress → export with parity → profile,
and their checkpoints reload with weights_only=True to the same outputs."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.models.checkpoint import load_model
from tests.helpers import make_image_folder

NAMES = ["tv:mobilenet_v3_small", pytest.param("timm:resnet10t", marks=pytest.mark.skipif(
    not __import__("importlib").util.find_spec("timm"), reason="timm is an optional extra (pip install 'atc[timm]')"))]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("names") / "d", classes=3, per_class=6, size=32)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_model_by_name_goes_through_every_command(atc, data, tmp_path, name):
    teacher = tmp_path / "t.pt"
    common = ["--data", str(data), "--preset", "demo", "--set", "data.image_size=32", "--batch-size", "6", "--lr", "0.01"]
    r = atc("train", "--arch", name, *common, "--epochs", "1", "--out", str(teacher))
    assert r.returncode == 0, r.stderr
    model, spec, _ = load_model(teacher)  # weights_only inside: the checkpoint stores the name, not code
    assert spec.name.endswith(name.split(":")[1]) and spec.num_classes == 3  # the 8 zoo-listed torchvision names show bare
    x = torch.randn(2, 3, 32, 32)
    again, _, _ = load_model(teacher)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again.eval()(x))

    r = atc("compress", "--teacher", str(teacher), *common, "--width-ratio", "0.5", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "AT pair" in r.stderr and "x fewer)" in r.stderr

    out = tmp_path / "run"
    r = atc("compress", "--teacher", str(teacher), *common, "--width-ratio", "0.5", "--epochs", "1", "--threads", "1",
            "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    student = json.loads(r.stdout)["students"][0]
    assert student["param_ratio"] > 1.5 and max(student["onnx_parity_max_rel_diff"].values()) < 1e-4
    assert ":" not in student["checkpoint"]  # folder names avoid characters some file systems refuse

    r = atc("export", str(out / "student.pt"), "--out", str(tmp_path / "s.onnx"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s.onnx").exists() and "max |onnxruntime - torch|" in r.stdout
    r = atc("profile", str(out / "student.pt"), "--runtimes", "ort-cpu", "--min-time", "0", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    prof = json.loads(r.stdout)
    assert prof["params"]["total"] == student["params"] and prof["latency"][0]["median_ms"] > 0


def test_models_lists_families_and_filters_by_pattern(atc):
    r = atc("models", "--json")
    assert r.returncode == 0, r.stderr
    families = {e["family"] for e in json.loads(r.stdout)}
    assert {"wrn", "torchvision"} <= families
    r = atc("models", "mobilenet_v3*", "--json")
    names = " ".join(e["names"] for e in json.loads(r.stdout))
    assert "mobilenet_v3_small" in names and "wrn" not in names
