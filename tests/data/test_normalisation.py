"""The teacher's normalisation is the teacher's: --mean/--std, then what its file states, then the
preset's data.mean/data.std, and only then the training images' statistics, said as such."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from torch import nn

from compressor.config import load_config
from compressor.data.open import load_digits
from compressor.distill.loop import make_batches
from compressor.errors import ConfigError
from compressor.evaluate import evaluate
from compressor.load import choose_normalization, load_teacher_and_data
from compressor.models import create_model
from compressor.models.checkpoint import read_model
from compressor.models.importers import PAPER_STATS, REPDISTILLER_CIFAR100
from compressor.options import RunOptions
from tests.helpers import Messages, save_teacher

CIFAR10 = ([0.4914, 0.4822, 0.4465], [0.247, 0.2435, 0.2616])


def test_presets_carry_the_standard_statistics():
    assert [list(load_config("cifar").data.mean), list(load_config("cifar").data.std)] == [CIFAR10[0], CIFAR10[1]]
    assert load_config("cifar100").data.mean == (0.5071, 0.4867, 0.4408)
    assert load_config("imagenet").data.mean == (0.485, 0.456, 0.406) and load_config("imagenet").data.std == (0.229, 0.224, 0.225)
    assert load_config("demo").data.mean == ()  # the digits demo measures its own


def test_preset_keys_are_checked():
    assert load_config("demo", ["data.mean=0.1307", "data.std=0.3081"]).data.std == (0.3081,)
    with pytest.raises(ConfigError, match="give both the mean and the std"):
        load_config("demo", ["data.mean=0.5,0.5,0.5"])
    with pytest.raises(ConfigError, match="one per RGB channel"):
        load_config("demo", ["data.mean=0.5,0.5", "data.std=0.2,0.2"])
    with pytest.raises(ConfigError, match="std must be positive"):
        load_config("demo", ["data.mean=0.5", "data.std=0"])
    with pytest.raises(ConfigError, match="comma list of numbers"):
        load_config("demo", ["data.mean=a,b,c", "data.std=1,1,1"])


def test_the_order_of_who_says_what():
    data = load_digits(16)
    demo, cifar = load_config("demo"), load_config("cifar")
    stated = ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6], "the checkpoint")
    explicit = RunOptions(mean=(0.1307,), std=(0.3081,))
    n = choose_normalization(cifar, data, explicit, stated)
    assert (n.mean, n.std) == ([0.1307] * 3, [0.3081] * 3) and "instead of those of the checkpoint" in n.source
    assert choose_normalization(cifar, data, RunOptions(), stated).mean == [0.1, 0.2, 0.3]
    preset = choose_normalization(cifar, data)
    assert (preset.mean, preset.std) == CIFAR10 and "from the preset cifar" in preset.source
    measured = choose_normalization(demo, data)
    assert (measured.mean, measured.std) == tuple(data.channel_stats())
    assert "measured from the 1,437 training images" in measured.describe() and "pass --mean/--std" in measured.describe()
    with pytest.raises(ConfigError, match="--mean/--std: give both"):
        choose_normalization(demo, data, RunOptions(mean=(0.5,)))


def test_a_state_dict_teacher_gets_the_users_statistics_and_says_where_they_come_from(tmp_path):
    torch.save(create_model("resnet8x1", 10).state_dict(), tmp_path / "t.pt")
    said = Messages()
    loaded = load_teacher_and_data(tmp_path / "t.pt", "digits", load_config("demo"), RunOptions(mean=(0.1307,), std=(0.3081,)),
                                   reporter=said)
    assert loaded.mean_std == ([0.1307] * 3, [0.3081] * 3)
    assert "normalisation: mean (0.1307, 0.1307, 0.1307), std (0.3081, 0.3081, 0.3081), from --mean/--std" in said.lines
    assert "teacher: inferred --arch resnet8x1 from the weights" in said.lines


def test_an_atc_checkpoint_keeps_its_own(tmp_path):
    path = save_teacher(tmp_path / "t.pt", "wrn-10-1", classes=10, size=16, mean=0.3, std=0.2, class_names=[str(i) for i in range(10)])
    said = Messages()
    loaded = load_teacher_and_data(path, "digits", load_config("demo", ["data.mean=0.5", "data.std=0.5"]), reporter=said)
    assert loaded.mean_std == ([0.3] * 3, [0.2] * 3)
    assert any(line.endswith("std (0.2, 0.2, 0.2), from the checkpoint") for line in said.lines)


def to_paper_key(key: str) -> str:
    """atc's WRN key → the paper's functional WRN key (``group0.0.conv0.weight`` → ``group0.block0.conv0``)."""
    key = re.sub(r"^group(\d+)\.(\d+)\.", r"group\1.block\2.", key)
    key = re.sub(r"\.shortcut\.weight$", ".convdim", key)
    return re.sub(r"(^|\.)(conv\d+)\.weight$", r"\1\2", key)


@pytest.mark.slow
def test_formats_whose_code_fixes_the_statistics(tmp_path):
    paper = {to_paper_key(k): v for k, v in create_model("wrn-10-1", 10).state_dict().items() if "num_batches" not in k}
    torch.save({"params": paper, "epoch": 1, "optimizer": {}}, tmp_path / "model.pt7")
    loaded = read_model(tmp_path / "model.pt7")
    assert loaded.spec.name == "wrn-10-1" and loaded.spec.mean == list(PAPER_STATS.mean) and "attention-transfer" in loaded.norm_source
    opt = argparse.Namespace(model="resnet8x4", dataset="cifar100")
    torch.save({"opt": opt, "model": create_model("resnet8x4", 100).state_dict(), "optimizer": {}}, tmp_path / "resnet8x4_last.pth")
    assert read_model(tmp_path / "resnet8x4_last.pth").spec.std == list(REPDISTILLER_CIFAR100.std)
    torch.save({"model": create_model("resnet8x4", 100).state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    assert read_model(tmp_path / "ckpt.pth").spec.mean is None  # nothing says: the preset or the data will


def test_timm_train_args_state_the_statistics(tmp_path):
    pytest.importorskip("timm")
    sd = create_model("timm:resnet10t", 10).state_dict()
    args = argparse.Namespace(model="resnet10t", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    torch.save({"arch": "resnet10t", "state_dict": sd, "args": args, "epoch": 1}, tmp_path / "a.pth.tar")
    assert read_model(tmp_path / "a.pth.tar").spec.mean == [0.5, 0.5, 0.5]
    torch.save({"arch": "resnet10t", "state_dict": sd, "args": argparse.Namespace(model="resnet10t", mean=None, std=None)},
               tmp_path / "b.pth.tar")
    loaded = read_model(tmp_path / "b.pth.tar")
    assert loaded.spec.mean == [0.485, 0.456, 0.406] and "timm's default data configuration" in loaded.norm_source


def _train_outside_atc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mean: float, std: float, epochs: int = 6) -> None:
    """A plain training loop of another project: its own fixed normalisation, no atc code."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xs = (x.float() / 255 - mean) / std
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs[idx]), y[idx]).backward()
            opt.step()


def test_a_teacher_trained_with_fixed_statistics_scores_in_atc_what_it_scores_itself(tmp_path, one_thread):
    digits = load_digits(16)
    torch.manual_seed(0)
    teacher = create_model("resnet8x1", 10)
    _train_outside_atc(teacher, digits.train_x, digits.train_y, 0.1307, 0.3081)
    teacher.eval()
    with torch.no_grad():
        correct = int((teacher((digits.test_x.float() / 255 - 0.1307) / 0.3081).argmax(1) == digits.test_y).sum())
    own = 100.0 * correct / len(digits.test_y)
    torch.save({"epoch": 6, "model": teacher.state_dict(), "accuracy": own}, tmp_path / "ckpt_epoch_6.pth")  # RepDistiller's format

    cfg = load_config("demo")
    loaded = load_teacher_and_data(tmp_path / "ckpt_epoch_6.pth", "digits", cfg, RunOptions(mean=(0.1307,), std=(0.3081,)))
    _, test_b = make_batches(loaded.data, cfg, *loaded.mean_std, torch.device("cpu"))
    in_atc = evaluate(loaded.model, test_b, amp=False).top1
    assert own > 50 and in_atc == pytest.approx(own, abs=1e-9)
