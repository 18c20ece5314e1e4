"""benchmarks/throughput.py reads what the training step ran as from its status (no isinstance guess):
on the CPU through the fake of torch.cuda's graph API, the product path records one capture."""

from __future__ import annotations

import importlib.util
import sys

import torch

from tests import fake_cuda
from tests.helpers import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("throughput_bench", ROOT / "benchmarks" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["throughput_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_product_path_records_its_captures(monkeypatch):
    tp = _module()
    small = {"wrn-16-2": "wrn-10-1", "wrn-16-1": "wrn-10-0.5"}  # the same path, smaller models: a fast test
    made = tp.create_model
    monkeypatch.setattr(tp, "create_model", lambda name, classes: made(small[name], classes))
    cuda = fake_cuda.install(monkeypatch)
    product = tp.product_rate(torch.device("cpu"), 16, 64, 2, None)  # 4 batches an epoch, 3 of them warm-up
    assert product["cuda_graphs"] == {"state": "captured", "captures": 1, "replays": 2 * 4 - 3, "why": ""}
    assert len(cuda.captures) == 1 and len(product["per_epoch"]) == 2
    # (the eager product path on the CPU says why it did not capture: tests/distill/test_speed.py runs the script)
