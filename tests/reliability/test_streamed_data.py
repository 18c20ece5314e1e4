"""Issue 21, points 5, 7 and 10 on the data path: streamed data skips and counts an unreadable image
as the in-memory path does (never the next file's pixels under the original label), and the
memory budget taken from the environment is checked."""

from __future__ import annotations

import pytest
import torch

from compressor.data.budget import memory_budget
from compressor.data.crops import AugmentedSplit
from compressor.data.images import Augment
from compressor.data.streaming import FolderImages, StreamingData, decode_subset
from compressor.errors import DataError
from tests.helpers import assert_error, make_image_folder


@pytest.fixture
def folder_with_a_corrupt_image(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4, size=16)
    bad = root / "train" / "class0" / "0003.png"  # the last file of class 0: the next readable one is class 1's
    bad.write_bytes(b"not a png at all")
    return root, bad


def test_an_unreadable_streamed_image_brings_the_next_images_own_label(folder_with_a_corrupt_image):
    root, bad = folder_with_a_corrupt_image
    data = StreamingData.from_folder(root, 16)
    i = data.train.files.index(str(bad))
    assert int(data.train.labels[i]) == 0 and int(data.train.labels[i + 1]) == 1
    for train in (True, False):
        x, label, skipped = AugmentedSplit(data.train, train, Augment(0, False), 16, False, 0)[(i, 0)]
        assert label == 1 and skipped == i  # the pixels shown are class 1's, and so is the label
        assert torch.equal(x, data.train.image(i + 1))
    x, label, skipped = AugmentedSplit(data.train, True, Augment(0, False), 16, False, 0)[(0, 0)]
    assert label == 0 and skipped == -1


def test_a_picked_subset_of_streamed_data_skips_and_lists_the_unreadable_file(folder_with_a_corrupt_image):
    root, bad = folder_with_a_corrupt_image
    data = decode_subset(StreamingData.from_folder(root, 16))
    assert data.skipped_files == [str(bad)]
    assert len(data.train_y) == len(data.train_x) == 11 and int((data.train_y == 0).sum()) == 3


def test_strict_streamed_data_still_fails_on_it(folder_with_a_corrupt_image):
    root, bad = folder_with_a_corrupt_image
    images = FolderImages([str(bad)], torch.tensor([0]), 16, strict=True)
    with pytest.raises(DataError, match="corrupt image .*0003.png"):
        images.readable(0)


@pytest.mark.slow
def test_training_on_streamed_data_prints_the_count(atc, folder_with_a_corrupt_image, tmp_path, monkeypatch):
    root, bad = folder_with_a_corrupt_image
    monkeypatch.setenv("ATC_DATA_BUDGET_MB", "0")  # too small for anything: the folder is streamed
    r = atc("train", "--arch", "wrn-10-1", "--data", str(root), "--preset", "demo", "--epochs", "1", "--workers", "0",
            "--out", str(tmp_path / "t.pt"))
    assert r.returncode == 0, r.stderr
    notes = [ln for ln in r.stderr.splitlines() if "unreadable image(s) of the streamed data" in ln]
    assert len(notes) == 1 and "skipped 1 unreadable image(s)" in notes[0] and str(bad) in notes[0], r.stderr


@pytest.mark.parametrize("value", ["inf", "nan", "-5", "lots"])
def test_a_data_budget_that_is_no_size_is_one_line(atc, value, monkeypatch, tmp_path):
    with pytest.raises(DataError, match="is not a number of megabytes"):
        monkeypatch.setenv("ATC_DATA_BUDGET_MB", value)
        memory_budget(torch.device("cpu"))
    r = atc("train", "--arch", "wrn-10-1", "--data", "digits", "--out", str(tmp_path / "t.pt"))
    assert_error(r, f"ATC_DATA_BUDGET_MB={value!r} is not a number of megabytes (finite, 0 or more)", only_line=False)
