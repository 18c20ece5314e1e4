"""FitNet and DKD in training: the regressor trains and is saved in the training state only, resume is
exact, FitNet's stage 1 trains the lower half alone, DKD's warm-up reaches the step as a device scalar,
and the dry run shows the hint."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from compressor.config import load_config
from compressor.data.open import open_dataset
from compressor.distill.failures import StopRequested
from compressor.distill.hints import HintRegressor
from compressor.distill.loop import FitOptions, dkd_scale_at, fit, objective_from
from compressor.distill.runtime import Teacher
from compressor.distill.state import STATE_FILE
from compressor.distill.step import EagerStep
from compressor.distill.student import teacher_ties
from compressor.events import Reporter
from compressor.models import create_model
from tests.helpers import Messages, make_image_folder

TIMING = {"images_per_s", "train_seconds", "seconds"}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return open_dataset(make_image_folder(tmp_path_factory.mktemp("rivals") / "d", per_class=8), image_size=16)


@pytest.fixture(scope="module")
def teacher_model(small_data):
    torch.manual_seed(1)
    return create_model("wrn-10-2", small_data.num_classes).eval()  # channels 32/64/128: the student's differ


def _cfg(method: str, **distill):
    return load_config("demo", {"train": {"epochs": 2, "batch_size": 4, "seed": 5}, "distill": {"method": method, **distill}})


def _fit(data, teacher, cfg, out: Path, reporter: Reporter | None = None, **kw):
    torch.manual_seed(0)
    student = create_model("wrn-10-1", data.num_classes)
    ties = teacher_ties(student, teacher, data.input_size, cfg, objective_from(cfg))
    mean, std = data.channel_stats()
    res = fit(student, data, cfg, out, mean, std, ties, objective_from(cfg), torch.device("cpu"), reporter or Messages(),
              FitOptions(**kw))
    return student, ties, res


def _strip(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


def test_fitnet_trains_its_regressor_beside_the_student_and_saves_it_in_the_state_only(small_data, teacher_model, tmp_path):
    cfg = _cfg("fitnet")
    torch.manual_seed(0)
    fresh_keys = list(create_model("wrn-10-1", small_data.num_classes).state_dict())
    ties0 = teacher_ties(create_model("wrn-10-1", small_data.num_classes), teacher_model, small_data.input_size, cfg,
                         objective_from(cfg))
    before = {k: v.clone() for k, v in ties0.regressor.state_dict().items()}
    student, ties, res = _fit(small_data, teacher_model, cfg, tmp_path)
    assert ties.hint.student.module == "group1" and ties.hint.teacher.module == "group1"  # the middle of three stages
    assert isinstance(ties.regressor, HintRegressor) and ties.regressor.out_shape == (64, 8, 8)
    after = ties.regressor.state_dict()
    assert not torch.equal(before["proj.0.weight"], after["proj.0.weight"].cpu())  # it trained
    assert list(student.state_dict()) == fresh_keys  # and is no part of the student
    assert all("train_hint" in r and "train_ce" in r and r["train_hint"] > 0 for r in res.history)
    saved = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert set(saved["regressor"]) == set(after) and list(saved["model"]) == fresh_keys
    regressor_params = {id(p) for p in ties.regressor.parameters()}
    assert len(saved["optimizer"]["state"]) == sum(1 for _ in student.parameters()) + len(regressor_params)


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_a_fitnet_run_stopped_mid_epoch_resumes_bit_identical(small_data, teacher_model, tmp_path):
    class SignalAt(Messages):  # SIGTERM to this process after 3 steps of epoch 2
        current = steps = 0

        def task(self, description, total):
            self.current, self.steps = self.current + 1, 0

        def advance(self, steps=1, **fields):
            self.steps += steps
            if (self.current, self.steps) == (2, 3):
                os.kill(os.getpid(), signal.SIGTERM)

    cfg = _cfg("fitnet+kd")
    ref_student, ref_ties, ref = _fit(small_data, teacher_model, cfg, tmp_path / "ref")
    with pytest.raises(StopRequested):
        _fit(small_data, teacher_model, cfg, tmp_path / "run", reporter=SignalAt())
    saved = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 3) and saved["regressor"] is not None
    student, ties, res = _fit(small_data, teacher_model, cfg, tmp_path / "run", resume=True)
    for key, value in ref_student.state_dict().items():
        assert torch.equal(value, student.state_dict()[key]), key
    for key, value in ref_ties.regressor.state_dict().items():
        assert torch.equal(value, ties.regressor.state_dict()[key]), key
    assert _strip(res.history) == _strip(ref.history) and len(res.history) == 2


def test_fitnet_stage1_trains_the_lower_half_on_the_hint_alone(small_data, teacher_model, tmp_path):
    cfg = load_config("demo", {"train": {"epochs": 2, "batch_size": 4, "seed": 5},
                               "distill": {"method": "fitnet", "fitnet_stage1_epochs": 1}})
    assert cfg.distill.fitnet_stage1_epochs == 1  # set together with the epochs: not scaled

    class AfterEpoch1(Messages):  # copies the weights when epoch 2 begins
        def task(self, description, total):
            if "epoch 2/" in description:
                self.weights = {k: v.clone() for k, v in student_ref[0].state_dict().items()}

    torch.manual_seed(0)
    init = create_model("wrn-10-1", small_data.num_classes).state_dict()
    torch.manual_seed(0)
    student_ref = [create_model("wrn-10-1", small_data.num_classes)]
    ties = teacher_ties(student_ref[0], teacher_model, small_data.input_size, cfg, objective_from(cfg))
    mean, std = small_data.channel_stats()
    rep = AfterEpoch1()
    res = fit(student_ref[0], small_data, cfg, tmp_path, mean, std, ties, objective_from(cfg), torch.device("cpu"), rep)
    stage1 = rep.weights
    lower = ("conv0.", "group0.", "group1.")  # up to the hint stage (group1)
    changed = {k for k, v in stage1.items() if v.is_floating_point() and not torch.equal(v, init[k])}
    params = {n for n, _ in student_ref[0].named_parameters()}
    assert {k for k in changed & params} and all(k.startswith(lower) for k in changed & params)
    assert all(torch.equal(stage1[k], init[k]) for k in params if not k.startswith(lower))  # the upper half waited
    assert set(res.history[0]) >= {"train_hint", "train_loss"} and "train_ce" not in res.history[0]
    assert "train_ce" in res.history[1] and "train_hint" in res.history[1]
    assert any(line.startswith("FitNet stage 1: epochs 1-1") for line in rep.lines)
    assert any(line.startswith("FitNet stage 2: from epoch 2") for line in rep.lines)


def test_dkd_warmup_is_linear_by_epoch_and_reaches_the_step_as_one_device_scalar(small_data, teacher_model, tmp_path,
                                                                                 monkeypatch):
    cfg = load_config("demo", {"train": {"epochs": 3, "batch_size": 8}, "distill": {"method": "at+dkd", "dkd_warmup_epochs": 2}})
    assert [dkd_scale_at(cfg, e) for e in range(3)] == [0.5, 1.0, 1.0]
    no_warmup = load_config("demo", {"distill": {"dkd_warmup_epochs": 0}})
    assert dkd_scale_at(no_warmup, 0) == 1.0
    seen = []
    real = EagerStep.set_dkd_scale

    def record(self, value):
        real(self, value)
        seen.append((value, self.dkd_scale.data_ptr(), float(self.dkd_scale)))

    monkeypatch.setattr(EagerStep, "set_dkd_scale", record)
    _, _, res = _fit(small_data, teacher_model, cfg, tmp_path)
    assert [v for v, _, _ in seen] == [0.5, 1.0, 1.0] and [x for _, _, x in seen] == [0.5, 1.0, 1.0]
    assert len({ptr for _, ptr, _ in seen}) == 1  # filled in place: a captured graph keeps reading the same tensor
    assert all({"train_tckd", "train_nckd", "train_at", "train_ce"} <= set(r) for r in res.history)


def test_dry_run_gives_the_hint_pair_the_regressor_and_the_initial_hint_term(small_data, teacher_model):
    from compressor.derive.candidates import Candidate
    from compressor.dryrun import try_students
    from compressor.models.spec import ModelSpec

    spec = ModelSpec.for_arch("wrn-10-1", small_data.num_classes, input_size=small_data.input_size)
    cand = Candidate(spec, 0, 0.0, 1.0, 1.0)
    t_spec = ModelSpec.for_arch("wrn-10-2", small_data.num_classes, input_size=small_data.input_size)
    runs = {w: try_students(teacher_model, t_spec, small_data, _cfg("fitnet", fitnet_weight=w), [cand], "fitnet")[0]
            for w in (100.0, 50.0)}
    first = runs[100.0]
    assert first.hint == "group1 32×8×8 → 1×1 conv 32→64 + BN (2,176 parameters) ↔ group1 64×8×8"
    assert set(first.initial_terms) == {"ce", "hint", "loss"} and first.initial_terms["hint"] > 0
    assert runs[50.0].initial_terms["hint"] == pytest.approx(first.initial_terms["hint"] / 2, rel=1e-5)
    dkd = try_students(teacher_model, t_spec, small_data, _cfg("dkd"), [cand], "dkd")[0]
    assert dkd.hint is None and set(dkd.initial_terms) == {"ce", "tckd", "nckd", "loss"}


def test_a_caller_without_a_hint_pair_gets_a_one_line_error(small_data, teacher_model, tmp_path):
    from compressor.errors import ConfigError

    cfg = _cfg("fitnet")
    mean, std = small_data.channel_stats()
    with pytest.raises(ConfigError, match="FitNet needs a hint pair"):
        fit(create_model("wrn-10-1", small_data.num_classes), small_data, cfg, tmp_path, mean, std, Teacher(teacher_model),
            objective_from(cfg), torch.device("cpu"))
