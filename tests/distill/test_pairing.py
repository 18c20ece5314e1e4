"""Automatic attention pairing from one traced forward."""

import pytest
import torch
from torch import nn

from compressor.errors import ConfigError
from compressor.models import create_model
from compressor.pair import find_pairs, find_stages, select_pairs


def test_wrn_pairs_are_group_outputs_before_final_bn():
    pairs = find_pairs(create_model("wrn-16-1"), create_model("wrn-40-4"), torch.zeros(1, 3, 32, 32))
    assert [(p.student.module, p.teacher.module) for p in pairs] == [("group0", "group0"), ("group1", "group1"), ("group2", "group2")]
    assert [p.teacher.shape for p in pairs] == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    assert [p.student.shape for p in pairs] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_resnet18_stages():
    stages = find_stages(create_model("resnet18", 10), torch.zeros(1, 3, 64, 64))
    assert [s.module for s in stages] == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert stages[-1].resolution == (2, 2)


class Strided(nn.Module):
    """Three stages at 16, 8 and 4 pixels: one stride more than a WRN on 32x32."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, 2, 1)
        self.b = nn.Conv2d(4, 8, 3, 2, 1)
        self.c = nn.Conv2d(8, 8, 3, 2, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.c(self.b(self.a(x))).mean((2, 3)))


def test_spatial_mismatch_aligns_from_deepest_and_loss_pools():
    from compressor.distill.losses import at_loss

    pairs = find_pairs(Strided(), create_model("wrn-16-1"), torch.zeros(1, 3, 32, 32))
    assert [(p.student.resolution, p.teacher.resolution) for p in pairs] == [((16, 16), (32, 32)), ((8, 8), (16, 16)), ((4, 4), (8, 8))]
    loss = at_loss(torch.randn(2, 8, 4, 4), torch.randn(2, 64, 8, 8))
    assert loss.ndim == 0 and loss > 0


def test_layer_selection():
    pairs = find_pairs(create_model("wrn-16-1"), create_model("wrn-16-2"), torch.zeros(1, 3, 32, 32))
    assert [p.student.module for p in select_pairs(pairs, "last2")] == ["group1", "group2"]
    assert [p.student.module for p in select_pairs(pairs, "group0")] == ["group0"]
    with pytest.raises(ConfigError):
        select_pairs(pairs, "last4")
    with pytest.raises(ConfigError):
        select_pairs(pairs, "nope")
