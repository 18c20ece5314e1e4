"""Issue 21, points 1, 2 and 6: what a stored file may make atc do.

A checkpoint that loads with ``weights_only`` can still hold a recipe that imports a Python file
(family ``file``) or hands a builder arguments that read files or download weights. Each test
plants such a file beside a checkpoint and asserts that the marker the file would write never
appears unless the user allowed it on that command (``--trust-checkpoint`` or the same file named
with ``--arch path.py:Class``). Then: damaged archives and non-finite weights.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from compressor import fileio
from compressor.errors import CheckpointError
from compressor.models.checkpoint import FORMAT, load_model, save_checkpoint
from compressor.models.registry import parse_arch
from compressor.models.spec import ModelSpec
from compressor.models.trust import Trust
from tests.helpers import assert_error, make_image_folder

NET = '''
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.bn1(self.conv1(x)).relu()
        x = self.bn2(self.conv2(x)).relu()
        return self.fc(x.mean((2, 3)))
'''
# The planted file: importing it is running it, and running it leaves a marker beside it.
PLANTED = "import pathlib\npathlib.Path(__file__).with_name('MARKER').write_text('ran')\n" + NET


def net_weights() -> dict[str, torch.Tensor]:
    """Net's state_dict, built from its source without the planted line (so no marker)."""
    scope: dict = {}
    exec(compile(NET, "<net>", "exec"), scope)
    torch.manual_seed(0)
    return scope["Net"](3).state_dict()


def file_checkpoint(path: Path, source: str = "model.py", plan=None, metrics: dict | None = None) -> Path:
    """An atc checkpoint whose spec rebuilds ``Net`` by importing ``source`` (relative: beside it)."""
    spec = {"family": "file", "arch_kwargs": {"path": source, "class_name": "Net"}, "num_classes": 3,
            "class_names": ["class0", "class1", "class2"], "input_size": [3, 16, 16], "mean": [0.1] * 3, "std": [0.2] * 3,
            "plan": plan}
    torch.save({"format": FORMAT, "spec": spec, "state_dict": net_weights(), "metrics": metrics or {}}, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A folder holding the planted model.py, a checkpoint that imports it, a safe zoo teacher and a tiny dataset."""
    root = tmp_path_factory.mktemp("planted")
    (root / "model.py").write_text(PLANTED)
    file_checkpoint(root / "t.pt")
    spec = replace(ModelSpec.for_arch("wrn-10-1", 3), input_size=(3, 16, 16), mean=[0.1] * 3, std=[0.2] * 3,
                   class_names=["class0", "class1", "class2"])
    torch.manual_seed(0)
    save_checkpoint(root / "teacher.pt", spec.build(), spec)
    make_image_folder(root / "tiny", per_class=6)
    return {"root": root, "ckpt": root / "t.pt", "teacher": root / "teacher.pt", "tiny": root / "tiny", "marker": root / "MARKER"}


@pytest.fixture
def clean(world):
    world["marker"].unlink(missing_ok=True)
    yield world
    world["marker"].unlink(missing_ok=True)


REFUSED = "rebuilds its model by importing the Python file 'model.py', which runs its code; pass --arch"


@pytest.mark.parametrize("command", [
    ["profile", "t.pt"],
    ["export", "t.pt", "--out", "s.onnx"],
    ["derive", "--teacher", "t.pt"],
    ["compress", "--teacher", "t.pt", "--data", "tiny", "--preset", "demo", "--dry-run"],
], ids=["profile", "export", "derive", "dry-run"])
def test_a_stored_source_is_never_imported_without_the_users_word(atc, clean, command):
    r = atc(*command, cwd=clean["root"])
    line = assert_error(r, REFUSED, only_line=False)
    assert line.startswith("error: t.pt ") and "--trust-checkpoint if you trust where the checkpoint came from" in line
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr  # before any note: one line
    assert not clean["marker"].exists()
    assert not (clean["root"] / "s.onnx").exists()


def test_the_same_file_named_with_arch_or_trust_loads_it(atc, clean):
    root = clean["root"]
    for allow in (["--arch", "model.py:Net"], ["--arch", str(root / "model.py") + ":Net"], ["--trust-checkpoint"]):
        clean["marker"].unlink(missing_ok=True)
        r = atc("derive", "--teacher", "t.pt", *allow, cwd=root)
        assert r.returncode == 0, r.stderr
        assert clean["marker"].exists()  # the user said so: the file was imported


def test_another_file_named_with_arch_does_not_allow_the_stored_one(atc, clean, tmp_path):
    other = tmp_path / "other.py"
    other.write_text(NET)
    r = atc("profile", "t.pt", "--arch", f"{other}:Net", cwd=clean["root"])
    assert_error(r, REFUSED, only_line=False)
    assert not clean["marker"].exists()


@pytest.mark.slow
def test_a_planted_student_is_not_imported_on_resume_and_trust_passes_on(atc, clean, tmp_path):
    out = tmp_path / "run"
    student = out / "students" / "wrn-10-1-at_kd" / "student.pt"
    student.parent.mkdir(parents=True)
    shutil.copy(clean["root"] / "model.py", student.parent / "model.py")
    file_checkpoint(student, str(student.parent / "model.py"), metrics={"top1": 40.0, "history": [], "method": "at+kd"})
    marker = student.parent / "MARKER"
    before = student.read_bytes()
    args = ["compress", "--teacher", str(clean["teacher"]), "--data", str(clean["tiny"]), "--preset", "demo",
            "--student", "wrn-10-1", "--epochs", "1", "--threads", "1", "--out", str(out), "--resume"]
    r = atc(*args, cwd=tmp_path)
    assert_error(r, "student.pt rebuilds its model by importing the Python file", only_line=False)
    assert not marker.exists() and student.read_bytes() == before
    r = atc(*args, "--trust-checkpoint", cwd=tmp_path)  # point 2: the flag reaches the reload of atc's own outputs
    assert r.returncode == 0, r.stderr
    assert marker.exists() and "already finished; reusing" in r.stderr and (out / "report.json").exists()


def test_a_student_of_a_file_teacher_reloads_with_the_teachers_arch(tmp_path):
    """The honest case the check must keep working: a student derived from a user's own model file
    reloads with the --arch that named that file for the teacher."""
    (tmp_path / "net.py").write_text(NET)
    arch = f"{tmp_path / 'net.py'}:Net"
    spec = replace(ModelSpec.for_arch(arch, 3), input_size=(3, 16, 16))
    save_checkpoint(tmp_path / "s.pt", spec.build(), spec)
    with pytest.raises(CheckpointError, match="importing the Python file"):
        load_model(tmp_path / "s.pt")
    model, loaded, _ = load_model(tmp_path / "s.pt", arch=arch)
    assert loaded.arch_kwargs["path"] == str((tmp_path / "net.py").resolve())
    assert load_model(tmp_path / "s.pt", trust=Trust.given(False, arch))[1].family == "file"


@pytest.mark.parametrize("family, kwargs, phrase", [
    ("timm", {"name": "resnet18", "checkpoint_path": "evil.pth"}, "'checkpoint_path' would read a file"),
    ("timm", {"name": "hf-hub:someone/model"}, "not one of timm's architectures"),
    ("torchvision", {"name": "fasterrcnn_resnet50_fpn"}, "not one of torchvision's classification models"),
    ("torchvision", {"name": "resnet18", "weights": "IMAGENET1K_V1"}, "'weights' would read a file or download"),
    ("compressor.evil", {"name": "x"}, "unknown to this atc"),
    ("file", {"path": 7, "class_name": "Net"}, "arch_kwargs.path"),
    ("wrn", {"depth": 10, "width": 1, "import": "os"}, "do not fit the wrn builder"),
    ("wrn", "depth=10", "must be a dict of plain values"),
])
def test_stored_builder_arguments_that_reach_files_or_modules_are_refused(tmp_path, family, kwargs, phrase):
    if family == "timm":
        pytest.importorskip("timm")
    spec = {"family": family, "arch_kwargs": kwargs, "num_classes": 3, "input_size": [3, 16, 16]}
    torch.save({"format": FORMAT, "spec": spec, "state_dict": {}, "metrics": {}}, tmp_path / "x.pt")
    for trust in (False, True):  # --trust-checkpoint allows a stored file's import, not a download or an unknown family
        with pytest.raises(CheckpointError, match=phrase):
            load_model(tmp_path / "x.pt", trust=trust)


@pytest.mark.parametrize("field, value, phrase", [
    ("num_classes", "ten", "spec field 'num_classes' must be a whole number of at least 1, got 'ten'"),
    ("num_classes", None, "spec field 'num_classes'"),
    ("input_size", [3, 16], "spec field 'input_size' must be [channels, height, width], got [3, 16]"),
    ("mean", [0.1, float("nan"), 0.1], "spec field 'mean' must be 3 finite numbers"),
    ("std", [0.0, 0.2, 0.2], "spec field 'std' must be positive"),
    ("class_names", ["a"], "spec field 'class_names' must be a list of 3 names"),
    ("family", 3, "spec field 'family' must be a string"),
    ("plan", "thin", "spec field 'plan' must be a dict or null"),
])
def test_a_stored_spec_is_validated_field_by_field(tmp_path, field, value, phrase):
    spec = ModelSpec.for_arch("wrn-10-1", 3, input_size=(3, 16, 16))
    save_checkpoint(tmp_path / "s.pt", spec.build(), spec)
    blob = torch.load(tmp_path / "s.pt", weights_only=True)
    blob["spec"][field] = value
    torch.save(blob, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="^" + str(tmp_path / "s.pt").replace(".", r"\.") + ": ") as err:
        load_model(tmp_path / "s.pt")
    assert phrase in str(err.value) and "\n" not in str(err.value)


def test_a_spec_without_a_field_or_weights_is_named(tmp_path):
    spec = ModelSpec.for_arch("wrn-10-1", 3, input_size=(3, 16, 16))
    save_checkpoint(tmp_path / "s.pt", spec.build(), spec)
    blob = torch.load(tmp_path / "s.pt", weights_only=True)
    del blob["spec"]["arch_kwargs"]
    torch.save(blob, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="spec field 'arch_kwargs' is missing"):
        load_model(tmp_path / "a.pt")
    blob = torch.load(tmp_path / "s.pt", weights_only=True)
    blob["spec"]["arch_kwargs"] = {"depth": 7, "width": 1}
    torch.save(blob, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="its spec does not build a model"):
        load_model(tmp_path / "b.pt")
    blob = torch.load(tmp_path / "s.pt", weights_only=True)
    blob["state_dict"] = [1, 2]
    torch.save(blob, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="field 'state_dict' must map names to tensors"):
        load_model(tmp_path / "c.pt")


# --- point 6: damaged archives, non-finite weights ------------------------------------------


def _zero_inside_a_tensor(path: Path) -> None:
    """Zero 64 bytes in the middle of the largest tensor record, leaving the zip's layout intact."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[start: start + 64] = bytes(64)
    path.write_bytes(bytes(raw))


def test_a_checkpoint_with_a_wrong_crc_is_refused_in_one_line(atc, tmp_path):
    spec = ModelSpec.for_arch("wrn-10-1", 3, input_size=(3, 16, 16))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "s.pt", spec.build(), spec)
    torch.load(tmp_path / "s.pt", weights_only=True)  # torch itself reads it without a word
    _zero_inside_a_tensor(tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)  # ... also after the damage
    assert fileio.damaged_record(tmp_path / "s.pt") is not None
    r = atc("export", str(tmp_path / "s.pt"), "--out", str(tmp_path / "s.onnx"))
    line = assert_error(r, "fails the archive's CRC check (the bytes changed after it was saved); re-save or re-download it", only_line=False)
    assert line.startswith(f"error: {tmp_path / 's.pt'} is damaged: its record ") and "/data/" in line
    assert not (tmp_path / "s.onnx").exists()


def test_an_intact_checkpoint_and_a_legacy_file_pass_the_crc_check(tmp_path):
    spec = ModelSpec.for_arch("wrn-10-1", 3, input_size=(3, 16, 16))
    save_checkpoint(tmp_path / "s.pt", spec.build(), spec)
    assert fileio.damaged_record(tmp_path / "s.pt") is None
    torch.save({"w": torch.ones(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert fileio.damaged_record(tmp_path / "legacy.pt") is None  # no zip, no checksum: torch.load judges it


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_teacher_with_non_finite_weights_is_refused_naming_the_parameter(atc, world, tmp_path, bad):
    spec = replace(ModelSpec.for_arch("wrn-10-1", 3), input_size=(3, 16, 16), mean=[0.1] * 3, std=[0.2] * 3)
    model = spec.build()
    name = [n for n, _ in model.named_parameters()][5]
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[3] = bad
    save_checkpoint(tmp_path / "nan.pt", model, spec)
    kind = "NaN" if bad != bad else "infinity"
    for args in (["compress", "--teacher", str(tmp_path / "nan.pt"), "--data", str(world["tiny"]), "--preset", "demo",
                  "--epochs", "1", "--out", str(tmp_path / "run")],
                 ["export", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "n.onnx")]):
        r = atc(*args)
        assert_error(r, f"nan.pt has non-finite weights ({name} holds {kind}); it cannot be used", only_line=False)
        assert "diverged" not in r.stderr and "parity" not in r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "n.onnx").exists()


def test_trust_given_collects_the_named_file(tmp_path):
    (tmp_path / "net.py").write_text(NET)
    t = Trust.given(False, f"{tmp_path}/net.py:Net")
    assert not t.code and t.sources == (str((tmp_path / "net.py").resolve()),)
    assert t.allows(tmp_path / "." / "net.py") and not t.allows(tmp_path / "other.py")
    assert Trust.given(True, "wrn-16-2") == Trust(code=True) and Trust.given(t, None) is t
    assert parse_arch(f"{tmp_path}/net.py:Net").kwargs["path"] == t.sources[0]
