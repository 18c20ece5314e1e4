"""benchmarks/gpu_smoke.py: its refusal without a GPU, its report checks, failure handling, and (slow)
the whole sequence of atc commands on the CPU on tiny data."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, make_image_folder

SCRIPT = ROOT / "benchmarks" / "gpu_smoke.py"
STEPS = ["train", "derive", "compress-dry-run", "compress", "attention", "sweep", "profile", "export", "report"]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smoke(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU, so the script would run")
def test_refuses_without_cuda_in_one_line_and_writes_nothing(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=3)
    out = tmp_path / "smoke.json"
    proc = _smoke("--data", str(data), "--out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "needs a CUDA GPU" in lines[0]
    assert "run it on a GPU machine (see docs/benchmarks.md)" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "data"]


def _good_report() -> dict:
    return {
        "data": {"name": "cifar10", "train": 10000, "test": 10000, "classes": 10},
        "teacher": {"name": "wrn-16-2", "top1": 41.0, "latency_ms": 1.8},
        "students": [{
            "name": "wrn-16-1", "top1": 30.0, "latency_ms": 0.5, "latency_speedup": 3.6, "latency_speedup_spread": [3.1, 4.0],
            "onnx_parity_max_abs_diff": {"1": 2e-6, "8": 3e-6}, "attention_pairs": ["group0 …"],
            "int8": {"top1_int8": 29.5, "top1_fp32": 30.1, "speedup": 1.7, "latency_ms": 0.3},
        }],
    }


def test_check_report_accepts_a_good_report_and_names_each_fault():
    check_report = _load().check_report
    checks, fails = check_report(_good_report(), 10.0)
    assert fails == []
    assert checks["student_top1"] == 30.0 and checks["int8_top1"] == 29.5 and checks["onnx_parity_max_abs_diff"] == 3e-6

    def faults(edit) -> list[str]:
        r = copy.deepcopy(_good_report())
        edit(r)
        return check_report(r, 10.0)[1]

    def parity(r):
        r["students"][0]["onnx_parity_max_abs_diff"]["8"] = 2e-4

    def at_chance(r):
        r["students"][0]["top1"] = 10.0  # not above chance; the ONNX models agree with it
        r["students"][0]["int8"].update(top1_fp32=10.0, top1_int8=9.9)

    def no_int8(r):
        del r["students"][0]["int8"]

    def int8_collapsed(r):
        r["students"][0]["int8"]["top1_int8"] = 10.0

    def onnx_disagrees(r):
        r["students"][0]["int8"]["top1_fp32"] = 33.0

    def no_latency(r):
        r["students"][0]["latency_speedup"] = None

    assert faults(parity) == ["report.json: ONNX parity 2.00e-04 is not below 0.0001"]
    assert faults(at_chance) == ["report.json: student top-1 10.00% is not above 10.00%"]
    assert faults(no_int8) == ["report.json: students[0].int8 missing (compress ran with --int8)"]
    assert len(faults(int8_collapsed)) == 1 and "INT8 top-1 10.00%" in faults(int8_collapsed)[0]
    assert faults(onnx_disagrees) == ["report.json: onnxruntime FP32 top-1 33.00% disagrees with torch's 30.00% by more than 2 points"]
    assert len(faults(no_latency)) == 1 and "latency_speedup" in faults(no_latency)[0]
    assert check_report({"teacher": {"top1": 40.0, "latency_ms": 1.0}, "students": []}, 10.0)[1] == ["report.json: no students"]


def test_a_failed_step_keeps_its_stderr_and_skips_the_steps_that_need_it(tmp_path, monkeypatch):
    smoke = _load()
    # A stand-in for `python -m cli`: 20 numbered lines on stderr, then exit code 3 (atc itself is not needed here).
    monkeypatch.setattr(smoke, "ATC", [sys.executable, "-c", "import sys; [print('line', i, file=sys.stderr) for i in range(20)]; sys.exit(3)"])
    failed: set[str] = set()
    def never(proc):
        return pytest.fail("a failed command's output must not be checked")
    bad = smoke.Step("train", ["train"], 60, never)
    after = smoke.Step("derive", ["derive"], 60, never, needs=("train",))
    other = smoke.Step("other", ["other"], 60, never)
    first, second = smoke.run_step(bad, 1, 3, failed, dict(os.environ)), smoke.run_step(after, 2, 3, failed, dict(os.environ))
    assert not first["ok"] and first["returncode"] == 3 and first["seconds"] > 0 and first["cmd"] == "python -m cli train"
    tail = first["error"].split("; stderr: ", 1)
    assert tail[0] == "exit code 3" and tail[1].splitlines() == [f"line {i}" for i in range(5, 20)]  # the last 15 lines
    assert not second["ok"] and second["returncode"] is None and second["seconds"] == 0
    assert second["error"] == "skipped: needs the output of train, which failed"
    third = smoke.run_step(other, 3, 3, failed, dict(os.environ))  # an independent step still runs
    assert third["returncode"] == 3 and failed == {"train", "derive", "other"}


def test_the_json_says_what_the_training_step_ran_as_and_cuda_needs_one_capture():
    failures = _load().graph_failures
    captured = {"state": "captured", "captures": 1, "replays": 900, "why": ""}
    assert failures(captured, "cuda", "the step") == [] and failures(captured, "cpu", "the step") == []
    assert failures({**captured, "captures": 3}, "cuda", "the step") == ["the step was captured 3 times, not once"]
    assert failures({"state": "failed", "captures": 1, "why": "self-check failed: …"}, "cuda", "the step") == [
        "the step did not run as a CUDA graph (failed: self-check failed: …)"]
    off = {"state": "off", "captures": 0, "why": "training on cpu, not on a CUDA device"}
    assert failures(off, "cpu", "the step") == [] and failures(off, "cuda", "the step")[0].startswith("the step did not run")
    assert failures(None, "cpu", "the step") == ["the step does not say whether it ran as a CUDA graph"]
    assert failures({"state": None, "captures": None}, "cpu", "the step") == failures(None, "cpu", "the step")


@pytest.mark.slow
def test_whole_sequence_on_cpu_on_tiny_data(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=12, size=32)
    out, work = tmp_path / "smoke.json", tmp_path / "work"
    proc = _smoke("--device", "cpu", "--data", str(data), "--out", str(out), "--work", str(work), "--epochs", "1",
                  "--train-subset", "0", "--min-top1", "-1", timeout=900)
    result = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s["name"] for s in result["steps"]] == STEPS
    assert all(s["ok"] and s["error"] is None and s["seconds"] > 0 for s in result["steps"]), result["steps"]
    assert result["passed"] is True and result["total_seconds"] >= sum(s["seconds"] for s in result["steps"]) - 1
    assert all(0 <= result["accuracies"][k] <= 100 for k in ("teacher", "student", "int8"))
    assert result["device"]["kind"] == "cpu" and result["device"]["gpu"] is None and result["device"]["torch"] == torch.__version__
    steps = {s["name"]: s for s in result["steps"]}
    assert steps["train"]["checks"]["trained_on"] == "cpu" and steps["sweep"]["checks"]["cells"] == 2
    assert steps["compress"]["checks"]["onnx_parity_max_abs_diff"] < 1e-4
    assert {"torch-cpu/b1", "ort-cpu/b1"} <= set(steps["profile"]["checks"]["latency_ms"])
    assert (work / "compress" / "student.onnx").is_file() and (work / "maps.png").is_file()
    assert result["cuda_graphs"]["teacher"] == {"state": "off", "captures": 0}
    assert result["cuda_graphs"]["student"]["state"] == "off" and "cpu" in result["cuda_graphs"]["student"]["why"]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_smoke: 9/9 steps passed in ") and last.endswith(f"on cpu -> {out}")
