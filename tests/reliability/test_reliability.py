"""Bad input and failing runs: one test per row of docs/reliability.md.

Each runs the CLI entry point in its own process and asserts the exit code, that the error is
one line starting with ``error:`` (the last line of stderr where a run printed progress before
failing), the key phrase of the message, no traceback, and that nothing half-written was left.
A few rows go through ``python -m cli`` (``run_atc``); the others through ``tests.forked_cli``,
which forks the same entry point from a process that has imported torch once, because a fresh
interpreter per row costs seconds of CPU on a small machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import assert_error, make_image_folder, run_atc


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CPU is shared; one thread is also the fastest for these models


def no_files_under(folder: Path) -> bool:
    return not folder.exists() or not any(p.is_file() for p in folder.rglob("*"))


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


# --- teacher file -----------------------------------------------------------------------------


@pytest.mark.slow
def test_teacher_missing(files, tmp_path):
    r = run_atc("compress", "--teacher", str(tmp_path / "nope.pt"), "--data", str(files["tiny"]), "--preset", "demo",
                "--out", str(tmp_path / "out"))
    line = assert_error(r, "does not exist; check the path")
    assert "nope.pt" in line
    assert no_files_under(tmp_path / "out")


@pytest.mark.slow
def test_teacher_truncated(atc, files, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(files["teacher"].read_bytes()[:2000])
    r = atc("compress", "--teacher", str(cut), "--data", str(files["tiny"]), "--preset", "demo", "--out", str(tmp_path / "out"))
    assert_error(r, "is not a PyTorch checkpoint or is truncated")
    assert no_files_under(tmp_path / "out")


@pytest.mark.parametrize("content", [b"hello\n", b'{"model": "wrn"}', b""], ids=["text", "json", "empty"])
def test_teacher_not_a_checkpoint(atc, files, tmp_path, content):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(content)
    r = atc("profile", str(junk))
    assert_error(r, "is empty" if not content else "is not a PyTorch checkpoint")


# --- model ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unknown_architecture_names_closest(files, tmp_path):
    r = run_atc("train", "--arch", "wrn-16-3x", "--data", str(files["tiny"]), "--out", str(tmp_path / "t.pt"))
    line = assert_error(r, "unknown architecture 'wrn-16-3x'; did you mean")
    assert "wrn-16-" in line.split("did you mean", 1)[1]


def test_class_count_mismatch(atc, files, tmp_path):
    r = atc("compress", "--teacher", str(files["teacher"]), "--data", str(files["four"]), "--preset", "demo",
                "--out", str(tmp_path / "out"))
    assert_error(r, "the teacher has 3 classes but the data has 4", only_line=False)  # after the data-loading note
    assert no_files_under(tmp_path / "out")


def test_input_too_small_for_the_network_profile(atc):
    r = atc("profile", "resnet18", "--input-size", "3x16x16")
    assert_error(r, "input 3x16x16 is too small for resnet18 (layer4.0.conv1 would downsample a 1x1 map); use images of at least 17x17")


def test_input_too_small_for_the_network_train(atc, files, tmp_path):
    r = atc("train", "--arch", "resnet18", "--data", str(files["tiny"]), "--preset", "demo", "--set", "data.image_size=8",
                "--out", str(tmp_path / "t.pt"))
    assert_error(r, "input 3x8x8 is too small for resnet18", only_line=False)  # found after the data-loading note
    assert no_files_under(tmp_path)


def test_input_with_wrong_channels(atc, files):
    r = atc("export", str(files["teacher"]), "--out", str(files["root"] / "x.onnx"), "--input-size", "1x16x16")
    assert_error(r, "cannot run on input 1x16x16")
    assert not (files["root"] / "x.onnx").exists()


# --- data -------------------------------------------------------------------------------------


def test_data_folder_missing(atc, tmp_path):
    r = atc("train", "--arch", "wrn-10-1", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "t.pt"))
    assert_error(r, "does not exist; pass --data DIR with train/ and test/ subfolders")


def test_data_folder_empty(atc, tmp_path):
    (tmp_path / "data").mkdir()
    r = atc("train", "--arch", "wrn-10-1", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "t.pt"))
    assert_error(r, "is empty; put train/ and test/ (or val/) folders")


def test_data_folder_in_no_supported_layout(atc, tmp_path):
    for d in ("images/a", "images/b", "labels"):
        (tmp_path / "data" / d).mkdir(parents=True)
    r = atc("train", "--arch", "wrn-10-1", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "t.pt"))
    assert_error(r, "is in no supported layout; it needs train/ and test/ (or val/) folders")


def test_data_split_without_images(atc, tmp_path):
    for d in ("train/cat", "test/cat"):
        (tmp_path / "data" / d).mkdir(parents=True)
    r = atc("train", "--arch", "wrn-10-1", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "t.pt"))
    assert_error(r, "holds no images; it needs one subfolder per class")


@pytest.fixture
def corrupt_folder(tmp_path) -> Path:
    data = make_image_folder(tmp_path / "corrupt", per_class=6)
    (data / "train" / "class0" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "train" / "class2" / "0003.png").write_bytes(b"")
    return data


def test_corrupt_image_is_skipped_and_counted(atc, corrupt_folder, tmp_path):
    r = atc("train", "--arch", "wrn-10-1", "--data", str(corrupt_folder), "--preset", "demo", "--epochs", "1",
                "--batch-size", "16", "--out", str(tmp_path / "t.pt"))
    assert r.returncode == 0, r.stderr
    assert "skipped 2 unreadable image(s)" in r.stderr and "(16 train / 6 test)" in r.stderr


def test_corrupt_image_is_fatal_with_strict_data(atc, corrupt_folder, tmp_path):
    r = atc("train", "--arch", "wrn-10-1", "--data", str(corrupt_folder), "--preset", "demo", "--strict-data",
                "--out", str(tmp_path / "t.pt"))
    line = assert_error(r, "corrupt image ", only_line=False)  # found while loading, after the data-loading note
    assert "0001.png" in line and "run without --strict-data to skip unreadable images" in line
    assert not (tmp_path / "t.pt").exists() and not (tmp_path / "t.pt.state").exists()


# --- presets and options ----------------------------------------------------------------------


def test_unknown_preset_lists_the_valid_ones(atc, files, tmp_path):
    r = atc("train", "--arch", "wrn-10-1", "--data", str(files["tiny"]), "--preset", "cifar11", "--out", str(tmp_path / "t.pt"))
    assert_error(r, "unknown preset 'cifar11'; choose one of cifar, cifar100, demo, finetune, imagenet")


def test_unknown_preset_key_lists_the_valid_ones(atc, files, tmp_path):
    r = atc("train", "--arch", "wrn-10-1", "--data", str(files["tiny"]), "--set", "train.epoch=3", "--out", str(tmp_path / "t.pt"))
    assert_error(r, "unknown key 'train.epoch'; valid keys are epochs, batch_size, lr")


def test_unknown_key_in_a_preset_file(atc, files, tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text("[train]\nepochs = 3\nlearning_rate = 0.1\n")
    r = atc("train", "--arch", "wrn-10-1", "--data", str(files["tiny"]), "--preset", str(toml), "--out", str(tmp_path / "t.pt"))
    assert_error(r, "preset mine: unknown key 'train.learning_rate'; valid keys are")


@pytest.mark.parametrize("args, phrase", [
    (["--epochs", "-1"], "Invalid value for '--epochs'"),
    (["--lr", "fast"], "Invalid value for '--lr'"),
    (["--set", "train.batch_size=-8"], "train.batch_size must be at least 1, got -8"),
    (["--set", "train.lr=abc"], "train.lr must be a float, got 'abc'"),
], ids=["negative-epochs", "non-numeric-lr", "negative-set", "non-numeric-set"])
def test_negative_or_non_numeric_option(atc, files, tmp_path, args, phrase):
    r = atc("train", "--arch", "wrn-10-1", "--data", str(files["tiny"]), *args, "--out", str(tmp_path / "t.pt"))
    assert_error(r, phrase)
    assert no_files_under(tmp_path)


# --- output -----------------------------------------------------------------------------------


def test_out_folder_not_empty(atc, files, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = atc("compress", "--teacher", str(files["teacher"]), "--data", str(files["tiny"]), "--preset", "demo", "--out", str(out))
    assert_error(r, "is not empty; pass --overwrite to replace its files, --resume to continue")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_out_checkpoint_exists(atc, files, tmp_path):
    (tmp_path / "t.pt").write_bytes(b"precious")
    r = atc("train", "--arch", "wrn-10-1", "--data", str(files["tiny"]), "--out", str(tmp_path / "t.pt"))
    assert_error(r, "exists; pass --overwrite to replace it, --resume to continue its run")
    assert (tmp_path / "t.pt").read_bytes() == b"precious"


def test_out_holds_an_unfinished_run(atc, files, tmp_path):
    (tmp_path / "t.pt.state").mkdir()
    (tmp_path / "t.pt.state" / "train_state.pt").write_bytes(b"state")
    r = atc("train", "--arch", "wrn-10-1", "--data", str(files["tiny"]), "--out", str(tmp_path / "t.pt"))
    assert_error(r, "holds the state of an unfinished run; pass --resume to continue it, --overwrite to start again")
    assert (tmp_path / "t.pt.state" / "train_state.pt").read_bytes() == b"state"


# --- device -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_but_absent(files, tmp_path):
    r = run_atc("train", "--arch", "wrn-10-1", "--data", str(files["tiny"]), "--device", "cuda", "--out", str(tmp_path / "t.pt"))
    assert_error(r, "--device cuda asked for but no CUDA device is available; use --device cpu or auto")
    assert no_files_under(tmp_path)


def test_unknown_device(atc, files, tmp_path):
    r = atc("train", "--arch", "wrn-10-1", "--data", str(files["tiny"]), "--device", "tpu", "--out", str(tmp_path / "t.pt"))
    assert_error(r, "--device 'tpu' is not a device; use auto, cpu, cuda or cuda:N")


# --- failures of the machine, simulated in the CLI's own process ------------------------------

DISK_FULL = """
import builtins, errno
import compressor.fileio as fileio

_open = builtins.open

class _Full:
    # Half the bytes reach the file, then the device is full, as a real ENOSPC write goes.
    def __init__(self, fh):
        self.fh = fh
    def write(self, data):
        data = bytes(data)
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.fh.close()

def _full_open(file, mode="r", *args, **kwargs):
    fh = _open(file, mode, *args, **kwargs)
    return _Full(fh) if "w" in mode else fh

fileio.open = _full_open  # every atomic write of atc goes through compressor.fileio
"""

CUDA_OOM = """
import torch
from compressor.models import wrn

_forward = wrn.WideResNet.forward

def _forward_oom(self, x):
    if self.training and x.shape[0] > 4:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return _forward(self, x)

wrn.WideResNet.forward = _forward_oom
"""


def test_disk_full_while_writing(atc, files, tmp_path):
    out = tmp_path / "out" / "t.pt"
    r = atc("train", "--arch", "wrn-10-1", "--data", str(files["tiny"]), "--preset", "demo",
                    "--epochs", "1", "--batch-size", "18", "--out", str(out), prelude=DISK_FULL)
    line = assert_error(r, "no space left on the device while writing ", only_line=False)
    assert line.endswith("train_state.pt; free some space and run the command again")
    assert not out.exists() and temporaries(tmp_path) == []  # nothing half-written, no temporary left


def test_cuda_out_of_memory_suggests_a_batch_size(atc, files, tmp_path):
    r = atc("train", "--arch", "wrn-10-1", "--data", str(files["tiny"]), "--preset", "demo",
                    "--epochs", "1", "--batch-size", "12", "--out", str(tmp_path / "t.pt"), prelude=CUDA_OOM)
    assert_error(r, "CUDA ran out of memory at epoch 1 with batch size 12; try --batch-size 4 (or --set train.batch_size=4)",
                 only_line=False)
    assert not (tmp_path / "t.pt").exists()


def test_non_finite_loss_names_epoch_step_and_term(atc, files, tmp_path):
    """lr × 1e30 after epoch 1: epoch 2 diverges; the state saved after epoch 1 stays and is finite."""
    out = tmp_path / "t.pt"
    r = atc("train", "--arch", "wrn-10-1", "--data", str(files["tiny"]), "--preset", "demo", "--epochs", "3",
                "--batch-size", "6", "--set", "train.milestones=1", "--set", "train.gamma=1e30", "--out", str(out))
    line = assert_error(r, "training diverged: the ce loss term became nan at epoch 2, step ", only_line=False)
    assert "lower --lr (or distill.beta)" in line and "the last good training state is kept in" in line
    state = torch.load(tmp_path / "t.pt.state" / "train_state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not out.exists()
