"""compressor/pruning.py is the only place atc touches Torch-Pruning; its check names what is missing."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from compressor import pruning
from compressor.errors import ModelError
from tests.helpers import ROOT


@pytest.fixture(autouse=True)
def fresh_check(monkeypatch):
    monkeypatch.setattr(pruning, "_checked", False)


def test_installed_version_has_every_name():
    version = pruning.check_torch_pruning()
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", version)


@pytest.mark.parametrize("module, attr", [
    ("torch_pruning._helpers", "to_plain_idxs"),
    ("torch_pruning.pruner.function", "PrunerBox"),
    ("torch_pruning.ops", "module2type"),
])
def test_missing_private_name_fails_with_version_and_range(monkeypatch, module, attr):
    import importlib

    monkeypatch.delattr(importlib.import_module(module), attr)
    with pytest.raises(ModelError) as err:
        pruning.check_torch_pruning()
    message = str(err.value)
    assert "\n" not in message
    assert f"{module}.{attr}" in message
    assert pruning._version() in message and pruning.TESTED in message
    with pytest.raises(ModelError):  # the adapter's entry points check before they call
        pruning.layer_pruner(nn.Conv2d(3, 8, 3))


def test_not_installed_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ModelError, match=r"torch-pruning is not installed.*pip install 'torch-pruning"):
        pruning.check_torch_pruning()


def test_adapter_cuts_coupled_channels():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    graph = pruning.dependency_graph(model, torch.randn(1, 3, 8, 8))
    groups = list(pruning.channel_groups(graph, ignored=[model[3]]))
    assert len(groups) == 1
    root, handler = pruning.group_root(groups[0])
    assert root is model[0]
    assert pruning.group_importance(groups[0]).shape == (8,)
    group = pruning.pruning_group(graph, root, handler, [1, 5])
    members = {id(c.module): c for c in pruning.group_members(graph, group, indices=True)}
    assert members[id(model[0])].out and members[id(model[0])].indices == [1, 5]
    assert not members[id(model[3])].out and members[id(model[3])].indices == [1, 5]
    assert pruning.couples_in_and_out(pruning.layer_pruner(model[1]))
    conv = pruning.layer_pruner(model[3])
    pruning.cut_channels(conv, model[3], False, [0, 2])
    assert pruning.channels(conv, model[3], False) == 6 and model[3].weight.shape == (4, 6, 1, 1)


def test_torch_pruning_is_used_only_through_the_adapter():
    users = [p.relative_to(ROOT).as_posix() for p in (ROOT / "compressor").rglob("*.py")
             if re.search(r"^\s*(import|from)\s+torch_pruning", p.read_text(), re.M)]
    assert users == ["compressor/pruning.py"]
