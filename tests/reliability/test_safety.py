"""Safe loading (weights_only, --trust-checkpoint, TorchScript) and atomic writes."""

from __future__ import annotations

import ast
import errno
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor import fileio
from compressor.errors import CheckpointError, OutputError
from compressor.models import create_model
from compressor.models.checkpoint import load_model, read_file
from tests.helpers import ROOT, run_atc


class CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: code execution that leaves a file behind."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(params=["torch.save", "pickle.dump"])
def malicious(request, tmp_path) -> tuple[Path, Path]:
    """A checkpoint whose loading would create ``marker``, in torch's zip format and as a raw pickle."""
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"w": torch.ones(2)}, "extra": CreatesFile(marker)}
    if request.param == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return path, marker


def test_malicious_pickle_is_refused_without_the_flag(malicious):
    path, marker = malicious
    with pytest.raises(CheckpointError, match="needs code execution.*--trust-checkpoint"):
        read_file(path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_model(path, arch="wrn-10-1")
    assert not marker.exists()
    try:  # the payload is real: trusting it runs its code (torch.load then rejects a raw pickle's layout)
        read_file(path, trust=True)
    except CheckpointError as exc:
        assert path.read_bytes()[:2] != b"PK" and "even as a trusted pickle" in str(exc)
    assert marker.exists()


@pytest.mark.slow
def test_malicious_pickle_through_the_cli(tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "teacher.pt"
    torch.save({"model": CreatesFile(marker)}, evil)
    r = run_atc("compress", "--teacher", str(evil), "--data", "digits", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: ")
    assert "needs code execution" in r.stderr and "--trust-checkpoint" in r.stderr
    assert not marker.exists()


def test_pickled_module_loads_only_when_trusted(tmp_path):
    model = create_model("wrn-10-1", 3).eval()
    torch.save(model, tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_model(tmp_path / "module.pt")
    loaded, spec, _ = load_model(tmp_path / "module.pt", trust=True, num_classes=3, input_size=(3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    assert spec.family == "module" and torch.equal(loaded(x), model(x))


def test_torchscript_loads_as_such(tmp_path):
    model = create_model("wrn-10-1", 3).eval()
    torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
    loaded, spec, _ = load_model(tmp_path / "scripted.pt", num_classes=3, input_size=(3, 16, 16))  # no trust needed
    assert isinstance(loaded, torch.jit.ScriptModule)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)


@pytest.mark.slow
def test_profiling_torchscript_is_a_one_line_refusal(tmp_path):
    torch.jit.script(create_model("wrn-10-1", 3).eval()).save(str(tmp_path / "scripted.pt"))
    r = run_atc("profile", str(tmp_path / "scripted.pt"), "--input-size", "3x16x16")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: TorchScript models cannot be profiled (fvcore needs module hooks); "
        "profile the eager checkpoint or a state_dict with --arch instead"]


def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            yield node


def test_every_torch_load_is_weights_only_but_the_trusted_one():
    """Source check: torch.load(weights_only=True) everywhere; the one exception sits behind ``trust``."""
    unsafe = []
    for path in sorted([*ROOT.glob("compressor/**/*.py"), *ROOT.glob("cli/**/*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        assert "pickle.load(" not in path.read_text() and "pickle.loads(" not in path.read_text(), path
        for call in _torch_load_calls(tree):
            kw = {k.arg: k.value for k in call.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                unsafe.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert len(unsafe) == 1 and unsafe[0].startswith("compressor/models/checkpoint.py:"), unsafe
    source = (ROOT / "compressor" / "models" / "checkpoint.py").read_text().splitlines()
    line = int(unsafe[0].split(":")[1])
    before = "\n".join(source[line - 20:line])
    assert "if not trust.code:" in before and "raise CheckpointError" in before


# --- atomic writes ----------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_failed_write_leaves_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    fileio.write_json(target, {"version": 1})
    with pytest.raises(RuntimeError, match="mid-way"):
        with fileio.atomic_path(target) as tmp:
            tmp.write_bytes(b'{"version": 2, "half')  # a partial file under the temporary name...
            raise RuntimeError("failed mid-way")
    assert json.loads(target.read_text()) == {"version": 1}
    assert _leftovers(tmp_path) == []


def test_failed_torch_save_leaves_previous_checkpoint(tmp_path):
    target = tmp_path / "student.pt"
    fileio.torch_save(target, {"w": torch.zeros(3)})
    with pytest.raises(Exception):
        fileio.torch_save(target, {"w": torch.ones(3), "bad": lambda: None})  # the lambda cannot be pickled
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.zeros(3))
    assert _leftovers(tmp_path) == []


def test_disk_full_is_an_output_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.jsonl"
    fileio.write_text(target, "old\n")
    with pytest.raises(OutputError, match=r"no space left on the device while writing .*metrics.jsonl; free some space"):
        with fileio.atomic_path(target) as tmp:
            tmp.write_text("new, partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old\n" and _leftovers(tmp_path) == []


def test_written_files_get_ordinary_permissions(tmp_path):
    target = tmp_path / "report.md"
    fileio.write_text(target, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600
    os.chmod(target, 0o640)
    fileio.write_text(target, "y")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # a replaced file keeps its permissions


KILLED_MID_WRITE = """
import os, signal, sys
from compressor import fileio
target = sys.argv[1]
with fileio.atomic_path(target) as tmp:
    with open(tmp, "wb") as fh:
        fh.write(b"NEW" * 1000)
        fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_sigkill_mid_write_keeps_old_file_and_next_write_cleans_up(tmp_path):
    target = tmp_path / "train_state.pt"
    fileio.torch_save(target, {"epoch": 1})
    r = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(target)], cwd=ROOT, capture_output=True)
    assert r.returncode == -signal.SIGKILL
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    stale = _leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".train_state.pt.")  # only the dead writer's temporary
    fileio.torch_save(target, {"epoch": 2})
    assert torch.load(target, weights_only=True) == {"epoch": 2}
    assert _leftovers(tmp_path) == []
