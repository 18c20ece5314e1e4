"""Issue 21's closing ask: twenty more odd inputs, probed beyond the issue's list (docs/reliability.md,
"Twenty more"). Each test is one of them, asserting the behaviour after the fix."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from compressor.config import load_config
from compressor.data import folders
from compressor.derive.candidates import StudentChoice
from compressor.errors import CheckpointError, ConfigError, DataError, ModelError
from compressor.models.checkpoint import load_model, save_checkpoint
from compressor.models.registry import parse_arch
from compressor.models.spec import ModelSpec
from tests.helpers import assert_error, make_image_folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_teacher):
    root = tmp_path_factory.mktemp("twenty")
    make_image_folder(root / "tiny", per_class=4)
    tiny_teacher("wrn-10-1", 3, 16, path=root / "teacher.pt")
    return root


# 1, 2, 3: a folder where a file is written (it failed only after the work: IsADirectoryError)
@pytest.mark.slow
def test_1_2_3_a_folder_as_a_file_output_is_refused_before_any_work(atc, world, tmp_path):
    (tmp_path / "d").mkdir()
    assert_error(atc("train", "--arch", "wrn-10-1", "--data", str(world / "tiny"), "--overwrite", "--out", str(tmp_path / "d")),
                 "is a folder; pass the checkpoint file to write")
    assert_error(atc("export", str(world / "teacher.pt"), "--overwrite", "--out", str(tmp_path / "d")),
                 "is a folder; pass the file to write")
    (tmp_path / "tb").write_text("a file")
    r = atc("train", "--arch", "wrn-10-1", "--data", str(world / "tiny"), "--tensorboard", str(tmp_path / "tb"),
            "--out", str(tmp_path / "t.pt"))
    assert_error(r, f"--tensorboard {tmp_path / 'tb'} is a file; pass a folder")
    assert os.listdir(tmp_path / "d") == [] and not (tmp_path / "t.pt.state").exists()


# 4: the same student twice trained twice into one folder, the second over the first
def test_4_a_student_named_twice_is_refused():
    with pytest.raises(ConfigError, match="--student 'WRN-10-1 ' is named twice; name each student once"):
        StudentChoice(names=("wrn-10-1", "WRN-10-1 "))
    assert StudentChoice(names=("wrn-10-1", "wrn-16-1")).names == ("wrn-10-1", "wrn-16-1")


# 5: `atc export t.pt --out t.pt --overwrite` replaced the checkpoint with its own ONNX export
def test_5_exporting_a_checkpoint_over_itself_is_refused(atc, world, tmp_path):
    import shutil

    shutil.copy(world / "teacher.pt", tmp_path / "t.pt")
    before = (tmp_path / "t.pt").read_bytes()
    r = atc("export", str(tmp_path / "t.pt"), "--out", str(tmp_path / "t.pt"), "--overwrite")
    assert_error(r, f"--out {tmp_path / 't.pt'} is the checkpoint being exported; pass another --out")
    assert (tmp_path / "t.pt").read_bytes() == before


# 6: ATC_CACHE_DIR= (empty) wrote decode caches into the current folder
def test_6_an_empty_cache_dir_variable_means_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("ATC_CACHE_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert folders.cache_dir() == tmp_path / ".cache" / "atc"


# 7: --arch dir.py:Net where dir.py is a folder said "does not exist"
def test_7_a_folder_named_as_model_file(tmp_path):
    (tmp_path / "dir.py").mkdir()
    with pytest.raises(ModelError, match=r"model file .*dir.py is a folder, not a Python file"):
        parse_arch(f"{tmp_path / 'dir.py'}:Net")


# 8: --preset /dev/null said "does not exist"
def test_8_a_preset_that_is_no_regular_file():
    with pytest.raises(ConfigError, match="preset /dev/null is not a regular file"):
        load_config("/dev/null")


# 9: a dangling link named as the model said "unknown architecture"
def test_9_a_broken_link_as_the_model(atc, tmp_path):
    (tmp_path / "model.pt").symlink_to(tmp_path / "gone.pt")
    r = atc("profile", str(tmp_path / "model.pt"))
    assert_error(r, f"{tmp_path / 'model.pt'} is a symbolic link to {tmp_path / 'gone.pt'}, which does not exist")


# 10: `atc models PATTERN` with no match printed an empty table, exit 0
def test_10_a_model_pattern_without_a_match(atc):
    assert_error(atc("models", "no-such-net*"), "no architecture matches 'no-such-net*'")


# 11: --input-size 3x99999x99999 ran a forward pass that allocates ~120 GB
def test_11_an_input_size_beyond_reason_is_refused(atc, world):
    assert_error(atc("profile", str(world / "teacher.pt"), "--input-size", "3x99999x99999"),
                 "--input-size '3x99999x99999' is larger than atc takes (at most 64 channels and 4096 pixels a side)")


# 12: a training subset without some classes trained silently
def test_12_a_subset_missing_classes_gets_a_note(atc, world, tmp_path):
    r = atc("train", "--arch", "wrn-10-1", "--data", str(world / "tiny"), "--preset", "demo", "--epochs", "1",
            "--train-subset", "1", "--out", str(tmp_path / "t.pt"))
    assert r.returncode == 0, r.stderr
    assert "note: the training images cover 1 of the 3 classes (data.train_subset 1); 2 class(es) are never taught" in r.stderr


# 13: class names holding a newline broke the teacher/data note over two lines
def test_13_class_names_with_a_newline_are_escaped_in_notes(world, tmp_path):
    from compressor.load import load_teacher_and_data
    from tests.helpers import Messages

    data = make_image_folder(tmp_path / "d", per_class=3)
    for split in ("train", "test"):
        (data / split / "class2").rename(data / split / "cat\nx")
    msgs = Messages()
    load_teacher_and_data(world / "teacher.pt", data, load_config("demo"), reporter=msgs)
    note = [m for m in msgs.lines if "not named like" in m]
    assert note and "\n" not in note[0] and "'cat\\nx'" in note[0]


# 14: a teacher whose metrics.history is not a list crashed compress at the very end (plotting the curves)
@pytest.mark.parametrize("metrics, field", [({"history": "epochs"}, "metrics.history"), ({"top1": "good"}, "metrics.top1")])
def test_14_mistyped_teacher_metrics_are_named_at_load(tmp_path, metrics, field):
    spec = ModelSpec.for_arch("wrn-10-1", 3, input_size=(3, 16, 16))
    save_checkpoint(tmp_path / "t.pt", spec.build(), spec, metrics)
    with pytest.raises(CheckpointError, match=f"field '{field}' must be"):
        load_model(tmp_path / "t.pt")


# 15: ATC_DATA_BUDGET_MB=-5 streamed everything, nan said "not a number" (it is one)
def test_15_a_negative_data_budget(monkeypatch):
    from compressor.data.budget import memory_budget

    monkeypatch.setenv("ATC_DATA_BUDGET_MB", "-5")
    with pytest.raises(DataError, match=r"ATC_DATA_BUDGET_MB='-5' is not a number of megabytes \(finite, 0 or more\)"):
        memory_budget(torch.device("cpu"))


# 16, 17: stored class names of the wrong count, a zero std (the input would be divided by zero)
@pytest.mark.parametrize("change, phrase", [({"class_names": ["a", "b"]}, "spec field 'class_names' must be a list of 3 names"),
                                            ({"std": [0.2, 0.0, 0.2]}, "spec field 'std' must be positive")])
def test_16_17_stored_normalisation_and_names_are_checked(tmp_path, change, phrase):
    spec = ModelSpec.for_arch("wrn-10-1", 3, input_size=(3, 16, 16), mean=[0.1] * 3, std=[0.2] * 3)
    save_checkpoint(tmp_path / "t.pt", spec.build(), spec)
    blob = torch.load(tmp_path / "t.pt", weights_only=True)
    blob["spec"].update(change)
    torch.save(blob, tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match=phrase):
        load_model(tmp_path / "t.pt")


# 18: a finished student whose metrics.jsonl was removed: compress --resume died in a FileNotFoundError
@pytest.mark.slow
def test_18_a_finished_student_without_its_metrics_file_resumes(atc, world, tmp_path):
    out = tmp_path / "run"
    args = ["compress", "--teacher", str(world / "teacher.pt"), "--data", str(world / "tiny"), "--preset", "demo",
            "--student", "wrn-10-1", "--epochs", "1", "--threads", "1", "--out", str(out)]
    assert atc(*args).returncode == 0
    (out / "students" / "wrn-10-1-at_kd" / "metrics.jsonl").unlink()
    r = atc(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert (out / "students" / "wrn-10-1-at_kd" / "metrics.jsonl").read_text().count("\n") == 1


# 19: a state of another data folder with the same image counts resumed silently (covered in
# test_run_identity.py::test_train_resume_with_another_data_folder_is_refused)


# 20: a 1-channel teacher on RGB data was told to "set data.image_size"
def test_20_a_teacher_of_other_channels_is_told_so(tmp_path, world):
    from compressor.data.open import open_dataset
    from compressor.load import check_compatible

    data = open_dataset(world / "tiny", image_size=16)
    spec = replace(ModelSpec.for_arch("wrn-10-1", 3), input_size=(1, 16, 16))
    with pytest.raises(DataError, match="the teacher takes 1-channel images but the data is 3-channel"):
        check_compatible(spec, data)
