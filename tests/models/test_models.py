"""The zoo: exact parameter counts (DESIGN.md) and fvcore MACs."""

import pytest
import torch

from compressor.errors import ModelError
from compressor.models import create_model, parse_arch
from compressor.profiling.counts import count_macs, count_params


@pytest.mark.parametrize("name,params", [("wrn-16-1", 175_066), ("wrn-16-2", 691_674), ("wrn-40-1", 563_930),
                                         ("wrn-40-2", 2_243_546), ("wrn-40-4", 8_949_210), ("resnet20", 269_722),
                                         ("resnet56", 853_018)])
def test_cifar_param_counts(name, params):
    assert count_params(create_model(name, 10))["total"] == params


def test_torchvision_resnets_match_torchvision():
    import torchvision

    for name in ("resnet18", "resnet50"):
        ours = create_model(name, 1000)
        ref = getattr(torchvision.models, name)(weights=None)
        assert count_params(ours)["total"] == count_params(ref)["total"]
        ours.load_state_dict(ref.state_dict())  # same key layout


@pytest.mark.parametrize("name,size,gmacs", [("wrn-40-4", 32, 1.301), ("wrn-16-2", 32, 0.1016), ("resnet18", 224, 1.819)])
def test_fvcore_gmacs(name, size, gmacs):
    model = create_model(name, 1000 if name == "resnet18" else 10)
    assert count_macs(model, (3, size, size)).gmacs == pytest.approx(gmacs, rel=5e-3)


def test_wrn_forward_shape():
    out = create_model("wrn-16-1", 7)(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)


def test_unknown_arch_suggests_close_names():
    with pytest.raises(ModelError, match="wrn-40-4"):
        parse_arch("wrn-41-4")


def test_one_registration_per_family_agrees_with_the_derivation_rules():
    from compressor.derive.rules import FAMILY_RULES
    from compressor.models.registry import FAMILIES, describe_models, parse_arch

    assert tuple(sorted(n for n, f in FAMILIES.items() if f.derive == "family rule")) == tuple(sorted(FAMILY_RULES))
    for family in FAMILIES.values():  # every family's listed names parse back to that family
        for name in family.names("*")[:5]:
            assert parse_arch(name).family == family.name, name
    assert {row["family"] for row in describe_models()} == set(FAMILIES)
