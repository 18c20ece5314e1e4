"""Report views a newcomer can trust (issue 25): merged runs of other data or teachers refused, latency
columns that say their thread count, each model's CV, the published student, old report.json files
read with today's keys, INT8 agreement and the load note in the notes."""

import json

import pytest

from compressor.errors import AtcError
from compressor.report.build import merge_reports, read_report, upgrade_report
from compressor.report.tables import columns, markdown, report_notes, rows
from tests.helpers import assert_error, run_atc


def _student(name: str) -> dict:
    return {"name": name, "method": "at+kd", "params": 10, "gmacs": 0.002, "gflops": 0.004, "top1": 97.0, "top1_delta": -2.4,
            "param_ratio": 8.9, "mac_ratio": 8.0, "latency_ms": 0.04, "latency_speedup": 5.5, "latency_speedup_spread": [5.0, 6.0],
            "latency_speedup_quartiles": [5.2, 5.8], "checkpoint": f"students/{name}/student.pt", "onnx": f"students/{name}/student.onnx",
            "onnx_parity_max_abs_diff": {}, "onnx_parity_max_rel_diff": {}, "train_seconds": 1.0, "epochs": 12,
            "attention_pairs": [], "init": None, "latency_cv": 0.031}


def _report(teacher="wrn-16-2", data="digits", threads=1, students=("a",), params=691_674):
    """A report.json that read_report accepts field by field (issue 21), with the values these tests vary."""
    return {"teacher": {"name": teacher, "params": params, "gmacs": 0.0254, "gflops": 0.0508, "top1": 99.4, "latency_ms": 0.22,
                        "latency_cv": 0.05},
            "students": [_student(s) for s in students],
            "data": {"name": data, "train": 1437, "test": 360, "classes": 10, "input_size": [3, 16, 16]},
            "latency": {"runtime": "ort-cpu", "batch_size": 1, "threads": threads, "rounds": 15}, "preset": "demo", "epochs": 12,
            "method": "at+kd", "command": "atc demo", "config": {}}


def test_runs_of_other_data_are_refused_in_one_line():
    other = _report(data="cifar10")
    other["data"].update(train=50_000, test=10_000, input_size=[3, 32, 32])
    with pytest.raises(AtcError, match="runs/x and runs/demo were run on different data") as e:
        merge_reports([other, _report()], ["runs/x", "runs/demo"])
    assert "\n" not in str(e.value) and "cifar10: 50000 train" in str(e.value)


def test_runs_of_another_teacher_are_refused():
    with pytest.raises(AtcError, match="have different teachers"):
        merge_reports([_report(), _report(params=175_066)])


def test_latency_columns_say_their_thread_count():
    assert columns(_report())[6] == "latency ms (1 thread)"
    assert columns(_report(threads=2))[6] == "latency ms (2 threads)"
    merged = merge_reports([_report(students=("a",)), _report(threads=2, students=("b",))])
    assert columns(merged)[6] == "latency ms (threads per row)"
    table = rows(merged)
    assert table[1][6] == "0.040 (1t)" and table[2][6] == "0.040 (2t)"
    assert "published" not in merged  # a merged view publishes no student of its own


def test_each_models_cv_and_the_published_student_in_the_table():
    r = _report(students=("a", "b"))
    r["published"] = {"name": "b", "rule": "auto", "reason": "b (97.00%, 5.50x) replaces the first choice", "checkpoint": "x"}
    table = rows(r)
    assert columns(r)[7] == "CV %" and table[0][7] == "5.0" and table[1][7] == "3.1"
    assert [row[1] for row in table] == ["teacher", "student", "student (published)"]
    assert report_notes(r)[0] == "Published (student.pt, student.onnx at the top of the output folder): b; b (97.00%, 5.50x) replaces the first choice."


def test_old_report_keys_are_read_with_todays_names(tmp_path):
    old = _report()
    old["latency"].update(teacher_median_ms=6.93, teacher_cv=0.33)
    del old["teacher"]["latency_cv"], old["students"][0]["latency_cv"]
    (tmp_path / "report.json").write_text(json.dumps(old))
    r = read_report(tmp_path)
    assert r["latency"]["teacher_solo_median_ms"] == 6.93 and "teacher_median_ms" not in r["latency"]
    assert rows(r)[0][7] == "–"  # no CV recorded then
    assert "the teacher timed alone beforehand: 6.930 ms" in markdown(r)
    assert upgrade_report({"latency": {"teacher_median_ms": 1.0, "teacher_solo_median_ms": 2.0}})["latency"]["teacher_solo_median_ms"] == 2.0


def test_load_and_int8_notes():
    r = _report()
    r["latency"].update(load_average=[3.5, 4.0], cores=2, notes=["the load average reached 4.0 on 2 cores while timing: other work"])
    r["students"][0]["int8"] = {"top1_int8": 96.0, "top1_delta": -3.4, "latency_ms": 0.03, "latency_speedup_vs_teacher": 7.0,
                                "weights_why": "7-bit weights (reduce_range): this x86 CPU has no VNNI",
                                "agreement": {"agree": 1784, "images": 2004}}
    notes = report_notes(r)
    assert "The load average reached 4.0 on 2 cores while timing: other work." in notes
    int8 = [n for n in notes if n.startswith("INT8 a:")][0]
    assert "7-bit weights (reduce_range)" in int8 and "on 1784 of 2004 test images" in int8 and "this CPU's" in int8
    md = markdown(r)
    assert "load average 3.5 before, 4.0 after, on 2 cores" in md and int8 in md


def test_atc_report_refuses_to_merge_other_data(tmp_path):
    for name, r in (("x", _report(data="cifar10")), ("demo", _report())):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(r))
    r = run_atc("report", str(tmp_path / "x"), str(tmp_path / "demo"), "--out", str(tmp_path / "merged"))
    assert_error(r, "were run on different data")
    assert not (tmp_path / "merged").exists()
