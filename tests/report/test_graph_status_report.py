"""What each student's training step ran as reaches report.json (``distill.cuda_graphs``), its
checkpoint's metrics and report.md, in every state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressor.distill.step import GraphStatus
from compressor.distill.student import DistilledStudent
from compressor.entries import StudentEntry
from compressor.models.spec import ModelSpec
from compressor.report.tables import graph_lines

STATES = [
    (GraphStatus("captured", 1, 1_170), "s: a CUDA graph (1 capture, 1,170 replays)"),
    (GraphStatus("captured", 2, 90), "s: a CUDA graph (2 captures, 90 replays)"),
    (GraphStatus("off", why="gradient attention's double backward cannot be captured"),
     "s: eager (gradient attention's double backward cannot be captured)"),
    (GraphStatus("failed", 1, 1, "self-check failed: the graphed step's at term is 3.1, the eager step's 2.9"),
     "s: eager after a failed CUDA graph (self-check failed: the graphed step's at term is 3.1, the eager step's 2.9)"),
]


def _entry(distill) -> StudentEntry:
    return StudentEntry(name="s", method="at+kd", params=10, gmacs=0.001, gflops=0.002, top1=90.0, top1_delta=-1.0,
                        param_ratio=2.0, mac_ratio=2.0, latency_ms=0.1, latency_speedup=2.0, latency_speedup_spread=[1.9, 2.1],
                        latency_speedup_quartiles=[1.95, 2.05], checkpoint="s.pt", onnx="s.onnx",
                        onnx_parity_max_abs_diff={"1": 0.0}, onnx_parity_max_rel_diff={"1": 0.0}, train_seconds=1.0, epochs=1,
                        attention_pairs=[], init=None, distill=distill)


@pytest.mark.parametrize("status, line", STATES)
def test_each_state_reaches_report_json_and_report_md(status, line):
    d = _entry({"cuda_graphs": status.to_dict()}).to_dict()
    assert d["distill"]["cuda_graphs"] == {"state": status.state, "captures": status.captures, "replays": status.replays,
                                           "why": status.why}
    assert graph_lines({"students": [d]}) == [f"Training step: {line}.", ""]


def test_an_entry_without_the_record_has_no_key_and_no_line():
    d = _entry(None).to_dict()
    assert "distill" not in d and graph_lines({"students": [d]}) == []


def test_the_status_survives_the_checkpoint_a_resumed_compress_reuses():
    spec = ModelSpec.for_arch("wrn-10-0.5", 3)
    done = DistilledStudent(torch.nn.Linear(2, 2), spec, Path("x"), 50.0, "at+kd", "wrn-10-1", 2,
                            cuda_graphs=GraphStatus("captured", 1, 12).to_dict())
    metrics = done.metrics()
    assert metrics["cuda_graphs"] == {"state": "captured", "captures": 1, "replays": 12, "why": ""}
    again = DistilledStudent.from_checkpoint(done.model, spec, metrics, Path("x"), method="at+kd", teacher="wrn-10-1", epochs=2)
    assert again.cuda_graphs == metrics["cuda_graphs"]
    old = {k: v for k, v in metrics.items() if k != "cuda_graphs"}  # a checkpoint from before atc recorded it
    assert DistilledStudent.from_checkpoint(done.model, spec, old, Path("x"), method="at+kd", teacher="t", epochs=2).cuda_graphs is None
