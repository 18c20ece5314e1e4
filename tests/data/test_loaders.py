"""The in-memory-or-streamed decision and the DataLoader path (compressor/data/budget.py, open.py, streaming.py)."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
import torch.nn.functional as F

from compressor.config import load_config
from compressor.data.budget import memory_budget
from compressor.data.crops import random_resized_crop_box
from compressor.data.folders import cache_dir
from compressor.data.images import Augment, ImageData
from compressor.data.open import open_dataset, open_for_device
from compressor.data.streaming import LoaderBatches, Loading, StreamingData, make_streaming_batches
from compressor.distill.loop import fit, make_batches
from compressor.models import create_model
from tests.helpers import Messages, make_image_folder, run_atc

CPU = torch.device("cpu")


def _cfg(**train):
    return load_config("demo", {"train": {"batch_size": 8, "epochs": 1, **train}})


def test_over_budget_folder_is_streamed_not_decoded_with_a_message(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=3, per_class=12, size=16)
    need = (36 + 12) * 3 * 16 * 16 + (36 + 12) * 8  # uint8 images plus int64 labels
    msgs = Messages()
    cached = set(cache_dir().glob("*")) if cache_dir().exists() else set()
    data = open_for_device(root, 16, CPU, budget_bytes=need - 1, workers=2, reporter=msgs)
    assert isinstance(data, StreamingData) and len(data.train_y) == 36 and data.input_size == (3, 16, 16)
    assert (set(cache_dir().glob("*")) if cache_dir().exists() else set()) == cached  # listed, not decoded (no cache written)
    [line] = msgs.lines
    assert "48 images" in line and "too large to keep on cpu" in line and "DataLoader (2 workers" in line
    msgs = Messages()
    kept = open_for_device(root, 16, CPU, budget_bytes=need, reporter=msgs)
    assert isinstance(kept, ImageData) and "kept on cpu" in msgs.lines[0]


def test_over_budget_in_memory_dataset_falls_back_to_the_dataloader():
    msgs = Messages()
    data = open_for_device("digits", 16, CPU, budget_bytes=10_000, train_subset=64, test_subset=32, workers=0, reporter=msgs)
    assert isinstance(data, StreamingData) and len(data.train_y) == 64 and len(data.test_y) == 32
    assert "too large" in msgs.lines[0]
    train, test = make_batches(data, _cfg(), [0.5] * 3, [0.25] * 3, CPU, workers=0)
    assert isinstance(train, LoaderBatches) and len(train) == 8 and len(test) == 1


def test_streamed_batches_equal_in_memory_batches(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=3, per_class=12, size=16)
    mem = open_dataset(root, image_size=16)
    lazy = StreamingData.from_folder(root, 16)
    assert lazy.channel_stats() == mem.channel_stats()  # exact while the sample covers every image
    mean, std = mem.channel_stats()
    cfg = load_config("demo", {"train": {"batch_size": 8}, "data": {"crop_padding": 0, "flip": False}})
    (mt, mv), (st, sv) = make_batches(mem, cfg, mean, std, CPU), make_batches(lazy, cfg, mean, std, CPU, workers=0)
    for a, b in ((mv, sv), (mt, st)):  # test split, and training without augmentation: the very same tensors
        for epoch in (0, 2):
            a.set_epoch(epoch), b.set_epoch(epoch)
            pairs = list(zip(a, b))
            assert len(pairs) == len(a) == len(b) > 0
            for (xa, ya), (xb, yb) in pairs:
                assert xa.dtype == xb.dtype == torch.float32 and torch.equal(xa, xb) and torch.equal(ya, yb)
    x, _ = next(iter(sv))  # normalised with the training mean/std
    assert abs(float(x.mean())) < 0.5 and 0.5 < float(x.std()) < 2


def test_streamed_augmentation_is_a_pad_crop_and_flip_independent_of_workers(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=8, size=12)
    lazy = StreamingData.from_folder(root, 12)
    mean, std = [0.0] * 3, [1 / 255] * 3  # normalisation that leaves the uint8 values
    runs = []
    for workers in (0, 2):
        with LoaderBatches(lazy.train, 4, mean, std, CPU, True, seed=5, loading=Loading(workers=workers)) as b:
            b.set_epoch(1, start_step=1)  # resume inside the epoch: steps 1..3
            runs.append(list(b))
    assert len(runs[0]) == 3 and all(torch.equal(x0, x1) and torch.equal(y0, y1) for (x0, y0), (x1, y1) in zip(*runs))
    order = b._order()
    x, _ = runs[0][0]
    for k in range(4):  # every image is one of the 9x9 shifts, flipped or not, of its source
        src = lazy.train.image(int(order[4 + k])).float()
        padded = F.pad(src, (4, 4, 4, 4))
        crops = [padded[:, dy:dy + 12, dx:dx + 12] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(x[k], c) or torch.equal(x[k], c.flip(2)) for c in crops)


def test_random_resized_crop_for_large_images(tmp_path):
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = random_resized_crop_box(90, 120, g)
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 120 and h > 0 and w > 0
    root = make_image_folder(tmp_path / "big", classes=2, per_class=3, size=80)
    lazy = StreamingData.from_folder(root, 64)
    cfg = load_config("imagenet", {"train": {"batch_size": 2}})  # crop padding 0: RandomResizedCrop when streamed
    train, test = make_batches(lazy, cfg, [0.5] * 3, [0.25] * 3, CPU, workers=0)
    assert train.dataset.rrc and not test.dataset.rrc
    assert [tuple(x.shape) for x, _ in train] == [(2, 3, 64, 64)] * 3
    assert tuple(next(iter(test))[0].shape) == (4, 3, 64, 64)  # the test images, resized as the in-memory path does


def test_fit_trains_from_a_stream_with_persistent_workers(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=3, per_class=12, size=16)
    data = StreamingData.from_folder(root, 16)
    mean, std = data.channel_stats()
    torch.manual_seed(0)
    before = set(multiprocessing.active_children())  # other tests' processes, if any
    result = fit(create_model("wrn-10-1", 3), data, _cfg(epochs=2), tmp_path / "run", mean, std, device=CPU)
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.history)
    # the persistent workers stop with fit, not when the garbage collector finds the loader (10 s later)
    assert set(multiprocessing.active_children()) - before == set()


def test_memory_budget_env_override(monkeypatch):
    monkeypatch.setenv("ATC_DATA_BUDGET_MB", "3")
    assert memory_budget(CPU) == (3 << 20, "ATC_DATA_BUDGET_MB=3")
    monkeypatch.delenv("ATC_DATA_BUDGET_MB")
    budget, of = memory_budget(CPU, 0.5)
    assert budget > 0 and of == "50% of available RAM"


@pytest.mark.slow
def test_cli_reports_the_fallback(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "d", classes=3, per_class=8, size=16)
    monkeypatch.setenv("ATC_DATA_BUDGET_MB", "0.001")
    r = run_atc("train", "--arch", "wrn-10-1", "--data", str(root), "--preset", "demo", "--epochs", "1", "--workers", "1",
                "--device", "cpu", "--out", str(tmp_path / "t.pt"))
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stderr.split())
    assert "too large to keep on cpu, streaming with a DataLoader (1 worker)" in text
    assert (tmp_path / "t.pt").exists()


def test_streamed_batches_used_as_a_context_stop_their_workers(tmp_path):
    # how the teacher's evaluation, the dry run and the sweep read a stream: the workers end with the block
    root = make_image_folder(tmp_path / "d", classes=3, per_class=12, size=16)
    data = StreamingData.from_folder(root, 16)
    before = set(multiprocessing.active_children())
    _, test_b = make_streaming_batches(data, 8, 8, *data.channel_stats(), CPU, Augment(), 0, workers=2)
    with test_b:
        next(iter(test_b))
        assert set(multiprocessing.active_children()) - before  # the loader's workers run inside
    assert set(multiprocessing.active_children()) - before == set()
