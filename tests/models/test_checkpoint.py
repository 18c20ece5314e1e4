"""Checkpoint round-trips, plain state_dicts and the foreign CIFAR WRN key layout."""

from dataclasses import replace

import pytest
import torch

from compressor.errors import CheckpointError
from compressor.models import create_model
from compressor.models.checkpoint import load_model, save_checkpoint
from compressor.models.spec import ModelSpec


def test_round_trip_restores_weights_and_metadata(tmp_path):
    spec = replace(ModelSpec.for_arch("wrn-16-1", 3), class_names=["a", "b", "c"], mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.5])
    model = spec.build()
    save_checkpoint(tmp_path / "m.pt", model, spec, {"top1": 42.0})
    blob = torch.load(tmp_path / "m.pt", weights_only=True)  # plain data only
    assert blob["spec"]["family"] == "wrn"
    loaded, spec2, metrics = load_model(tmp_path / "m.pt")
    assert spec2.name == "wrn-16-1" and spec2.class_names == ["a", "b", "c"] and metrics["top1"] == 42.0
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), loaded.eval()(x))


def test_plain_state_dict_needs_arch_unless_the_weights_tell_it(tmp_path):
    model = create_model("resnet20", 10)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded, spec, _ = load_model(tmp_path / "sd.pt")  # a zoo family: inferred from the keys and shapes
    assert spec.name == "resnet20" and spec.num_classes == 10
    loaded, spec, _ = load_model(tmp_path / "sd.pt", arch="resnet20")
    assert spec.num_classes == 10
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(tmp_path / "sd.pt", arch="wrn-16-1")
    torch.save(create_model("mobilenet_v3_small", 10).state_dict(), tmp_path / "mobile.pt")
    with pytest.raises(CheckpointError, match="--arch"):  # outside the zoo families nothing is guessed
        load_model(tmp_path / "mobile.pt")


def _foreign_wrn_state(model):
    """Rename our keys into the RepDistiller/mdistiller CIFAR WRN layout (block1.layer.0.bn1 …)."""
    inner = {"bn0": "bn1", "conv0": "conv1", "bn1": "bn2", "conv1": "conv2", "shortcut": "convShortcut"}
    out = {}
    for k, v in model.state_dict().items():
        p = k.split(".")
        if p[0].startswith("group"):
            out[".".join([f"block{int(p[0][5:]) + 1}", "layer", p[1], inner[p[2]]] + p[3:])] = v
        else:
            out[".".join([{"conv0": "conv1", "bn": "bn1"}.get(p[0], p[0])] + p[1:])] = v
    return out


def test_foreign_wrn_layout_loads(tmp_path):
    model = create_model("wrn-16-2", 10).eval()
    foreign = _foreign_wrn_state(model)
    assert "block1.layer.0.bn1.weight" in foreign and "block2.layer.0.convShortcut.weight" in foreign
    torch.save({"model": foreign}, tmp_path / "foreign.pth")
    loaded, spec, _ = load_model(tmp_path / "foreign.pth", arch="wrn-16-2")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), loaded.eval()(x))


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
