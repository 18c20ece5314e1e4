"""Target search: width (and depth) for a GMACs/params/latency speed-up; noisy, non-monotone latency."""

from __future__ import annotations

import math

import pytest
import torch

from compressor.derive.search import Target, _Evaluator, _search_width, search
from compressor.errors import ConfigError
from compressor.models.plan import apply_plan
from compressor.models.spec import ModelSpec
from compressor.profiling.counts import count_macs, count_params
from compressor.profiling.latency import SpeedUp
from tests.helpers import make_image_folder, run_atc

SIZE = (3, 32, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    spec = ModelSpec.for_arch("resnet18", 10, input_size=SIZE)  # ImageNet stem: 64-512 channels, tiny maps at 32x32
    return spec, spec.build().eval()


def _ref(spec):
    return {"family": spec.family, "kwargs": spec.arch_kwargs, "name": spec.name}


def test_gmacs_target_is_met_and_measured(teacher):
    spec, model = teacher
    result = search(model, SIZE, Target(3.0, "gmacs"), teacher_arch=_ref(spec))
    achieved = count_macs(model, SIZE).gmacs / count_macs(result.student, SIZE).gmacs
    assert result.achieved == pytest.approx(achieved, rel=1e-9)
    assert abs(achieved / 3 - 1) <= 0.05 and result.met
    assert result.best.max_blocks is None  # 3x is within reach of thinning alone: all blocks stay
    # the plan rebuilds the very student the search measured
    rebuilt = apply_plan(spec.build(), result.plan)
    rebuilt.load_state_dict(result.student.state_dict())
    assert count_params(rebuilt)["total"] == count_params(result.student)["total"]
    summary = result.plan.search
    assert summary.target == 3.0 and summary.by == "gmacs" and summary.achieved == pytest.approx(achieved)
    assert len(summary.trials) == len(result.trials) >= 1


def test_params_target_and_depth_when_width_floor_is_not_enough(teacher):
    spec, model = teacher
    result = search(model, SIZE, Target(2.0, "params"), teacher_arch=_ref(spec))
    assert abs(count_params(model)["total"] / count_params(result.student)["total"] / 2 - 1) <= 0.05
    deep = search(model, SIZE, Target(40.0, "gmacs", min_width=0.25), teacher_arch=_ref(spec))
    assert deep.best.max_blocks == 1 and deep.plan.removed_blocks == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert deep.best.mac_ratio > 20  # far beyond what width 0.25 alone gives (about 16x)


def test_latency_search_keeps_the_best_measured_candidate(teacher, monkeypatch):
    """Latency that is not monotone in width (a thinner model that is slower) does not fool the search."""
    spec, model = teacher
    measured = []

    def fake_latency(self, student, rounds):
        gm = self.t_gmacs / count_macs(student, SIZE).gmacs
        # thinner is faster except in a band of widths where it is *slower* than a wider model
        speed = 1.0 if 2.2 < gm < 3.6 else math.sqrt(gm) * 1.3
        measured.append(speed)
        return SpeedUp("ort-cpu", 1, 1, speed, (speed * 0.9, speed * 1.1), 10.0, 10.0 / speed, rounds)

    monkeypatch.setattr(_Evaluator, "latency", fake_latency)
    result = search(model, SIZE, Target(3.0, "latency", max_trials=5), teacher_arch=_ref(spec))
    trials = [t for t in result.trials if t.latency_speedup is not None]
    best = min(trials, key=lambda t: abs(math.log(t.latency_speedup / 3)))
    assert result.best is best
    assert result.final is not None and result.achieved == pytest.approx(measured[-1])
    assert result.plan.search.spread == pytest.approx([result.achieved * 0.9, result.achieved * 1.1])


def test_width_search_on_a_noisy_dip_stops_and_returns_what_it_measured():
    calls = []

    class T:
        def __init__(self, w, v):
            self.width, self.v = w, v

        def achieved(self, by):
            return self.v

        def __eq__(self, other):
            return abs(self.width - other.width) < 1e-12

    def evaluate(w, by):
        v = 1 / w if not 0.4 < w < 0.6 else 1.2  # a dip: thinner but not faster
        calls.append(w)
        return T(w, v)

    made = _search_width(evaluate, "latency", 3.0, 0.1, 0.1, 6, 0.5, 1.0)
    assert 1 <= len(made) <= 6 and all(0.1 <= t.width <= 1 for t in made)
    assert min(abs(math.log(t.v / 3)) for t in made) < math.log1p(0.1)


def test_target_validation():
    with pytest.raises(ConfigError, match="--by"):
        Target(3, "flops")
    with pytest.raises(ConfigError, match="above 1"):
        Target(0.5)
    with pytest.raises(ConfigError, match="--runtime"):
        Target(3, "latency", runtime="tpu")


@pytest.mark.slow
def test_cli_dry_run_shows_stages_pairs_and_speedups(tmp_path, tiny_teacher):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=6, size=16)
    tiny_teacher("mobilenet_v2", 3, 16, path=tmp_path / "teacher.pt", mean=None, std=None)
    r = run_atc("compress", "--teacher", str(tmp_path / "teacher.pt"), "--data", str(data), "--preset", "demo",
                "--target-speedup", "3", "--by", "gmacs", "--blocks-per-stage", "2", "--dry-run")
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "features[7-10]" in err and "2/4" in err  # a stage of 4 inverted-residual blocks keeps 2
    assert "target 3x by gmacs: achieved" in err and "(not a measured speed-up)" in err
    assert "AT pair" in err and "init: inherit" in err and "dry run: nothing trained" in err
    r = run_atc("compress", "--teacher", str(tmp_path / "teacher.pt"), "--data", str(data), "--student", "wrn-16-1",
                "--width-ratio", "0.5", "--dry-run")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--student" in r.stderr
