"""The report views: report.json merged from several runs, the table rows, the Pareto front of
tradeoff.png and report.md's note on noisy latency."""

import pytest

from compressor.report.build import merge_reports
from compressor.report.plots import pareto_front
from compressor.report.tables import markdown, noisy_latency, rows


def test_pareto_front():
    # (speed-up, top-1): the third point is dominated by the second.
    assert pareto_front([(1.0, 90.0), (3.0, 88.0), (2.0, 87.0), (5.0, 80.0)]) == [0, 1, 3]


def _report(teacher, students):
    return {"teacher": {"name": teacher, "params": 100, "gmacs": 1.0, "top1": 90.0, "latency_ms": 2.0},
            "students": [{"name": s, "params": 10, "gmacs": 0.1, "top1": 85.0, "top1_delta": -5.0, "latency_ms": 0.5,
                          "param_ratio": 10.0, "mac_ratio": 10.0, "latency_speedup": 4.0} for s in students],
            "data": {"name": "d", "train": 1, "test": 1, "classes": 2}, "preset": "p", "epochs": 1, "method": "at"}


def test_merge_reports_and_rows():
    merged = merge_reports([_report("t", ["a"]), _report("t", ["b", "c"])])
    assert [s["name"] for s in merged["students"]] == ["a", "b", "c"]
    table = rows(merged)
    assert table[0][:2] == ["t", "teacher"] and table[1][-1] == "4.00" and len(table) == 4
    from compressor.errors import AtcError

    with pytest.raises(AtcError, match="different teachers"):
        merge_reports([_report("t", ["a"]), _report("u", ["b"])])


def test_noisy_latency_is_flagged_in_the_report():
    report = _report("t", ["steady", "noisy"])
    report["students"][0].update(latency_speedup_spread=[3.0, 6.3], latency_speedup_quartiles=[3.9, 4.1])  # one stray round
    report["students"][1].update(latency_speedup_spread=[2.0, 9.0], latency_speedup_quartiles=[3.0, 5.0])
    assert rows(report)[1][-1] == "4.00 (3.00–6.30)"
    assert noisy_latency(report) == ["noisy"]
    assert "Latency is noisy for noisy: the middle half of the rounds spans more than 1.25×" in markdown(report)
    report["students"].pop()
    assert "noisy" not in markdown(report).lower()
