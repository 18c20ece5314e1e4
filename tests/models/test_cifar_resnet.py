"""The CIFAR ResNets of the KD literature (resnetDxK, 1x1-conv shortcuts) and torchdistill's WRN
(wrn-D-K-td): sizes against the figures their projects publish, names, student derivation and
where attention transfer taps them."""

import pytest
import torch

from compressor.derive.rules import ladder_archs, student_arch
from compressor.errors import ModelError
from compressor.models import create_model, parse_arch
from compressor.models.registry import describe_models, list_models
from compressor.pair import find_pairs, find_stages
from compressor.profiling.counts import count_params


# CIFAR-100 (100 classes). tests/models/test_importers.py checks that these equal the counts of the
# RepDistiller/torchdistill-structured definitions written there.
@pytest.mark.parametrize("name,params", [("resnet8x4", 1_233_540), ("resnet32x4", 7_433_860), ("resnet56x1", 861_620),
                                         ("resnet110x1", 1_736_564), ("resnet20x1", 278_324), ("wrn-40-2-td", 2_255_156)])
def test_param_counts(name, params):
    assert count_params(create_model(name, 100))["total"] == params


def test_the_stem_is_its_own_width():
    m = create_model("resnet32x4", 10)
    assert m.conv1.out_channels == 32 and [m.layer1[0].conv1.out_channels, m.layer2[0].conv1.out_channels,
                                           m.layer3[0].conv1.out_channels] == [64, 128, 256]
    assert m.layer1[0].downsample is not None  # 32 → 64 needs a projection already in the first stage
    small = create_model("resnet56x1", 10)
    assert small.conv1.out_channels == 16 and small.layer1[0].downsample is None and small.layer2[0].downsample is not None
    assert create_model("resnet8x4-s64", 10).conv1.out_channels == 64


@pytest.mark.parametrize("name", ["resnet8x4", "resnet32x4", "resnet56x1", "resnet8x4-s64", "resnet20x0.5", "wrn-16-2-td"])
def test_names_round_trip(name):
    assert parse_arch(name).name == name and parse_arch(parse_arch(name).name) == parse_arch(name)


def test_bad_names_say_what_is_wrong():
    with pytest.raises(ModelError, match="6n\\+2"):
        parse_arch("resnet9x4")
    with pytest.raises(ModelError, match="16K"):
        parse_arch("resnet8x0.3")
    assert parse_arch("resnet56").family == "cifar_resnet"  # He et al.'s option-A net keeps its name


def test_listed_in_atc_models():
    families = {r["family"] for r in describe_models()}
    assert {"kd_resnet", "wrn_td"} <= families
    assert "resnet8x4" in list_models("resnet8x4") and "wrn-40-4-td" in list_models("wrn-40-*-td")


def test_family_rule_derives_the_literatures_students():
    assert [a.name for a in ladder_archs(parse_arch("resnet32x4"))][:3] == ["resnet32x2", "resnet32x1", "resnet20x4"]
    assert "resnet8x4" in [a.name for a in ladder_archs(parse_arch("resnet32x4"))]
    assert student_arch(parse_arch("resnet32x4"), 1, 1.0).name == "resnet8x4"
    assert student_arch(parse_arch("resnet110x1"), 3, 1.0).name == "resnet20x1"
    assert student_arch(parse_arch("wrn-40-4-td"), 2, 0.5).name == "wrn-16-2-td"
    assert all(a.family == "kd_resnet" for a in ladder_archs(parse_arch("resnet56x1")))
    assert min(parse_arch(a.name).kwargs["k"] for a in ladder_archs(parse_arch("resnet56x1"))) == 0.5  # never thinner than 8/16/32


@pytest.mark.parametrize("name", ["resnet8x4", "resnet32x1", "wrn-16-1-td"])
def test_attention_stages_are_the_resolution_stages(name):
    stages = find_stages(create_model(name, 10), torch.randn(1, 3, 32, 32))
    assert [s.module for s in stages] == ["layer1", "layer2", "layer3"]
    assert [s.resolution for s in stages] == [(32, 32), (16, 16), (8, 8)]
    assert not any(s.from_tuple for s in stages)


def test_teacher_and_student_pair_stage_by_stage():
    pairs = find_pairs(create_model("resnet8x1", 100), create_model("resnet32x4", 100), torch.randn(1, 3, 32, 32))
    assert [(p.student.module, p.teacher.module) for p in pairs] == [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]
    assert pairs[0].teacher.shape == (64, 32, 32) and pairs[0].student.shape == (16, 32, 32)
