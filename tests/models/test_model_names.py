"""Models by name from torchvision (``tv:NAME``) and timm (``timm:NAME``): parsing, display names,
building for the data's classes without downloads, thinning, stage finding and checkpoints."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from compressor.derive.thinning import thin
from compressor.errors import ModelError
from compressor.models.checkpoint import load_model, save_checkpoint
from compressor.models.registry import TORCHVISION_GENERIC, Arch, create_model, describe_models, list_models, parse_arch
from compressor.models.spec import ModelSpec
from compressor.pair import find_stages

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")

TIMM = "timm:resnet10t"  # small and fast at 32x32; a residual net, unlike tv:mobilenet_v3_small
NAMES = ["tv:mobilenet_v3_small", pytest.param(TIMM, marks=needs_timm)]
SIZE = (3, 32, 32)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model builder tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, *SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name, family, shown", [
    ("tv:mobilenet_v3_small", "torchvision", "mobilenet_v3_small"),  # in the generic list: bare name
    ("mobilenet_v3_small", "torchvision", "mobilenet_v3_small"),
    ("tv:resnet18", "torchvision", "tv:resnet18"),  # bare resnet18 is the zoo's own ResNet
    ("TV:ConvNeXt_Tiny", "torchvision", "tv:convnext_tiny"),
    pytest.param("timm:resnet10t", "timm", "timm:resnet10t", marks=needs_timm),
])
def test_names_round_trip_through_family_and_kwargs(name, family, shown):
    arch = parse_arch(name)
    assert arch.family == family
    rebuilt = Arch(arch.family, dict(arch.kwargs))  # what a checkpoint's ModelSpec holds
    assert rebuilt.name == shown
    assert parse_arch(rebuilt.name) == arch


def test_tv_resnet18_is_not_the_zoo_resnet18():
    assert parse_arch("resnet18").family == "resnet"
    assert type(parse_arch("tv:resnet18").build(3)).__module__.startswith("torchvision")


@pytest.mark.parametrize("name", NAMES)
def test_builds_for_the_data_classes_without_weights(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3).eval()
    with torch.no_grad():
        assert model(_x()).shape == (2, 3)


@needs_timm
def test_pretrained_weights_are_refused():
    with pytest.raises(ModelError, match="without pretrained weights"):
        create_model(TIMM, num_classes=3, pretrained=True)


@pytest.mark.parametrize("name, says", [
    ("tv:mobilenet_v9", "did you mean tv:mobilenet_v2"),
    pytest.param("timm:resnet10x", "did you mean timm:", marks=needs_timm),
    pytest.param("timm:hf-hub:someone/model", "architecture name alone", marks=needs_timm),
    ("no-such-net", "tv:NAME for torchvision's"),
])
def test_unknown_names_say_how_to_find_names(name, says):
    with pytest.raises(ModelError) as err:
        parse_arch(name)
    message = str(err.value)
    assert "\n" not in message and says in message
    if "hub" not in name:
        assert "`atc models`" in message


def test_timm_missing_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    for attempt in (lambda: parse_arch(TIMM), lambda: Arch("timm", {"name": "resnet10t"}).build(3)):
        with pytest.raises(ModelError) as err:
            attempt()
        assert "pip install 'atc[timm]'" in str(err.value) and "\n" not in str(err.value)
    row = next(r for r in describe_models() if r["names"] == "timm:NAME")
    assert "pip install 'atc[timm]'" in row["about"]
    assert parse_arch("tv:mobilenet_v3_small").family == "torchvision"  # the rest still works


def test_describe_models_names_every_way_to_name_a_model():
    rows = describe_models()
    assert all(set(r) == {"names", "family", "derive", "about"} and all(isinstance(v, str) for v in r.values()) for r in rows)
    names = [r["names"] for r in rows]
    for expected in ("wrn-D-K", "tv:NAME", "timm:NAME", "path/to/file.py:ClassName"):
        assert expected in names
    assert {r["derive"] for r in rows} == {"family rule", "thinning"}
    generic = next(r for r in rows if "mobilenet_v2" in r["names"])["names"].split(", ")
    assert generic == list(TORCHVISION_GENERIC)
    assert all(parse_arch(n).family == "torchvision" for n in generic)


@needs_timm
def test_describe_models_with_a_pattern_lists_parseable_names():
    rows = describe_models("mobilenetv3_small")
    assert rows and all(r["names"].startswith("timm:") for r in rows)
    assert all(parse_arch(r["names"]).family == r["family"] for r in rows[:3])
    assert "tv:convnext_tiny" in [r["names"] for r in describe_models("convnext")]
    assert [r["names"] for r in describe_models("wrn-16-*")][:2] == ["wrn-16-1", "wrn-16-2"]


def test_list_models_returns_names_that_parse():
    names = list_models("wrn-16-*")
    assert names[:2] == ["wrn-16-1", "wrn-16-2"] and all(isinstance(n, str) for n in names)
    assert names == [r["names"] for r in describe_models("wrn-16-*")]
    assert all(parse_arch(n).family == ("wrn_td" if n.endswith("-td") else "wrn") for n in names)
    assert "tv:convnext_tiny" in list_models("convnext") and "wrn-16-1" not in list_models("convnext")
    assert set(list_models("wrn-16-*")) < set(list_models())


@pytest.fixture(scope="module", params=NAMES)
def derived(request):
    torch.manual_seed(0)
    arch = parse_arch(request.param)
    teacher = arch.build(3).eval()
    ref = {"family": arch.family, "kwargs": dict(arch.kwargs), "name": arch.name}
    student, plan = thin(teacher, SIZE, 0.5, teacher_arch=ref)
    return arch, teacher, student.eval(), plan


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_thins_to_half_width(derived):
    arch, teacher, student, plan = derived
    with torch.no_grad():
        assert student(_x()).shape == (2, 3)
    assert 0.15 < _params(student) / _params(teacher) < 0.4  # half width: about a quarter of the weights
    assert plan.name == f"{arch.name}-w0.5"


def test_resolution_stages_are_found_and_paired_by_name(derived):
    _, teacher, student, _ = derived
    t_stages, s_stages = find_stages(teacher, _x()), find_stages(student, _x())
    assert len(t_stages) >= 3
    assert [s.module for s in s_stages] == [t.module for t in t_stages]
    assert [s.shape[1:] for s in s_stages] == [t.shape[1:] for t in t_stages]
    assert all(s.shape[0] < t.shape[0] for s, t in zip(s_stages, t_stages))


def test_checkpoints_rebuild_with_weights_only(derived, tmp_path):
    arch, teacher, student, plan = derived
    x = _x()
    for model, spec in ((teacher, ModelSpec(arch.family, dict(arch.kwargs), 3, input_size=SIZE)),
                        (student, ModelSpec(arch.family, dict(arch.kwargs), 3, input_size=SIZE, plan=plan))):
        path = tmp_path / "m.pt"
        save_checkpoint(path, model, spec)
        assert torch.load(path, weights_only=True)["spec"]["family"] == arch.family
        loaded, loaded_spec, _ = load_model(path)
        assert loaded_spec.arch == arch and loaded_spec.name == spec.name
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), model(x))
