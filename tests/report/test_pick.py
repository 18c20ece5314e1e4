"""The rule that chooses the published student (``compressor.report.pick``)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compressor.errors import ConfigError
from compressor.report.pick import pareto_front, parse_pick, pick_student

# The demo of issue 25: the preset's wrn-10-1 first, beaten on both axes by wrn-16-0.5.
DEMO = [{"name": "wrn-10-1", "top1": 97.22, "latency_speedup": 5.70},
        {"name": "wrn-16-0.5", "top1": 98.33, "latency_speedup": 5.96},
        {"name": "wrn-16-1", "top1": 98.61, "latency_speedup": 3.20}]


def test_auto_replaces_a_first_choice_that_another_student_beats_on_both_axes():
    p = pick_student(DEMO)
    assert (p.index, p.name, p.rule) == (1, "wrn-16-0.5", "auto")
    assert "replaces the first choice wrn-10-1 (97.22%, 5.70x)" in p.reason


def test_auto_keeps_the_first_choice_when_nobody_beats_it_on_both():
    students = [DEMO[1], DEMO[0], DEMO[2]]  # wrn-16-0.5 first: wrn-16-1 is more accurate but slower
    p = pick_student(students)
    assert p.name == "wrn-16-0.5" and "first choice" in p.reason


def test_auto_takes_the_most_accurate_of_several_that_beat_the_first():
    students = [{"name": "a", "top1": 90, "latency_speedup": 2},
                {"name": "b", "top1": 91, "latency_speedup": 3},
                {"name": "c", "top1": 93, "latency_speedup": 2.5},
                {"name": "d", "top1": 95, "latency_speedup": 1.5}]
    assert pick_student(students).name == "c"


def test_equal_figures_do_not_dominate():
    students = [{"name": "a", "top1": 90, "latency_speedup": 2}, {"name": "b", "top1": 90, "latency_speedup": 2}]
    assert pick_student(students).name == "a"


def test_accurate_and_fastest():
    assert pick_student(DEMO, "accurate").name == "wrn-16-1"
    assert pick_student(DEMO, "fastest").name == "wrn-16-0.5"


def test_speedup_target_picks_the_most_accurate_fast_enough_student():
    assert pick_student(DEMO, "3").name == "wrn-16-1"
    assert pick_student(DEMO, "4x").name == "wrn-16-0.5"
    p = pick_student(DEMO, "10")
    assert p.name == "wrn-16-0.5" and p.reason.startswith("no student reached 10x")


def test_missing_figures_count_as_zero():
    students = [{"name": "a", "top1": None, "latency_speedup": None}, {"name": "b", "top1": 50.0, "latency_speedup": 1.1}]
    assert pick_student(students).name == "b"


def test_one_student_is_published_whatever_the_rule():
    p = pick_student(DEMO[:1], "fastest")
    assert p.name == "wrn-10-1" and "only student" in p.reason


@pytest.mark.parametrize("text, rule", [(None, "auto"), ("Accurate", "accurate"), ("fastest", "fastest"), ("3", "3x"),
                                         ("2.50x", "2.5x")])
def test_parse_pick(text, rule):
    assert parse_pick(text) == rule


@pytest.mark.parametrize("text", ["best", "0", "-2", "inf", "nan", "x"])
def test_parse_pick_refuses_other_text_in_one_line(text):
    with pytest.raises(ConfigError, match="--pick") as e:
        parse_pick(text)
    assert "\n" not in str(e.value)


figures = st.lists(st.tuples(st.floats(0.5, 10), st.floats(0, 100)), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(figures)
def test_auto_never_publishes_a_dominated_student(pts):
    students = [{"name": f"s{i}", "latency_speedup": x, "top1": y} for i, (x, y) in enumerate(pts)]
    p = pick_student(students)
    assert p.index in pareto_front(pts)


def test_pareto_front():
    assert pareto_front([(1, 1), (2, 2), (3, 1), (0.5, 3)]) == [1, 2, 3]
