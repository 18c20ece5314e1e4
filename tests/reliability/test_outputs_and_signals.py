"""Issue 21, points 7, 8, 9, 10, 12 and 13: outputs that cannot be written, signals while exporting and
measuring, temporaries left by killed runs, models whose forward returns no single tensor, and the
inputs that got a wrong or missing explanation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from compressor import fileio
from compressor.config import load_config
from compressor.errors import AtcError, ConfigError
from compressor.report.build import read_report
from compressor.studies.sweep import parse_grid
from tests.helpers import assert_error, make_image_folder

TUPLE_NET = '''
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        f = self.conv(x).relu().mean((2, 3))
        return self.fc(f), f  # logits and features, as many user models do


class DictNet(Net):
    def forward(self, x):
        logits, f = super().forward(x)
        return {"logits": logits, "features": f}
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_teacher):
    root = tmp_path_factory.mktemp("round3")
    make_image_folder(root / "tiny", per_class=4)
    tiny_teacher("wrn-10-1", 3, 16, path=root / "teacher.pt")
    (root / "nets.py").write_text(TUPLE_NET)
    return root


def temporaries(folder):
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith(".atc-"))


# --- point 9: models that return a tuple or a dict (models/outputs.ensure_logits, issue 22's helper) --


BAD_NET = TUPLE_NET + '''

class FeaturesFirst(Net):
    def forward(self, x):
        logits, f = super().forward(x)
        return f.unsqueeze(1), logits  # no logits where atc looks


class NoLogits(Net):
    def forward(self, x):
        logits, f = super().forward(x)
        return {"scores": logits}
'''


@pytest.mark.parametrize("cls, what", [pytest.param("Net", "a tuple of 2; atc uses its first element (a 2×3 tensor) as the logits",
                                                    marks=pytest.mark.slow),
                                       ("DictNet", "a dict with keys logits, features; atc uses its 'logits' entry")])
def test_a_model_returning_logits_in_a_tuple_or_a_dict_trains_and_exports_on_them(atc, world, tmp_path, cls, what):
    arch = f"{world / 'nets.py'}:{cls}"
    r = atc("train", "--arch", arch, "--data", str(world / "tiny"), "--preset", "demo", "--epochs", "1",
            "--out", str(tmp_path / "t.pt"))
    assert r.returncode == 0, r.stderr  # it crashed in the loss
    assert f"{cls} returns {what}" in r.stderr
    r = atc("export", str(tmp_path / "t.pt"), "--arch", arch, "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 0, r.stderr  # it crashed in the parity check

    import onnx

    assert [o.name for o in onnx.load(str(tmp_path / "m.onnx")).graph.output] == ["logits"]


@pytest.mark.parametrize("cls, phrase", [("FeaturesFirst", "returns a 2×1×8 tensor for a batch of 2; atc needs N×classes logits"),
                                         ("NoLogits", "returns a dict with keys scores; atc needs its logits")])
def test_a_model_without_logits_where_atc_looks_is_one_line(atc, tmp_path, cls, phrase):
    (tmp_path / "bad.py").write_text(BAD_NET)
    r = atc("train", "--arch", f"{tmp_path / 'bad.py'}:{cls}", "--data", "digits", "--set", "data.image_size=16",
            "--out", str(tmp_path / "t.pt"))
    assert_error(r, f"{cls} {phrase}", only_line=False)
    assert not (tmp_path / "t.pt").exists() and not (tmp_path / "t.pt.state").exists()


# --- point 8: no empty .state folder ----------------------------------------------------------


def test_a_run_failing_at_its_first_batch_leaves_no_state_folder(atc, world, tmp_path):
    prelude = ("import compressor.distill.loop as loop\n"
               "def boom(*a, **k):\n"
               "    raise OverflowError('Overflow when unpacking long long')\n"
               "loop.train_one_epoch = boom\n")
    r = atc("train", "--arch", "wrn-10-1", "--data", str(world / "tiny"), "--preset", "demo", "--epochs", "1",
            "--out", str(tmp_path / "sub" / "t.pt"), prelude=prelude)
    assert r.returncode != 0
    assert not (tmp_path / "sub" / "t.pt.state").exists()


def test_kept_only_if_used_keeps_what_was_written(tmp_path):
    with pytest.raises(RuntimeError):
        with fileio.kept_only_if_used(tmp_path / "a" / "b"):
            raise RuntimeError
    assert not (tmp_path / "a").exists()
    with pytest.raises(RuntimeError):
        with fileio.kept_only_if_used(tmp_path / "c" / "d") as d:
            (d / "train_state.pt").write_bytes(b"x")
            raise RuntimeError
    assert (tmp_path / "c" / "d" / "train_state.pt").exists()


# --- point 10: outputs and inputs read back ---------------------------------------------------


def test_a_dangling_symlink_as_out_is_named(atc, world, tmp_path):
    (tmp_path / "run").symlink_to(tmp_path / "gone")
    r = atc("compress", "--teacher", str(world / "teacher.pt"), "--data", str(world / "tiny"), "--preset", "demo",
            "--out", str(tmp_path / "run"))
    assert_error(r, f"--out {tmp_path / 'run'} is a symbolic link to {tmp_path / 'gone'}, which does not exist")
    (tmp_path / "t.pt").symlink_to(tmp_path / "gone.pt")
    r = atc("train", "--arch", "wrn-10-1", "--data", str(world / "tiny"), "--out", str(tmp_path / "t.pt"))
    assert_error(r, "is a symbolic link to")


def test_a_folder_as_the_checkpoint_or_onnx_out_is_named(atc, world, tmp_path):
    (tmp_path / "dir").mkdir()
    r = atc("train", "--arch", "wrn-10-1", "--data", str(world / "tiny"), "--overwrite", "--out", str(tmp_path / "dir"))
    assert_error(r, f"--out {tmp_path / 'dir'} is a folder; pass the checkpoint file to write")
    r = atc("export", str(world / "teacher.pt"), "--overwrite", "--out", str(tmp_path / "dir"))
    assert_error(r, f"--out {tmp_path / 'dir'} is a folder; pass the file to write")


def test_a_huge_image_size_is_refused_before_any_allocation(atc, tmp_path):
    with pytest.raises(ConfigError, match=r"data.image_size 20000 is larger than atc trains on \(at most 4096"):
        load_config("cifar", ["data.image_size=20000"])
    r = atc("train", "--arch", "wrn-10-1", "--data", "digits", "--set", "data.image_size=20000", "--out", str(tmp_path / "t.pt"))
    assert_error(r, "data.image_size 20000 is larger than atc trains on")


def test_generated_data_that_would_not_fit_the_ram_is_refused(monkeypatch):
    from compressor.data import budget
    from compressor.data import open as door
    from compressor.errors import DataError

    monkeypatch.setattr(budget, "available_ram", lambda: 1 << 30)
    with pytest.raises(DataError, match=r"data.image_size 1024 would make digits take 28 GB while it is built"):
        door.open_dataset("digits", image_size=1024)


@pytest.mark.parametrize("content, phrase", [
    ("{}", "report.json: field 'command' is missing"),
    ("[]", "report.json: the report must be a JSON object, got list"),
    ('{"x": ', "report.json is not valid JSON"),
])
def test_a_report_json_that_is_no_report_is_named(atc, tmp_path, content, phrase):
    (tmp_path / "report.json").write_text(content)
    with pytest.raises(AtcError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        read_report(tmp_path)
    assert_error(atc("report", str(tmp_path)), phrase)


def test_a_report_json_with_a_mistyped_student_field_is_named(tmp_path):
    from dataclasses import fields

    from compressor.report.build import Report

    report = {f.name: "x" if f.type == "str" else 1 for f in fields(Report) if f.name != "published"}  # optional: absent when unset
    report.update(config={}, data={}, latency={}, environment={}, units={},
                  teacher={"name": "t", "params": 1, "gmacs": 1.0, "gflops": 2.0, "top1": 1.0, "latency_ms": 1.0},
                  students=[{"name": "s", "top1": "high"}])
    (tmp_path / "report.json").write_text(json.dumps(report))
    with pytest.raises(AtcError, match=r"field 'students\[0\]\.method' is missing"):
        read_report(tmp_path)


# --- point 7: the rest ------------------------------------------------------------------------


def test_a_dataset_of_one_class_is_refused(atc, tmp_path):
    make_image_folder(tmp_path / "one", classes=1, per_class=4)
    r = atc("train", "--arch", "wrn-10-1", "--data", str(tmp_path / "one"), "--out", str(tmp_path / "t.pt"))
    assert_error(r, "has one class (class0); a classifier learns nothing from one class", only_line=False)


def test_overwrite_with_resume_is_refused(atc, world, tmp_path):
    for cmd in (["train", "--arch", "wrn-10-1", "--out", str(tmp_path / "t.pt")],
                ["compress", "--teacher", str(world / "teacher.pt"), "--out", str(tmp_path / "run")]):
        r = atc(*cmd, "--data", str(world / "tiny"), "--overwrite", "--resume")
        assert_error(r, "--resume continues the run in --out and --overwrite starts it again from nothing; pass one of them")
    assert not (tmp_path / "run").exists() and not (tmp_path / "t.pt.state").exists()


@pytest.mark.parametrize("grid", [["beta=1e3,1000"], ["attention=sum-p:2,sum-p:2.0"], ["lr=0.1,.1"]])
def test_a_grid_with_one_value_twice_in_two_spellings_is_refused(grid):
    with pytest.raises(ConfigError, match="repeats a value .* are the same setting"):
        parse_grid(grid)


@pytest.mark.slow
def test_more_threads_than_cores_gets_a_note(atc, world):
    r = atc("profile", str(world / "teacher.pt"), "--threads", "1000", "--min-time", "0", "--runtimes", "torch-cpu")
    assert r.returncode == 0, r.stderr
    assert f"note: --threads 1000 is more than the {os.cpu_count()} CPU core(s) here" in r.stderr
    r = atc("profile", str(world / "teacher.pt"), "--threads", "1", "--min-time", "0", "--runtimes", "torch-cpu")
    assert "is more than the" not in r.stderr


# --- points 12 and 13: signals, temporaries, full disks ---------------------------------------


def _sigterm_in(module: str, name: str, tmpdir) -> str:
    return (f"import os, signal, tempfile, {module} as m\n"
            f"tempfile.tempdir = {str(tmpdir)!r}\n"
            f"orig = m.{name}\n"
            "def term(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return orig(*a, **k)\n"
            f"m.{name} = term\n")


def test_sigterm_while_exporting_is_one_line_and_leaves_nothing(atc, world, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    r = atc("export", str(world / "teacher.pt"), "--out", str(tmp_path / "s.onnx"),
            prelude=_sigterm_in("compressor.export.onnx", "check_parity", scratch))
    assert_error(r, f"stopped while exporting; {tmp_path / 's.onnx'} was not written and its temporary files are removed",
                 code=143)
    assert sorted(os.listdir(tmp_path)) == ["tmp"] and os.listdir(scratch) == []


@pytest.mark.slow
def test_sigterm_while_measuring_is_handled_like_ctrl_c(atc, world, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "run"
    r = atc("compress", "--teacher", str(world / "teacher.pt"), "--data", str(world / "tiny"), "--preset", "demo",
            "--student", "wrn-10-1", "--epochs", "1", "--threads", "1", "--out", str(out),
            prelude=_sigterm_in("compressor.measure", "compare_latency", scratch))
    line = assert_error(r, "stopped while exporting and measuring; the trained students are kept in", code=143, only_line=False)
    assert "--resume to finish the report" in line
    assert temporaries(out) == [] and os.listdir(scratch) == []  # the teacher's ONNX scratch folder is gone too
    assert (out / "students" / "wrn-10-1-at_kd" / "student.pt").exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_every_temporary_name_atc_makes_is_cleaned_after_a_kill(tmp_path):
    pid = _dead_pid()
    left = [f".student.onnx.{pid}.abc123.tmp.onnx", f"..student.onnx.{pid}.abc123.tmp.onnx.{pid}.def456.tmp.onnx",
            f".atc-probe-{pid}-xyz"]
    for name in left:
        (tmp_path / name).write_bytes(b"half")
    alive = f".student.onnx.{os.getpid()}.mine.tmp.onnx"
    (tmp_path / alive).write_bytes(b"mine")
    (tmp_path / "notes.tmp").write_bytes(b"the user's")
    fileio.write_bytes(tmp_path / "student.onnx", b"new")
    assert sorted(os.listdir(tmp_path)) == sorted([alive, "notes.tmp", "student.onnx"])
    scratch = tmp_path / "sys-tmp"
    (scratch / f"{fileio.SCRATCH_PREFIX}{pid}-q").mkdir(parents=True)
    (scratch / f"{fileio.SCRATCH_PREFIX}{pid}-q" / "teacher.onnx").write_bytes(b"x")
    import tempfile

    before, tempfile.tempdir = tempfile.tempdir, str(scratch)
    try:
        with fileio.scratch_dir() as mine:
            assert mine.exists() and mine.name.startswith(f"{fileio.SCRATCH_PREFIX}{os.getpid()}-")
    finally:
        tempfile.tempdir = before
    assert os.listdir(scratch) == []


FULL_DISK_EXPORT = """
import errno, torch
def full(*a, **k):
    raise RuntimeError("failed to serialize the model") from OSError(errno.ENOSPC, "No space left on device")
torch.onnx.export = full
"""


def test_a_full_disk_during_export_says_so(atc, world, tmp_path):
    r = atc("export", str(world / "teacher.pt"), "--out", str(tmp_path / "s.onnx"), prelude=FULL_DISK_EXPORT)
    assert_error(r, f"no space left on the device while writing {tmp_path / 's.onnx'}; free some space and run the command again")
    assert "cannot trace" not in r.stderr and os.listdir(tmp_path) == []


def _full_tensorboard_after(writes: int) -> str:
    """The event file's record writer fails with ENOSPC from write number ``writes`` on (in tensorboard's thread)."""
    return ("import errno, tensorboard.summary.writer.record_writer as rw\n"
            "orig, seen = rw.RecordWriter.write, [0]\n"
            "def full(self, data):\n"
            "    seen[0] += 1\n"
            f"    if seen[0] >= {writes}:\n"
            "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "    return orig(self, data)\n"
            "rw.RecordWriter.write = full\n")


@pytest.mark.parametrize("writes, kept", [
    (1, "nothing was trained yet"),
    (3, "the training state of epoch 1 is saved, so --resume continues (with another --tensorboard folder, or without it)"),
])
def test_a_full_tensorboard_folder_is_one_line_without_a_thread_traceback(atc, world, tmp_path, writes, kept):
    pytest.importorskip("tensorboard")
    r = atc("train", "--arch", "wrn-10-1", "--data", str(world / "tiny"), "--preset", "demo", "--epochs", "2",
            "--tensorboard", str(tmp_path / "tb"), "--out", str(tmp_path / "t.pt"), prelude=_full_tensorboard_after(writes))
    line = assert_error(r, f"no space left on the device while writing {tmp_path / 'tb' / 'wrn-10-1'}; {kept}", only_line=False)
    assert "Exception in thread" not in r.stderr and "Traceback" not in r.stderr, line
