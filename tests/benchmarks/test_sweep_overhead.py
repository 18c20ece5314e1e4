"""benchmarks/sweep_overhead.py end to end at its smallest: both sweeps finish and the JSON holds both times
and their ratio."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is the optional extra atc[ray] (part of atc[dev])")
def test_sweep_overhead_times_both_engines(tmp_path):
    results = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sweep_overhead.py"), "--epochs", "1", "--teacher", "wrn-10-1",
                           "--student", "wrn-10-1", "--results", str(results)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(results.read_text())
    assert set(res["seconds"]) == {"jobs2", "ray"} and all(len(v) == 1 and v[0] > 0 for v in res["seconds"].values())
    assert res["ray_over_jobs2"] == pytest.approx(res["median_seconds"]["ray"] / res["median_seconds"]["jobs2"])
    assert proc.stdout.strip().splitlines()[-1].startswith("summary: 4-cell digits sweep")
