"""FitNet and DKD through the CUDA-graph step on the CPU (tests/fake_cuda.py): one capture serves the
whole run, the regressor and DKD's warm-up scalar are read by the graph (the warm-up changes its value
between epochs, never the graph), and the graphed run ends bit for bit where the eager run does."""

from __future__ import annotations

import pytest
import torch

from compressor.config import load_config
from compressor.data.images import ImageData
from compressor.device import Speed
from compressor.distill.loop import FitOptions, fit, objective_from
from compressor.distill.step import EagerStep, GraphStatus
from compressor.distill.student import teacher_ties
from compressor.models import create_model
from tests import fake_cuda

CPU = torch.device("cpu")
TRAIN, BATCH, EPOCHS, WARMUP = 32, 8, 2, 3  # four full batches per epoch: warm-up, capture, then replays


def _data() -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (TRAIN + 12, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (TRAIN + 12,), generator=g)
    return ImageData("toy", x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:], ["a", "b", "c"])


def _fit(tmp_path, name: str, method: str, speed: Speed):
    cfg = load_config("demo", {"train": {"epochs": EPOCHS, "batch_size": BATCH, "milestones": [1], "seed": 1},
                               "distill": {"method": method, "dkd_warmup_epochs": 2}})
    torch.manual_seed(0)
    teacher, student = create_model("wrn-10-1", 3).eval().requires_grad_(False), create_model("wrn-10-0.5", 3)
    data = _data()
    ties = teacher_ties(student, teacher, data.input_size, cfg, objective_from(cfg))
    mean, std = data.channel_stats()
    result = fit(student, data, cfg, tmp_path / name, mean, std, ties, objective_from(cfg), CPU, options=FitOptions(speed=speed))
    return student, ties, result


@pytest.mark.parametrize("method", ["fitnet+kd", "at+dkd"])
def test_one_capture_serves_fitnet_and_dkd_runs_bit_for_bit(method, monkeypatch, tmp_path):
    eager_model, eager_ties, eager = _fit(tmp_path, "eager", method, Speed(cuda_graphs=False))
    cuda = fake_cuda.install(monkeypatch)
    scales = []
    real = EagerStep.set_dkd_scale
    monkeypatch.setattr(EagerStep, "set_dkd_scale", lambda self, v: (real(self, v), scales.append(self.dkd_scale))[0])
    model, ties, result = _fit(tmp_path, "graph", method, Speed())

    assert len(cuda.captures) == 1  # not again when the DKD warm-up or the learning rate moves
    assert result.cuda_graphs == GraphStatus("captured", 1, EPOCHS * (TRAIN // BATCH) - WARMUP)  # the self-check passed
    for (k, v), w in zip(eager_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(v, w), k
    assert [r["train_loss"] for r in result.history] == [r["train_loss"] for r in eager.history]
    if method.startswith("fitnet"):  # the regressor trained inside the graph exactly as eagerly
        for (k, v), w in zip(eager_ties.regressor.state_dict().items(), ties.regressor.state_dict().values()):
            assert torch.equal(v, w), k
        assert cuda.live_tensors_read(list(ties.regressor.parameters()))
    else:  # DKD's factor 0.5, then 1: one device scalar, filled in place, that the graph reads
        assert len(scales) == EPOCHS and all(s is scales[0] for s in scales) and float(scales[0]) == 1.0
        assert cuda.live_tensors_read([scales[0]])
        assert [r["train_nckd"] > 0 for r in result.history] == [True] * EPOCHS
