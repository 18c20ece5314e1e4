"""Family rules: thinner and shallower students, ladder ordering and ratios."""

from compressor.derive.candidates import ladder
from compressor.derive.rules import student_arch
from compressor.models import parse_arch
from compressor.models.spec import ModelSpec


def test_paper_pairs_from_policy():
    assert student_arch(parse_arch("wrn-40-4"), 2, 0.5).name == "wrn-16-2"
    assert student_arch(parse_arch("wrn-16-2"), 2, 0.5).name == "wrn-16-1"
    assert student_arch(parse_arch("resnet56"), 3, 0.5).name == "resnet20-w8"
    assert student_arch(parse_arch("resnet34"), 2, 1.0).name == "resnet18"


def test_ladder_is_smaller_and_sorted():
    cands = ladder(ModelSpec.for_arch("wrn-40-2", 10))
    names = [c.name for c in cands]
    assert "wrn-40-2" not in names and "wrn-16-1" in names and "wrn-16-2" in names
    assert all(c.param_ratio > 1 and c.mac_ratio > 1 for c in cands)
    assert [c.gmacs for c in cands] == sorted((c.gmacs for c in cands), reverse=True)
    wrn162 = next(c for c in cands if c.name == "wrn-16-2")
    assert wrn162.params == 691_674
    assert abs(wrn162.param_ratio - 2_243_546 / 691_674) < 1e-9


def test_imagenet_resnet_ladder_shrinks_stages():
    spec = ModelSpec.for_arch("resnet18", 10, input_size=(3, 64, 64))
    cands = ladder(spec)
    shallow = [c for c in cands if c.spec.arch_kwargs["layers"] == [1, 1, 1, 1]]
    assert shallow and all(c.params < 11_181_642 for c in cands)
