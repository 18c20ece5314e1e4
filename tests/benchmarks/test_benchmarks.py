"""The CIFAR-10 table script end to end on tiny data: cells, resumption, latency, JSON and Markdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, make_image_folder


def _table(data, out, *extra):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cifar10_table.py"), "--data", str(data), "--out", str(out),
           "--pairs", "wrn-10-1:wrn-10-2", "--methods", "none,at", "--seeds", "2", "--epochs", "1",
           "--teacher-epochs", "1", "--latency-rounds", "3", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


@pytest.mark.slow
def test_table_runs_skips_finished_cells_and_writes_json(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=16, size=32)
    first = _table(data, tmp_path / "t")
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("+ atc compress") == 4 and first.stdout.count("+ atc train") == 1

    table = json.loads((tmp_path / "t" / "table.json").read_text())["table"]["wrn-10-1 ← wrn-10-2"]
    assert set(table) >= {"none", "at", "latency", "teacher_error"}
    for method in ("none", "at"):
        errors = table[method]["errors"]
        assert len(errors) == 2 and all(0 <= e <= 100 for e in errors)
        assert table[method]["error_min"] <= table[method]["error_median"] <= table[method]["error_max"]
        assert table[method]["mac_ratio"] > 1
    assert table["latency"]["rounds"] == 3 and table["latency"]["speedup"] > 0
    md = (tmp_path / "t" / "table.md").read_text()
    assert "| wrn-10-1 ← wrn-10-2 |" in md and "interleaved over 3 rounds" in md

    again = _table(data, tmp_path / "t")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "+ atc" not in again.stdout  # every cell and the teacher were reused


def test_table_markdown_has_a_column_per_method_with_the_rivals_settings():
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("cifar10_table", ROOT / "benchmarks" / "cifar10_table.py")
    table_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table_mod)
    cell = {"error_median": 40.0, "error_min": 39.0, "error_max": 41.5, "params": 175066, "gmacs": 0.0269, "mac_ratio": 3.8}
    row = {m: dict(cell, error_median=40.0 + i) for i, m in enumerate(["none", "at", "fitnet", "dkd"])}
    row |= {"teacher_error": 30.0, "latency": {"speedup": 3.9, "spread": [3.4, 4.2], "threads": 1, "rounds": 30}}
    args = argparse.Namespace(methods="none,at,fitnet,dkd", train_subset=5000, epochs=3, teacher_train_subset=10000,
                              teacher_epochs=10, seeds=3)
    md = table_mod.markdown({"wrn-16-1 ← wrn-16-2": row}, args)
    assert "| student ← teacher | teacher err % | student alone | AT | FitNet | DKD | params |" in md
    assert "| wrn-16-1 ← wrn-16-2 | 30.00 | 40.00 [39.00–41.50] | 41.00 [39.00–41.50] | 42.00 [39.00–41.50] | 43.00" in md
    assert "weight 100 on the middle group" in md and "β = 8" in md and "scaled with the schedule to 0 epochs" in md
