"""A compress run as a newcomer meets it (issue 25): the published student is the rule's, the output
folder holds what the README lists and no lock or finished training state, the Python API is quiet
unless asked, the run says how long it will take, the report carries one teacher latency with each
model's CV and the load average."""

import contextlib
import io
import json

import pytest

from compressor import RunOptions, StudentChoice, compress, load_config
from compressor.events import TextReporter
from compressor.report.pick import pick_student


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_teacher):
    from tests.helpers import make_image_folder

    base = tmp_path_factory.mktemp("published")
    data = make_image_folder(base / "data", classes=3, per_class=12, size=16)
    teacher = tiny_teacher("wrn-10-2")
    cfg = load_config("demo", {"train": {"epochs": 1}})
    out = base / "run"
    said = io.StringIO()
    with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
        report = compress(teacher, str(data), cfg, out, StudentChoice(names=("wrn-10-1", "wrn-10-0.5")), RunOptions(pick="accurate"))
    return out, report.to_dict(), said.getvalue()


@pytest.mark.slow
def test_the_published_student_follows_the_rule_and_its_files_are_at_the_top(run):
    out, report, _ = run
    chosen = pick_student(report["students"], "accurate")
    assert report["published"]["name"] == chosen.name and report["published"]["rule"] == "accurate"
    assert report["published"]["reason"] == chosen.reason
    ckpt = out / report["published"]["checkpoint"]
    assert (out / "student.pt").read_bytes() == ckpt.read_bytes()
    assert (out / "student.onnx").read_bytes() == (ckpt.parent / "student.onnx").read_bytes()
    assert f"Published (student.pt, student.onnx at the top of the output folder): {chosen.name}" in (out / "report.md").read_text()


def test_the_output_folder_holds_the_listed_files_and_no_lock_or_finished_state(run):
    out, report, _ = run
    assert json.loads((out / "report.json").read_text())["published"] == report["published"]
    top = {p.name for p in out.iterdir()}
    assert top == {"report.json", "report.md", "tradeoff.png", "curves.png", "student.pt", "student.onnx", "metrics.jsonl", "students"}
    for s in report["students"]:
        folder = (out / s["checkpoint"]).parent
        assert {p.name for p in folder.iterdir()} == {"student.pt", "student.onnx", "metrics.jsonl"}


def test_one_teacher_latency_with_cvs_and_the_load(run):
    _, report, _ = run
    lat, t = report["latency"], report["teacher"]
    assert "teacher_median_ms" not in lat and lat["teacher_solo_median_ms"] > 0  # the other one, renamed
    assert t["latency_ms"] > 0 and t["latency_cv"] >= 0
    assert all(s["latency_cv"] >= 0 and s["teacher_latency_cv"] >= 0 for s in report["students"])
    assert len(lat["load_average"]) == 2 and lat["cores"] >= 1 and isinstance(lat["notes"], list)
    assert lat["threads"] == 1  # the one default


@pytest.mark.slow
def test_progress_prints_lines_and_keep_state_keeps_the_state(tmp_path, tiny_teacher, tiny_folder, capsys):
    cfg = load_config("demo", {"train": {"epochs": 2}})
    compress(tiny_teacher(), str(tiny_folder), cfg, tmp_path / "loud", StudentChoice(names=("wrn-10-0.5",)), RunOptions(keep_state=True),
             progress=True)
    err = capsys.readouterr().err
    assert "evaluating teacher wrn-10-1 on the" in err and "schedule: 2 epochs" in err
    assert "run: 2 epochs in all, 1 done; after epoch 1: about" in err  # the estimate, after the first epoch
    assert "export, check and time each student against the teacher" in err and "publishing wrn-10-0.5" in err
    assert (tmp_path / "loud" / "students" / "wrn-10-0.5-at_kd" / "train_state.pt").is_file()  # --keep-state
    assert not (tmp_path / "loud" / ".atc.lock").exists()


def test_the_api_is_quiet_by_default(run, tiny_teacher, tiny_folder, capsys):
    from compressor import dry_run

    assert run[2] == ""  # the module's compress() printed nothing
    dry_run(tiny_teacher(), str(tiny_folder), load_config("demo"), StudentChoice(names=("wrn-10-0.5",)))
    assert capsys.readouterr().err == ""


def test_text_reporter_throttles_progress(tmp_path):
    import io

    stream = io.StringIO()
    r = TextReporter(stream, every_s=3600)
    r.task("epoch 1/2", 10)
    for _ in range(10):
        r.advance(1, loss=1.0)
    r.done("epoch 1: top-1 50%")
    assert stream.getvalue().splitlines() == ["epoch 1/2 (10 steps)", "epoch 1: top-1 50%"]
