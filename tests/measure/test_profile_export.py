"""Profiling figures, ONNX export with metadata and parity, and INT8 (report views: tests/report)."""

import json

import pytest
import torch

from compressor.export.onnx import check_parity, export_checked, read_metadata
from compressor.models.spec import ModelSpec
from tests.helpers import run_atc


@pytest.mark.slow
def test_profile_json_resnet18():
    r = run_atc("profile", "resnet18", "--input-size", "3x224x224", "--min-time", "0.05", "--runtimes", "ort-cpu,torch-cpu",
                "--batch-sizes", "1,2", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["params"]["total"] == 11_689_512
    assert out["gmacs"] == pytest.approx(1.819, rel=5e-3) and out["gflops"] == pytest.approx(2 * out["gmacs"])
    assert {(l["runtime"], l["batch_size"]) for l in out["latency"]} == {("ort-cpu", 1), ("ort-cpu", 2), ("torch-cpu", 1), ("torch-cpu", 2)}
    for l in out["latency"]:
        assert 0 < l["median_ms"] <= l["p90_ms"] <= l["p99_ms"] and l["threads"] == 1 and l["runs"] >= 20 and l["cv"] >= 0
    assert next(l for l in out["latency"] if l["runtime"] == "ort-cpu")["providers"] == ["CPUExecutionProvider"]
    assert "aten::max_pool2d" in out["skipped_ops"]
    assert out["environment"]["torch"] == torch.__version__


@pytest.mark.slow
@pytest.mark.parametrize("name,classes,size", [("wrn-16-1", 10, 32), ("resnet18", 10, 64)])
def test_export_parity_and_metadata(tmp_path, name, classes, size):
    spec = ModelSpec.for_arch(name, classes, class_names=[f"c{i}" for i in range(classes)], input_size=(3, size, size),
                              mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.4])
    model = spec.build().eval()
    parity = export_checked(model, spec, tmp_path / "m.onnx")
    assert set(parity.max_abs_diff) == {1, 8} and parity.worst <= 1e-4
    meta = read_metadata(tmp_path / "m.onnx")
    assert json.loads(meta["atc.class_names"]) == spec.class_names
    assert json.loads(meta["atc.mean"]) == spec.mean and json.loads(meta["atc.input_size"]) == [3, size, size]
    assert check_parity(model, tmp_path / "m.onnx", spec.input_size, batch_sizes=(5,)).worst <= 1e-4  # dynamic batch


@pytest.mark.slow
def test_export_cli_zero_tolerance_fails_and_leaves_nothing(tmp_path, tiny_teacher):
    tiny_teacher("wrn-10-1", 10, 16, path=tmp_path / "s.pt", mean=0.5, std=0.25, class_names=())
    ok = run_atc("export", str(tmp_path / "s.pt"), "--out", str(tmp_path / "ok.onnx"))
    assert ok.returncode == 0 and (tmp_path / "ok.onnx").exists(), ok.stderr
    bad = run_atc("export", str(tmp_path / "s.pt"), "--out", str(tmp_path / "bad.onnx"), "--atol", "0")
    assert bad.returncode != 0 and "parity" in bad.stderr
    assert not (tmp_path / "bad.onnx").exists() and not list(tmp_path.glob(".bad.onnx*"))


@pytest.mark.slow
def test_int8_export_reports_accuracy_and_speed(tmp_path, tiny_folder, tiny_teacher):
    tiny_teacher("wrn-10-1", 3, 16, path=tmp_path / "s.pt", mean=0.1, std=0.3, class_names=())
    r = run_atc("export", str(tmp_path / "s.pt"), "--out", str(tmp_path / "s.onnx"), "--int8", "--calib-data", str(tiny_folder),
                "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s.int8.onnx").stat().st_size < (tmp_path / "s.onnx").stat().st_size
    assert "top-1 FP32" in r.stdout and "speed-up" in r.stdout
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "s.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
