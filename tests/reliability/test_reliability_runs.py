"""Round 2 of bad inputs and interrupted runs that reach the pipeline: INT8 export on data of another
size, two runs on one --out, an unwritable --out, a pickled whole model, Ctrl-C while the report is
measured, a student larger than its teacher, class names that differ, training time after --resume."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch
from PIL import Image

from compressor import fileio
from compressor.config import load_config
from compressor.data.open import open_dataset
from compressor.models.spec import ModelSpec
from tests.helpers import Messages, assert_error, make_image_folder


def _grey_folder(root, size=28, classes=3, per_class=4):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), mode="L").save(d / f"{i}.png")
    return root


@pytest.mark.slow
def test_int8_export_resizes_calibration_images_to_the_model_input(atc, files, tmp_path):
    grey = _grey_folder(tmp_path / "grey")
    out = tmp_path / "s.onnx"
    r = atc("export", str(files["teacher"]), "--out", str(out), "--int8", "--calib-data", str(grey), "--calib-images", "8",
            "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert out.exists() and (tmp_path / "s.int8.onnx").exists() and "calibrated on 8 images" in r.stdout


def test_int8_export_with_other_classes_writes_nothing(atc, files, tmp_path):
    out = tmp_path / "s.onnx"
    r = atc("export", str(files["teacher"]), "--out", str(out), "--int8", "--calib-data", str(files["four"]))
    assert_error(r, "the model has 3 classes but the data has 4")
    assert not out.exists() and not (tmp_path / "s.int8.onnx").exists()


def test_a_second_run_on_a_locked_out_folder_is_refused(atc, files, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with fileio.folder_lock(out):  # a first run is writing into it
        r = atc("compress", "--teacher", str(files["teacher"]), "--data", str(files["tiny"]), "--preset", "demo",
                "--student", "wrn-10-1", "--epochs", "1", "--out", str(out))
    line = assert_error(r, "another atc run (pid ", only_line=False)
    assert f"is writing into {out}; wait for it to finish or choose another --out" in line
    assert list(out.iterdir()) == []  # the second run wrote nothing; the first one's lock file left with it
    with fileio.folder_lock(out):  # released by the refused run, and free again
        pass


READ_ONLY = """
import errno, tempfile
def _read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")
tempfile.NamedTemporaryFile = _read_only
"""


@pytest.mark.parametrize("command", ["train", "compress"])
def test_read_only_out_fails_before_any_work(atc, files, tmp_path, command):
    args = (["train", "--arch", "wrn-10-1", "--out", str(tmp_path / "t.pt")] if command == "train" else
            ["compress", "--teacher", str(files["teacher"]), "--student", "wrn-10-1", "--out", str(tmp_path / "run")])
    r = atc(*args, "--data", str(files["tiny"]), "--preset", "demo", "--epochs", "1", prelude=READ_ONLY)
    assert_error(r, "(read-only file system); choose a folder you can write to")  # the only line: no data was loaded


def test_a_pickled_whole_model_is_refused_in_one_line_where_it_cannot_be_rebuilt(atc, files, tmp_path):
    import torchvision

    path = tmp_path / "whole.pt"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=3), path)
    r = atc("derive", "--teacher", str(path), "--trust-checkpoint")
    assert_error(r, "is a pickled nn.Module (MobileNetV3, loaded because of --trust-checkpoint): atc can run it but not rebuild "
                    "its architecture by name; save its weights with python -c")
    r = atc("compress", "--teacher", str(path), "--trust-checkpoint", "--data", str(files["tiny"]), "--dry-run")
    assert_error(r, ".state_dict(), 'teacher_sd.pt')\" and pass --teacher teacher_sd.pt")
    r = atc("profile", str(path), "--trust-checkpoint", "--runtimes", "torch-cpu", "--min-time", "0", "--json")
    assert r.returncode == 0, r.stderr  # profiling needs no rebuild: the module itself runs
    assert json.loads(r.stdout)["params"]["total"] > 0


CTRL_C_WHILE_MEASURING = """
import compressor.measure as measure
def _interrupted(*args, **kwargs):
    raise KeyboardInterrupt
measure.measure_latency = _interrupted
"""


@pytest.mark.slow
def test_ctrl_c_while_measuring_says_what_was_kept_and_resume_finishes(atc, files, tmp_path):
    out = tmp_path / "run"
    args = ["compress", "--teacher", str(files["teacher"]), "--data", str(files["tiny"]), "--preset", "demo", "--student", "wrn-10-1",
            "--epochs", "1", "--threads", "1", "--out", str(out)]
    r = atc(*args, prelude=CTRL_C_WHILE_MEASURING)
    line = assert_error(r, "stopped while exporting and measuring; the trained students are kept in", code=130, only_line=False)
    assert "run the same command with --resume to finish the report without training again" in line
    student = out / "students" / "wrn-10-1-at_kd" / "student.pt"
    trained = student.stat().st_mtime_ns
    r = atc(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert student.stat().st_mtime_ns == trained and (out / "report.json").exists()


@pytest.mark.slow
def test_a_student_larger_than_its_teacher_gets_a_note(files, tmp_path):
    from compressor.derive.candidates import StudentChoice
    from compressor.dryrun import dry_run

    msgs = Messages()
    dry_run(files["teacher"], files["tiny"], load_config("demo"), StudentChoice(names=["wrn-16-2"]), reporter=msgs)
    note = [m for m in msgs.lines if "is larger than the teacher" in m]
    assert note and "student wrn-16-2 is larger than the teacher wrn-10-1:" in note[0] and "it will not be faster" in note[0]


def test_teacher_class_names_that_differ_from_the_data_get_a_note(files, tmp_path, tiny_teacher):
    from compressor.load import load_teacher_and_data

    tiny_teacher("wrn-10-1", 3, 16, path=tmp_path / "t.pt", mean=0.1, std=0.2, class_names=["a", "b", "c"])
    msgs = Messages()
    load_teacher_and_data(tmp_path / "t.pt", files["tiny"], load_config("demo"), reporter=msgs)
    assert any("the teacher's classes (a, b, c) are not named like the data's (class0, class1, class2)" in m for m in msgs.lines)
    msgs = Messages()
    load_teacher_and_data(files["teacher"], files["tiny"], load_config("demo"), reporter=msgs)
    assert not any("not named like" in m for m in msgs.lines)


def test_train_seconds_after_resume_count_the_epochs_before_it(tmp_path):
    from compressor.distill.loop import FitOptions, fit
    from compressor.models.registry import create_model

    data = open_dataset(make_image_folder(tmp_path / "d", per_class=6), image_size=16)
    cfg = load_config("demo", {"train": {"epochs": 2, "batch_size": 6}})
    mean, std = data.channel_stats()

    def run(resume: bool):
        torch.manual_seed(0)
        return fit(create_model("wrn-10-1", 3), data, cfg, tmp_path / "run", mean, std, device=torch.device("cpu"),
                   options=FitOptions(resume=resume))

    first = run(False)
    state_file = tmp_path / "run" / "train_state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state["train_seconds"] == pytest.approx(first.seconds)
    # Pretend the run was killed after epoch 1: keep that epoch's time, then resume the second.
    state.update(epoch=1, history=state["history"][:1], train_seconds=100.0)
    torch.save(state, state_file)
    resumed = run(True)
    assert resumed.seconds > 100.0 and len(resumed.history) == 2


def test_write_probe_maps_errors_to_one_line(tmp_path, monkeypatch):
    import tempfile

    def refuse(*a, **k):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(Exception, match=r"cannot write .*new/t.pt \(permission denied\); choose a folder you can write to"):
        fileio.check_writable(tmp_path / "new" / "t.pt")


def test_the_schedule_says_which_milestones_a_short_run_uses():
    from compressor.distill.loop import say_schedule

    msgs = Messages()
    say_schedule(load_config("cifar", {"train": {"epochs": 3}}), msgs)
    assert msgs.lines == ["schedule: 3 epochs, lr 0.1, × 0.2 after epochs 1, 2"]  # 60/120/160 of 200 → 1, 2 (not 1, 2, 2)
    msgs = Messages()
    say_schedule(load_config("cifar", {"train": {"epochs": 1}}), msgs)
    assert msgs.lines == ["schedule: 1 epoch, lr 0.1, no drops"]


@pytest.mark.slow
def test_blocks_per_stage_alone_keeps_the_full_width():
    from compressor.derive.candidates import StudentChoice, choose_students

    spec = ModelSpec.for_arch("resnet18-cifar", 3, input_size=(3, 16, 16))
    cfg = load_config("cifar")  # its policy would halve the width
    deep, = choose_students(spec, cfg, StudentChoice(blocks_per_stage=1))
    assert deep.spec.plan.width == {"": 1.0} and deep.spec.plan.removed_blocks
    thin, = choose_students(spec, cfg, StudentChoice(width=0.5, blocks_per_stage=1))
    assert thin.spec.plan.width == {"": 0.5} and thin.gmacs < deep.gmacs


def test_a_mixed_onnxruntime_install_is_named_with_its_repair(monkeypatch):
    import sys
    from importlib import metadata

    from compressor import device
    from compressor.errors import ConfigError

    assert device.onnxruntime().get_available_providers()  # this environment: one build, working
    monkeypatch.setattr(metadata, "version", lambda name: "1.0")  # as if both builds were installed
    with pytest.raises(ConfigError, match="both onnxruntime and onnxruntime-gpu are installed.*pip uninstall -y onnxruntime "
                                          "onnxruntime-gpu, then pip install 'atc\\[cpu\\]'"):
        device.onnxruntime()
    monkeypatch.setattr(device, "ort_builds_installed", lambda: [])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match="onnxruntime is not installed; pip install 'atc\\[cpu\\]'"):
        device.onnxruntime()


def test_profile_flags_timings_that_vary_too_much():
    from compressor.report.tables import noisy_profile_note

    steady = {"runtime": "ort-cpu", "batch_size": 1, "cv": 0.03}
    assert noisy_profile_note([steady]) == ""
    note = noisy_profile_note([steady, {"runtime": "torch-cpu", "batch_size": 8, "cv": 1.36}])
    assert note.startswith("the timings of torch-cpu batch 8 (CV 136%) vary by more than 25% of their mean")
    assert "measure again on an idle machine" in note and "ort-cpu" not in note
