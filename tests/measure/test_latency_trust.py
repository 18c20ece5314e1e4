"""Latency on a shared machine (issue 25): each model's CV, the load average and its note, one thread
by default, torch's thread count left as it was."""

import pytest
import torch

from compressor.models.registry import create_model
from compressor.profiling import latency
from compressor.profiling.latency import DEFAULT_THREADS, compare_latency, cv, load_note, measure_latency, usable_cores


def test_load_note_only_when_the_load_exceeds_the_cores():
    assert load_note((None, None), 2) == ""
    assert load_note((1.5, 2.0), 2) == ""
    note = load_note((1.2, 3.14), 2)
    assert "3.1 on 2 cores" in note and "biased" in note and "\n" not in note
    assert "1 core " in load_note((2.0, None), 1)


def test_cv():
    assert cv([1.0]) == 0.0 and cv([2.0, 2.0, 2.0]) == 0.0
    assert cv([1.0, 3.0]) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return create_model("wrn-16-1", num_classes=3).eval(), create_model("wrn-10-1", num_classes=3).eval()


@pytest.mark.slow
def test_interleaved_timing_keeps_each_models_cv_and_the_load(pair, monkeypatch):
    loads = iter([0.5, 7.5])
    monkeypatch.setattr(latency, "load_average", lambda: next(loads))
    torch.set_num_threads(2)
    speed = compare_latency(*pair, (3, 16, 16), rounds=3, runs_per_round=3)
    assert torch.get_num_threads() == 2  # restored: training after a latency search keeps its threads
    assert speed.threads == DEFAULT_THREADS == 1
    assert speed.teacher_cv > 0 and speed.student_cv > 0
    assert speed.load == (0.5, 7.5) and speed.cores == usable_cores()
    assert ("7.5 on" in speed.load_note) == (7.5 > usable_cores())


@pytest.mark.slow
def test_a_quiet_machine_gives_no_note(pair, monkeypatch):
    monkeypatch.setattr(latency, "load_average", lambda: 0.0)
    assert compare_latency(*pair, (3, 16, 16), rounds=2, runs_per_round=2).load_note == ""


def test_solo_timing_uses_one_thread_by_default_and_restores_torchs(pair):
    torch.set_num_threads(2)
    lat = measure_latency(pair[1], (3, 16, 16), "torch-cpu", timing=latency.Timing(warmup=1, min_runs=3, min_time_s=0))
    assert lat.threads == 1 and torch.get_num_threads() == 2
