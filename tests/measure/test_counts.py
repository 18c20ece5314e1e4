"""Both multiply-add conventions: fvcore's (BatchNorm and pooling included) and torchvision's
(convolutions and matrix products alone), against the published figures."""

from __future__ import annotations

import pytest
import torchvision

from compressor.models.registry import create_model
from compressor.profiling.counts import count_macs


def test_resnet18_counts_in_both_conventions():
    m = count_macs(create_model("resnet18", 1000), (3, 224, 224))
    assert m.gmacs == pytest.approx(1.819, abs=5e-4)  # fvcore
    assert m.conv_linear_gmacs == pytest.approx(1.814, abs=5e-4)  # torchvision's published 1.81 "GFLOPS"
    assert 1.002 < m.gmacs / m.conv_linear_gmacs < 1.0055  # BatchNorm and pooling: +0.2-0.55 % on ResNets


def test_mobilenet_v2_batchnorm_weighs_more():
    m = count_macs(torchvision.models.mobilenet_v2(), (3, 224, 224))
    assert m.conv_linear_gmacs == pytest.approx(0.30, abs=0.005)  # torchvision's published 0.30
    assert 1.035 < m.gmacs / m.conv_linear_gmacs < 1.05
