"""The CLI end to end on tiny data, as a user would run it."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compressor.models.checkpoint import load_model
from tests.helpers import run_atc


@pytest.mark.slow
def test_train_then_compress_writes_full_output_set(tiny_folder, tmp_path):
    teacher = tmp_path / "teacher.pt"
    r = run_atc("train", "--arch", "wrn-10-1", "--data", str(tiny_folder), "--preset", "demo", "--epochs", "2",
                "--out", str(teacher))
    assert r.returncode == 0, r.stderr
    assert teacher.exists() and (tmp_path / "teacher.pt.state" / "metrics.jsonl").exists()

    dry = run_atc("compress", "--teacher", str(teacher), "--data", str(tiny_folder), "--preset", "demo", "--out", str(tmp_path / "dry"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "AT pair  group2 32×4×4  ↔  group2 64×4×4" in dry.stderr and "initial loss terms" in dry.stderr
    assert not (tmp_path / "dry").exists()

    out = tmp_path / "run"
    r = run_atc("compress", "--teacher", str(teacher), "--data", str(tiny_folder), "--preset", "demo", "--epochs", "2",
                "--out", str(out), "--method", "at+kd", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # --json: stdout holds the report alone
    assert report == json.loads((out / "report.json").read_text())
    for name in ("student.pt", "student.onnx", "report.md", "tradeoff.png", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
    s, t = report["students"][0], report["teacher"]
    assert s["name"] == "wrn-10-0.5" and s["method"] == "at+kd"
    assert s["params"] < t["params"] and s["gmacs"] < t["gmacs"]
    assert s["latency_speedup"] > 0 and s["mac_ratio"] == t["gmacs"] / s["gmacs"]
    assert max(s["onnx_parity_max_abs_diff"].values()) <= 1e-4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # what the training step ran as: said in report.json, metrics.jsonl, the checkpoint and report.md
    cpu = {"state": "off", "captures": 0, "replays": 0, "why": "training on cpu, not on a CUDA device"}
    assert s["distill"] == {"cuda_graphs": cpu}
    assert [json.loads(line)["cuda_graphs"] for line in (out / "metrics.jsonl").read_text().splitlines()] == ["off"] * 2
    assert load_model(out / "student.pt")[2]["cuda_graphs"] == cpu and load_model(teacher)[2]["cuda_graphs"] == cpu
    assert "Training step: wrn-10-0.5: eager (training on cpu, not on a CUDA device)." in (out / "report.md").read_text()

    model, spec, _ = load_model(out / "student.pt")
    sess = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, *spec.input_size)
    got = sess.run(None, {"input": x.numpy()})[0]
    assert np.abs(got - model.eval()(x).detach().numpy()).max() <= 1e-4


@pytest.mark.slow
def test_non_empty_out_is_refused(tiny_folder, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_atc("compress", "--teacher", "whatever.pt", "--data", str(tiny_folder), "--out", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "--overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_cuda_graphs_asked_for_where_they_cannot_run_is_a_one_line_error(tiny_folder, tmp_path):
    out = tmp_path / "teacher.pt"
    r = run_atc("train", "--arch", "wrn-10-1", "--data", str(tiny_folder), "--preset", "demo", "--epochs", "1",
                "--device", "cpu", "--cuda-graphs", "--out", str(out))
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line or "Traceback" in line]
    assert errors == ["error: --cuda-graphs cannot be honoured here: training on cpu, not on a CUDA device; drop --cuda-graphs "
                      "to train with the eager step"]
    assert not out.exists() and not (tmp_path / "teacher.pt.state").exists()  # refused before anything was written
