"""Derived students: Torch-Pruning thinning, block removal, plans that rebuild, inherited weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.derive.candidates import derived_candidate, ladder
from compressor.derive.thinning import Thinner, block_stages, check_traceable, inherit, keep_count, parse_widths, thin
from compressor.errors import CheckpointError, ConfigError, ModelError
from compressor.export.onnx import check_parity, to_onnx
from compressor.models.checkpoint import load_model, save_checkpoint
from compressor.models.plan import apply_plan
from compressor.models.registry import parse_arch
from compressor.models.spec import ModelSpec
from compressor.pair import find_pairs
from compressor.profiling.counts import count_macs, count_params

SIZE = (3, 32, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


class Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyNet(nn.Module):
    """A user's own CNN: a Sequential stage, a ModuleList stage called in a loop, a linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.stage1 = nn.Sequential(Res(32), Res(32), Res(32))
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.stage2 = nn.ModuleList([Res(64), Res(64)])
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.down(self.stage1(self.stem(x)))
        for block in self.stage2:
            x = block(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Gated(TinyNet):
    """Data-dependent control flow: cannot be traced."""

    def __init__(self, num_classes: int = 10):
        super().__init__(num_classes)
        self.gate = Gate()

    def forward(self, x):
        return super().forward(self.gate(x))


class Gate(nn.Module):
    def forward(self, x):
        return x * 2 if x.mean() > 0 else x


def _trained_like(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give batch norms non-trivial statistics and scales, as a trained teacher has."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):  # per-channel scales: magnitudes that rank channels, unlike a fresh init
            m.weight.data *= torch.rand(m.out_channels, 1, 1, 1, generator=g) * 2
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.1
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.1
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
    return model.eval()


# name, arch, expected removed blocks at <= 1 block per stage
CASES = {
    "resnet18": ("resnet18-cifar", ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]),
    "mobilenet_v2": ("mobilenet_v2", ["features.3", "features.5", "features.6", "features.8", "features.9", "features.10",
                                      "features.12", "features.13", "features.15", "features.16"]),
    "custom": (f"{__file__}:TinyNet", ["stage1.1", "stage1.2", "stage2.1"]),
}


@pytest.fixture(scope="module", params=list(CASES))
def derived(request, tmp_path_factory):
    arch_name, removed = CASES[request.param]
    torch.manual_seed(0)
    spec = ModelSpec.for_arch(arch_name, 10, input_size=SIZE)
    teacher = _trained_like(spec.build())
    cand = derived_candidate(spec, teacher, 0.5, max_blocks=1)
    student = inherit(teacher, cand.spec.plan).eval()
    return request.param, spec, teacher, cand, student, removed, tmp_path_factory.mktemp(request.param)


def test_thinner_shallower_runs_and_is_smaller(derived):
    name, spec, teacher, cand, student, removed, _ = derived
    plan = cand.spec.plan
    assert plan.removed_blocks == removed
    assert all(isinstance(student.get_submodule(b), nn.Identity) for b in removed)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert student(x).shape == (2, 10)
    t_params, t_gmacs = count_params(teacher)["total"], count_macs(teacher, SIZE).gmacs
    assert cand.params == count_params(student)["total"] and abs(cand.gmacs - count_macs(student, SIZE).gmacs) < 1e-12
    # half the channels and fewer blocks: well under a quarter of the multiply-adds
    assert cand.mac_ratio == pytest.approx(t_gmacs / cand.gmacs) and cand.mac_ratio > 4.5
    assert cand.param_ratio == pytest.approx(t_params / cand.params) and cand.param_ratio > 3.5
    # the classifier keeps its outputs; every thinned width is a multiple of 8
    assert plan.channels[plan.classifier] == 10
    assert all(c % 8 == 0 for n, c in plan.channels.items() if n != plan.classifier)


def test_resnet18_matches_the_family_rule_exactly(derived):
    """Half width, one block per stage of resnet18-cifar is resnet-basic-1.1.1.1 at width 0.5."""
    name, spec, teacher, cand, student, removed, _ = derived
    if name != "resnet18":
        pytest.skip("the family rule exists for ResNets only")
    zoo = ModelSpec("resnet", {"block": "basic", "layers": [1, 1, 1, 1], "width": 0.5, "cifar_stem": True}, 10, input_size=SIZE).build()
    assert cand.params == count_params(zoo)["total"] == 1_228_970
    assert cand.gmacs == pytest.approx(count_macs(zoo, SIZE).gmacs, rel=1e-9)


def test_onnx_parity(derived):
    name, spec, teacher, cand, student, removed, tmp = derived
    path = to_onnx(student, SIZE, tmp / "student.onnx")
    parity = check_parity(student, path, SIZE, batch_sizes=(1, 3))
    assert parity.worst <= 1e-4


def test_checkpoint_reloads_with_weights_only(derived):
    name, spec, teacher, cand, student, removed, tmp = derived
    path = tmp / "student.pt"
    save_checkpoint(path, student, cand.spec, {"top1": 1.0})
    blob = torch.load(path, map_location="cpu", weights_only=True)  # plain data only: no pickled code
    assert blob["spec"]["plan"]["removed_blocks"] == removed
    if spec.family == "file":  # rebuilding imports the model's file: only with the user's word (issue 21)
        with pytest.raises(CheckpointError, match="rebuilds its model by importing the Python file"):
            load_model(path)
    model, spec2, _ = load_model(path, arch=CASES[name][0] if spec.family == "file" else None)
    assert spec2.plan == cand.spec.plan and spec2.name == cand.name
    x = torch.randn(4, *SIZE)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), student(x))


def test_inherits_the_teachers_surviving_weights(derived):
    name, spec, teacher, cand, student, removed, _ = derived
    kept = cand.spec.plan.kept
    conv = next(n for n, d in kept.items() if "out" in d and "in" in d and isinstance(student.get_submodule(n), nn.Conv2d)
                and student.get_submodule(n).groups == 1)
    w_t, w_s = teacher.get_submodule(conv).weight, student.get_submodule(conv).weight
    assert torch.equal(w_s, w_t[kept[conv]["out"]][:, kept[conv]["in"]])
    # magnitude importance: the kept output channels of the stem are the strongest of their group
    assert len(kept[conv]["out"]) == w_s.shape[0] < w_t.shape[0]
    # a fresh build of the plan has the same shapes but not the teacher's weights (scratch)
    torch.manual_seed(0)
    scratch = cand.spec.build()
    assert {k: v.shape for k, v in scratch.state_dict().items()} == {k: v.shape for k, v in student.state_dict().items()}
    assert not torch.equal(scratch.get_submodule(conv).weight, w_s)


def test_pairs_by_surviving_module_names(derived):
    name, spec, teacher, cand, student, removed, _ = derived
    pairs = find_pairs(student, teacher, torch.zeros(1, *SIZE))
    assert len(pairs) >= 2
    teacher_names = dict(teacher.named_modules())
    for p in pairs:  # same resolution; the student's stage output is a module the teacher has too
        assert p.student.module in teacher_names
        assert p.student.resolution == p.teacher.resolution
        assert p.student.shape[0] < p.teacher.shape[0]
    if name == "resnet18":  # stages are containers: the very same names
        assert [p.student.module for p in pairs] == [p.teacher.module for p in pairs] == ["layer1", "layer2", "layer3", "layer4"]


def test_per_stage_widths_touch_only_that_stage():
    student, plan = thin(_trained_like(TinyNet()), SIZE, {"stage2": 0.5})
    # stage2's residual sum ties its blocks to the downsampling conv: all of them go to 32
    assert student.stage2[0].conv1.out_channels == 32 and student.stage2[1].conv2.out_channels == 32
    assert student.down[0].out_channels == 32 and student.head.in_features == 32 and student.head.out_features == 10
    assert student.stem[0].out_channels == 32 and student.stage1[2].conv1.out_channels == 32
    assert parse_widths("0.75,layer4=0.5") == {"": 0.75, "layer4": 0.5}
    with pytest.raises(ConfigError, match="must lie in"):
        parse_widths("1.5")
    with pytest.raises(ConfigError, match="no module of TinyNet"):
        thin(TinyNet(), SIZE, {"layer4": 0.5})


def test_keep_count_rounds_to_multiples_of_eight():
    assert keep_count(64, 0.58) == 40   # 37.1 -> nearest multiple of 8
    assert keep_count(64, 0.55) == 32
    assert keep_count(24, 0.5) == 16    # 12 rounds half up
    assert keep_count(12, 0.1) == 8     # never below 8 ...
    assert keep_count(4, 0.5) == 4      # ... unless the layer had fewer
    assert keep_count(64, 0.3, round_to=1) == 19


def test_plan_replay_is_deterministic_and_checks_its_fit():
    teacher = _trained_like(TinyNet())
    _, plan = thin(teacher, SIZE, 0.5, max_blocks=2)
    a, b = apply_plan(TinyNet(), plan), apply_plan(TinyNet(), plan)
    assert [v.shape for v in a.state_dict().values()] == [v.shape for v in b.state_dict().values()]
    assert plan.removed_blocks == ["stage1.2"]
    assert torch.equal(inherit(teacher, plan).stage2[1].conv1.weight, inherit(teacher, plan).stage2[1].conv1.weight)
    with pytest.raises(ModelError, match="does not fit|names a layer"):
        apply_plan(parse_arch("resnet18-cifar").build(10), plan)


def test_untraceable_model_gets_one_line_error_naming_the_module():
    with pytest.raises(ModelError) as err:
        check_traceable(Gated(), SIZE)
    msg = str(err.value)
    assert msg.startswith("gate cannot be traced") and "--student" in msg and "\n" not in msg


def test_block_stages_need_shape_keeping_blocks_of_one_class():
    stages = block_stages(TinyNet(), SIZE)
    assert [(s.name, s.blocks) for s in stages] == [("stage1", ("stage1.0", "stage1.1", "stage1.2")),
                                                     ("stage2", ("stage2.0", "stage2.1"))]
    plain = nn.Sequential(*[m for _ in range(3) for m in (nn.Conv2d(3 if _ == 0 else 8, 8, 3, padding=1), nn.ReLU())],
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    assert block_stages(plain, SIZE) == []  # VGG-like plain convolutions: nothing removable


def test_ladder_for_a_family_less_teacher_is_derived():
    spec = ModelSpec.for_arch(f"{__file__}:TinyNet", 10, input_size=SIZE)
    cands = ladder(spec)
    assert cands and all(c.spec.plan is not None and c.gmacs < count_macs(spec.build(), SIZE).gmacs for c in cands)
    assert [c.gmacs for c in cands] == sorted((c.gmacs for c in cands), reverse=True)
    assert any(c.spec.plan.removed_blocks for c in cands)


def test_thinner_reuses_its_ranking():
    teacher = _trained_like(TinyNet())
    thinner = Thinner(teacher, SIZE)
    wide, _ = thinner.student(0.75)
    thin, _ = thinner.student(0.25)
    assert wide.stem[0].out_channels == 24 and thin.stem[0].out_channels == 8
    assert count_params(thin)["total"] < count_params(wide)["total"] < count_params(teacher)["total"]
