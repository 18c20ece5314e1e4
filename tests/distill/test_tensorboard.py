"""--tensorboard: per-epoch scalars of every trained model, read back from the event files."""

from __future__ import annotations

import sys

import pytest
import torch

from compressor.config import load_config
from compressor.errors import ConfigError
from tests.helpers import make_image_folder

pytest.importorskip("tensorboard", reason="tensorboard is an optional extra (pip install 'atc[tensorboard]')")


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_teacher_and_student_runs_write_one_point_per_epoch(tmp_path):
    from compressor import pipeline
    from compressor.derive.candidates import StudentChoice
    from compressor.options import RunOptions

    data = make_image_folder(tmp_path / "d", per_class=6)
    cfg = load_config("demo", {"train": {"epochs": 2, "batch_size": 6}})
    tb = tmp_path / "tb"
    pipeline.train("wrn-10-1", data, cfg, tmp_path / "t.pt", RunOptions(device="cpu", tensorboard=tb))
    teacher = _scalars(tb / "wrn-10-1")
    assert {"train/loss", "train/top1", "test/top1", "lr", "images_per_s"} <= set(teacher)
    assert [step for step, _ in teacher["test/top1"]] == [1, 2]
    metrics = torch.load(tmp_path / "t.pt", weights_only=True)["metrics"]["history"]
    assert [v for _, v in teacher["test/top1"]] == pytest.approx([r["test_top1"] for r in metrics])

    pipeline.compress(tmp_path / "t.pt", data, cfg, tmp_path / "run", StudentChoice(names=["wrn-10-1"]),
                      RunOptions(device="cpu", threads=1, tensorboard=tb), method="at+kd")
    student = _scalars(tb / "wrn-10-1-at_kd")
    assert {"train/ce_weighted", "train/kd", "train/at", "test/top1"} <= set(student)
    assert [step for step, _ in student["train/at"]] == [1, 2]


def test_a_missing_tensorboard_package_is_one_line(monkeypatch):
    from compressor.distill.tensorboard import check_tensorboard

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"--tensorboard needs the tensorboard package; pip install 'atc\[tensorboard\]'"):
        check_tensorboard()
