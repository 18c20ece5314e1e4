"""Issue 21, point 3: a resumed run is the same run or it is refused. The identity ``--resume``
checks holds the teacher (a digest of its weights), the student architecture and the data."""

from __future__ import annotations

import shutil

import pytest
import torch

from compressor.config import load_config
from compressor.data.open import open_dataset
from compressor.distill.state import run_identity
from compressor.models.checkpoint import load_model, weights_digest
from compressor.models.registry import create_model
from tests.helpers import assert_error, make_image_folder

STOP_AFTER_EPOCH_1 = ("import compressor.distill.state as s\n"
                      "orig = s.TrainingState.epoch_done\n"
                      "def once(self, record, seconds):\n"
                      "    orig(self, record, seconds)\n"
                      "    raise SystemExit(9)\n"
                      "s.TrainingState.epoch_done = once\n")


@pytest.fixture
def two_teachers(tmp_path, tiny_teacher):
    """Teachers A and B: the same architecture and classes, other weights."""
    data = make_image_folder(tmp_path / "d", per_class=4)
    a = tiny_teacher("wrn-10-1", 3, 16, path=tmp_path / "a.pt", seed=1)
    b = tiny_teacher("wrn-10-1", 3, 16, path=tmp_path / "b.pt", seed=2)
    return data, a, b


def _compress(teacher, data, out, *more):
    return ["compress", "--teacher", str(teacher), "--data", str(data), "--preset", "demo", "--student", "wrn-10-1",
            "--epochs", "2", "--threads", "1", "--out", str(out), *more]


@pytest.mark.slow
def test_resuming_a_half_trained_student_with_another_teacher_is_refused(atc, two_teachers, tmp_path):
    data, a, b = two_teachers
    out = tmp_path / "run"
    assert atc(*_compress(a, data, out), prelude=STOP_AFTER_EPOCH_1).returncode == 9
    state = out / "students" / "wrn-10-1-at_kd" / "train_state.pt"
    before = state.read_bytes()
    r = atc(*_compress(b, data, out, "--resume"))
    digest_a = weights_digest(load_model(a)[0])[:12]
    line = assert_error(r, f"the training state in {state.parent} was made with teacher={digest_a}", only_line=False)
    assert "resume with the same options and data, or pass --overwrite to start again" in line
    assert state.read_bytes() == before and not (out / "report.json").exists()


@pytest.mark.slow
def test_a_finished_student_of_another_teacher_is_not_reused(atc, two_teachers, tmp_path):
    data, a, b = two_teachers
    out = tmp_path / "run"
    r = atc(*_compress(a, data, out, "--epochs", "1"))
    assert r.returncode == 0, r.stderr
    r = atc(*_compress(b, data, out, "--epochs", "1", "--resume"))
    line = assert_error(r, "student.pt was distilled from another teacher (weights ", only_line=False)
    assert "pass --overwrite to train it again from this teacher, or use another --out" in line
    shutil.copy(a, tmp_path / "a-copy.pt")  # the same weights in another file (another path, another mtime) still resume
    r = atc(*_compress(tmp_path / "a-copy.pt", data, out, "--epochs", "1", "--resume"))
    assert r.returncode == 0 and "already finished; reusing" in r.stderr, r.stderr


def test_train_resume_with_another_data_folder_is_refused(atc, tmp_path):
    d1 = make_image_folder(tmp_path / "d1", per_class=4, seed=0)
    d2 = make_image_folder(tmp_path / "d2", per_class=4, seed=0)
    (d2 / "train" / "class2").rename(d2 / "train" / "zebra")  # the same counts, other classes
    (d2 / "test" / "class2").rename(d2 / "test" / "zebra")
    args = ["train", "--arch", "wrn-10-1", "--preset", "demo", "--epochs", "2", "--out", str(tmp_path / "t.pt")]
    assert atc(*args, "--data", str(d1), prelude=STOP_AFTER_EPOCH_1).returncode == 9
    r = atc(*args, "--data", str(d2), "--resume")
    assert_error(r, "was made with data.classes=['class0', 'class1', 'class2'] (now ['class0', 'class1', 'zebra'])", only_line=False)


def test_the_identity_changes_with_the_teacher_the_student_and_the_labels(tmp_path):
    data = open_dataset(make_image_folder(tmp_path / "d", per_class=4), image_size=16)
    cfg = load_config("demo")
    base = run_identity(cfg, data, create_model("wrn-10-1", 3), {"teacher": "abc"})
    assert base == run_identity(cfg, data, create_model("wrn-10-1", 3), {"teacher": "abc"})  # fresh weights, same shapes
    assert base["student.layers"] != run_identity(cfg, data, create_model("wrn-16-1", 3))["student.layers"]
    flipped = type(data)(**{**data.__dict__, "train_y": data.train_y.flip(0)})
    assert run_identity(cfg, flipped)["data.labels"] != base["data.labels"]
    m = create_model("wrn-10-1", 3)
    d = weights_digest(m)
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] += 1e-3
    assert weights_digest(m) != d
