"""Teachers from other projects: each source project's model is written here from the structure of
its public code, saved the way that project saves it, loaded through atc, and its logits compared.

The definitions below are this project's own code that follows each project's module names and
arithmetic (RepDistiller/mdistiller ``models/resnet.py`` and ``models/wrn.py``, torchdistill's CIFAR
ResNet and WRN, the functional WRN of szagoruyko/attention-transfer); timm is used as installed.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import CheckpointError
from compressor.models import create_model
from compressor.models.checkpoint import read_model
from compressor.pair import find_pairs, find_stages, stage_outputs

REL = 1e-5  # the acceptance bound: equal logits up to float rounding


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so that a wrong mapping shows in eval-mode logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().detach())


def assert_same_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    """≤ REL relative; the difference is printed (``pytest -rP`` shows it: the README's table quotes these)."""
    diff = rel_diff(got, want)
    print(f"logit difference (max |atc - source| / max |source|): {diff:.2e}")
    assert diff <= REL


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(x)
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------- RepDistiller / mdistiller CIFAR ResNet


class LitBlock(nn.Module):
    """RepDistiller's BasicBlock: post-activation, 1x1 conv + BN shortcut, (out, preact) from a stage's last block."""

    def __init__(self, cin: int, cout: int, stride: int, is_last: bool):
        super().__init__()
        self.is_last = is_last
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else None

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        preact = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + residual
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class LitResNet(nn.Module):
    """RepDistiller's ResNet(depth, num_filters); ``feats=True`` is mdistiller's, whose forward returns (logits, feats)."""

    def __init__(self, depth: int, filters: list[int], num_classes: int, feats: bool = False):
        super().__init__()
        n, self.feats = (depth - 2) // 6, feats
        self.conv1 = nn.Conv2d(3, filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], filters[0]
        for i, w in enumerate(filters[1:]):
            blocks = [LitBlock(cin if b == 0 else w, w, (1 if i == 0 else 2) if b == 0 else 1, b == n - 1) for b in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(filters[3], num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        f0 = x
        x, p1 = self.layer1(x)
        x, p2 = self.layer2(x)
        x, p3 = self.layer3(x)
        avg = self.avgpool(x).reshape(x.size(0), -1)
        out = self.fc(avg)
        return (out, {"feats": [f0, x], "preact_feats": [p1, p2, p3], "pooled_feat": avg}) if self.feats else out


LIT_RESNETS = {"resnet8x4": (8, [32, 64, 128, 256]), "resnet32x4": (32, [32, 64, 128, 256]),
               "resnet20": (20, [16, 16, 32, 64]), "resnet56": (56, [16, 16, 32, 64]), "resnet110": (110, [16, 16, 32, 64])}
ATC_NAME = {"resnet8x4": "resnet8x4", "resnet32x4": "resnet32x4", "resnet20": "resnet20x1", "resnet56": "resnet56x1",
            "resnet110": "resnet110x1"}


def lit_resnet(name: str, classes: int = 100, feats: bool = False) -> LitResNet:
    depth, filters = LIT_RESNETS[name]
    torch.manual_seed(1)
    return randomise_bn(LitResNet(depth, filters, classes, feats))


def sgd_state(model: nn.Module) -> dict:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4).state_dict()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if LIT_RESNETS[n][0] > 20 else n for n in LIT_RESNETS])  # deep ones: slow set
def test_repdistiller_cifar_resnets_load_exactly_without_arch(tmp_path, name):
    src = lit_resnet(name)
    assert sum(p.numel() for p in src.parameters()) == sum(p.numel() for p in create_model(ATC_NAME[name], 100).parameters())
    torch.save({"epoch": 240, "model": src.state_dict(), "accuracy": torch.tensor(72.5), "optimizer": sgd_state(src)},
               tmp_path / "ckpt_epoch_240.pth")
    loaded = read_model(tmp_path / "ckpt_epoch_240.pth")
    assert loaded.spec.name == ATC_NAME[name] and loaded.spec.num_classes == 100
    assert f"inferred --arch {ATC_NAME[name]} from the weights" in loaded.notes
    assert "RepDistiller" in loaded.source
    x = torch.randn(2, 3, 32, 32)
    assert_same_logits(logits_of(loaded.model, x), logits_of(src, x))


def test_repdistiller_last_pth_with_its_namespace_loads_without_trust(tmp_path):
    src = lit_resnet("resnet8x4")
    opt = argparse.Namespace(model="resnet8x4", dataset="cifar100", learning_rate=0.05, lr_decay_epochs=[150, 180, 210],
                             model_path="./save/models", trial=0)
    torch.save({"opt": opt, "model": src.state_dict(), "optimizer": sgd_state(src)}, tmp_path / "resnet8x4_last.pth")
    loaded = read_model(tmp_path / "resnet8x4_last.pth")  # no --trust-checkpoint: the Namespace is plain data
    assert loaded.spec.name == "resnet8x4"
    assert any("named by the file" in n for n in loaded.notes)
    x = torch.randn(2, 3, 32, 32)
    assert_same_logits(logits_of(loaded.model, x), logits_of(src, x))


def test_a_namespace_does_not_open_the_door_to_other_classes(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"opt": argparse.Namespace(model="resnet8x4", evil=Payload()), "model": {}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        read_model(tmp_path / "bad.pth")
    assert not marker.exists()


def test_mdistiller_model_returning_logits_and_feats_loads_and_pairs_at_stage_outputs(tmp_path):
    src = lit_resnet("resnet32x4", feats=True)
    torch.save({"model": src.state_dict()}, tmp_path / "student_best")
    loaded = read_model(tmp_path / "student_best")
    x = torch.randn(2, 3, 32, 32)
    assert loaded.spec.name == "resnet32x4"
    assert_same_logits(logits_of(loaded.model, x), logits_of(src, x))
    # the source class itself: its tuple-returning stages are found at the stage outputs, not a shortcut branch
    stages = find_stages(src, x)
    assert [s.module for s in stages] == ["layer1", "layer2", "layer3"] and all(s.from_tuple for s in stages)
    pairs = find_pairs(create_model("resnet8x4", 100), lit_resnet("resnet32x4"), x)
    assert [p.teacher.module for p in pairs] == ["layer1", "layer2", "layer3"]
    assert "layer1[0]" in pairs[0].describe() and "first tensor" in pairs[0].describe()


@pytest.mark.slow
def test_tuple_stage_outputs_equal_the_atc_models_stage_outputs():
    src = lit_resnet("resnet8x4")
    ours = create_model("resnet8x4", 100).eval()
    ours.load_state_dict(src.state_dict())
    x = torch.randn(2, 3, 32, 32)
    names = ["layer1", "layer2", "layer3"]
    for model in (src, ours):
        wrapped, _ = stage_outputs(model, names, x)
        with torch.no_grad():
            logits, maps = wrapped(x)
        assert all(isinstance(m, torch.Tensor) and m.dim() == 4 for m in maps)
        if model is src:
            ref = maps
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(maps, ref))


def test_mdistiller_distiller_checkpoint_holds_two_models(tmp_path):
    student, teacher = lit_resnet("resnet8x4", feats=True), lit_resnet("resnet32x4", feats=True)
    both = {**{f"module.student.{k}": v for k, v in student.state_dict().items()},
            **{f"module.teacher.{k}": v for k, v in teacher.state_dict().items()}}
    torch.save({"epoch": 240, "model": both, "optimizer": {}, "best_acc": 76.0}, tmp_path / "latest")
    with pytest.raises(CheckpointError, match=r"holds 2 models \(resnet8x4 under student\., resnet32x4 under teacher\.\)"):
        read_model(tmp_path / "latest")
    loaded = read_model(tmp_path / "latest", arch="resnet32x4")
    assert any("under the prefix teacher." in n for n in loaded.notes)
    x = torch.randn(2, 3, 32, 32)
    assert_same_logits(logits_of(loaded.model, x), logits_of(teacher, x))


# ---------------------------------------------------------------- RepDistiller WRN (the widespread public CIFAR WRN)


class LitWrnBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        o = self.relu1(self.bn1(x))
        y = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        return (x if self.equal else self.convShortcut(o)) + y


class LitWrnGroup(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[LitWrnBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class LitWrn(nn.Module):
    def __init__(self, depth: int, k: int, classes: int):
        super().__init__()
        n, ch = (depth - 4) // 6, [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1, self.block2, self.block3 = (LitWrnGroup(n, ch[i], ch[i + 1], 1 if i == 0 else 2) for i in range(3))
        self.bn1, self.relu = nn.BatchNorm2d(ch[3]), nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], classes)

    def forward(self, x):
        out = self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(F.avg_pool2d(out, 8).flatten(1))


def test_repdistiller_wrn_loads_exactly_without_arch(tmp_path):
    torch.manual_seed(2)
    src = randomise_bn(LitWrn(40, 2, 100))
    torch.save({"epoch": 240, "model": src.state_dict(), "best_acc": torch.tensor(75.6), "optimizer": sgd_state(src)},
               tmp_path / "wrn_40_2_best.pth")
    loaded = read_model(tmp_path / "wrn_40_2_best.pth")
    assert loaded.spec.name == "wrn-40-2" and any("block1.layer.0" in n for n in loaded.notes)
    x = torch.randn(2, 3, 32, 32)
    assert_same_logits(logits_of(loaded.model, x), logits_of(src, x))


# ---------------------------------------------------------------- torchdistill


class TdResNet(nn.Module):
    """torchdistill's ResNet4Cifar: torchvision's BasicBlock, 16/32/64 channels, AvgPool2d(8, stride=1)."""

    def __init__(self, depth: int, classes: int):
        from torchvision.models.resnet import BasicBlock, conv1x1

        super().__init__()
        n, self.inplanes = (depth - 2) // 6, 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        layers = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            down = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes)) \
                if stride != 1 or self.inplanes != planes else None
            blocks = [BasicBlock(self.inplanes, planes, stride, down)] + [BasicBlock(planes, planes) for _ in range(n - 1)]
            self.inplanes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AvgPool2d(8, stride=1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TdWideBlock(nn.Module):
    """torchdistill's WideBasicBlock: the shortcut convolution takes the raw input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.relu = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.dropout = nn.Dropout(0.3)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = self.conv2(self.relu(self.bn2(self.dropout(self.conv1(self.relu(self.bn1(x)))))))
        return out + self.shortcut(x)


class TdWrn(nn.Module):
    def __init__(self, depth: int, k: int, classes: int):
        super().__init__()
        n, sizes = (depth - 4) // 6, [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        layers, cin = [], 16
        for i, stride in enumerate((1, 2, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(TdWideBlock(cin, sizes[i + 1], s))
                cin = sizes[i + 1]
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn1, self.relu = nn.BatchNorm2d(sizes[3]), nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(sizes[3], classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.layer3(self.layer2(self.layer1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torchdistill_ckpt(model: nn.Module, path) -> None:
    """``save_ckpt``: model, optimizer, best value, lr scheduler state (MultiStepLR keeps a Counter) and the parsed args."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[91, 136], gamma=0.1)
    args = argparse.Namespace(config="configs/sample/cifar10/kd/resnet20_from_resnet110.yaml", device="cuda", world_size=1,
                              dist_url="env://", log_config=False, test_only=False)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "best_value": 0.93,
                "lr_scheduler": sched.state_dict(), "args": args}, path)


@pytest.mark.parametrize("depth", [20, pytest.param(56, marks=pytest.mark.slow)])
def test_torchdistill_cifar_resnet_loads_exactly(tmp_path, depth):
    torch.manual_seed(3)
    src = randomise_bn(TdResNet(depth, 10))
    torchdistill_ckpt(src, tmp_path / "td.pt")
    loaded = read_model(tmp_path / "td.pt")
    assert loaded.spec.name == f"resnet{depth}x1" and "torchdistill" in loaded.source
    x = torch.randn(2, 3, 32, 32)
    assert_same_logits(logits_of(loaded.model, x), logits_of(src, x))


@pytest.mark.slow
def test_torchdistill_wrn_needs_its_own_block_and_loads_exactly(tmp_path):
    torch.manual_seed(4)
    src = randomise_bn(TdWrn(16, 2, 10))
    torchdistill_ckpt(src, tmp_path / "td_wrn.pt")
    loaded = read_model(tmp_path / "td_wrn.pt")
    assert loaded.spec.name == "wrn-16-2-td"
    assert sum(p.numel() for p in loaded.model.parameters()) == sum(p.numel() for p in src.parameters())
    x = torch.randn(4, 3, 32, 32)
    assert_same_logits(logits_of(loaded.model, x), logits_of(src, x))
    # the reference WRN, given the same weights renamed, computes something else: the block variant matters
    ref = create_model("wrn-16-2", 10).eval()
    inner = {"bn1": "bn0", "conv1": "conv0", "bn2": "bn1", "conv2": "conv1"}
    renamed = {}
    for k, v in src.state_dict().items():
        p = k.split(".")
        if p[0].startswith("layer"):  # layerL.i.X… → group(L-1).i.X'…, shortcut.0.weight → shortcut.weight
            tail = ["shortcut", p[-1]] if p[2] == "shortcut" else [inner[p[2]]] + p[3:]
            renamed[".".join([f"group{int(p[0][5:]) - 1}", p[1]] + tail)] = v
        else:
            renamed[".".join([{"conv1": "conv0", "bn1": "bn"}.get(p[0], p[0])] + p[1:])] = v
    ref.load_state_dict(renamed)
    wrong = rel_diff(logits_of(ref, x), logits_of(src, x))
    print(f"the reference WRN on torchdistill's weights: logit difference {wrong:.2e}")
    assert wrong > 1e-2


# ---------------------------------------------------------------- the paper's functional WRN


def paper_params(depth: int, width: int, classes: int, seed: int = 5) -> dict[str, torch.Tensor]:
    """attention-transfer's ``resnet(depth, width, num_classes)`` parameters, flattened the way its utils.flatten does."""
    g = torch.Generator().manual_seed(seed)
    n, widths = (depth - 4) // 6, [int(v * width) for v in (16, 32, 64)]

    def conv(ni, no, k):
        return torch.randn(no, ni, k, k, generator=g) * math.sqrt(2 / (ni * k * k))

    def bn(prefix, c, out):
        out.update({f"{prefix}.weight": torch.rand(c, generator=g) + 0.5, f"{prefix}.bias": torch.randn(c, generator=g) * 0.1,
                    f"{prefix}.running_mean": torch.randn(c, generator=g) * 0.1, f"{prefix}.running_var": torch.rand(c, generator=g) + 0.5})

    params = {"conv0": conv(3, 16, 3)}
    ins = [16] + widths[:2]
    for gi in range(3):
        for b in range(n):
            ni, no, base = ins[gi] if b == 0 else widths[gi], widths[gi], f"group{gi}.block{b}"
            params[f"{base}.conv0"], params[f"{base}.conv1"] = conv(ni, no, 3), conv(no, no, 3)
            bn(f"{base}.bn0", ni, params)
            bn(f"{base}.bn1", no, params)
            if ni != no:
                params[f"{base}.convdim"] = conv(ni, no, 1)
    bn("bn", widths[2], params)
    params["fc.weight"], params["fc.bias"] = torch.randn(classes, widths[2], generator=g) * 0.1, torch.zeros(classes)
    return params


def paper_forward(x: torch.Tensor, params: dict[str, torch.Tensor], depth: int) -> torch.Tensor:
    """The functional forward of attention-transfer's cifar.py, in eval mode."""
    n = (depth - 4) // 6

    def bn(t, base):
        return F.batch_norm(t, params[base + ".running_mean"], params[base + ".running_var"], params[base + ".weight"],
                            params[base + ".bias"], training=False)

    def block(t, base, stride):
        o1 = F.relu(bn(t, base + ".bn0"))
        y = F.conv2d(o1, params[base + ".conv0"], stride=stride, padding=1)
        z = F.conv2d(F.relu(bn(y, base + ".bn1")), params[base + ".conv1"], padding=1)
        return z + (F.conv2d(o1, params[base + ".convdim"], stride=stride) if base + ".convdim" in params else t)

    o = F.conv2d(x, params["conv0"], padding=1)
    for gi, stride in enumerate((1, 2, 2)):
        for b in range(n):
            o = block(o, f"group{gi}.block{b}", stride if b == 0 else 1)
    o = F.avg_pool2d(F.relu(bn(o, "bn")), 8, 1, 0).flatten(1)
    return F.linear(o, params["fc.weight"], params["fc.bias"])


@pytest.mark.parametrize("depth,width", [(16, 2), pytest.param(40, 1, marks=pytest.mark.slow)])
def test_the_papers_functional_wrn_loads_exactly(tmp_path, depth, width):
    params = paper_params(depth, width, 10)
    opt = torch.optim.SGD([p.requires_grad_() for p in params.values()], lr=0.1, momentum=0.9)
    torch.save({"params": {k: v.detach() for k, v in params.items()}, "optimizer": opt.state_dict(), "epoch": 200},
               tmp_path / "model.pt7")
    loaded = read_model(tmp_path / "model.pt7")
    assert loaded.spec.name == f"wrn-{depth}-{width}" and "paper" in loaded.source
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = paper_forward(x, params, depth)
    assert_same_logits(logits_of(loaded.model, x), want)


# ---------------------------------------------------------------- Lightning, timm, DataParallel


class LitModule(nn.Module):
    """What a LightningModule's state_dict looks like: the network under an attribute."""

    def __init__(self, attr: str, net: nn.Module):
        super().__init__()
        setattr(self, attr, net)


@pytest.mark.parametrize("attr", ["model", "net", "backbone"])
def test_lightning_ckpt_with_the_modules_prefix_loads_exactly(tmp_path, attr):
    import torchvision

    torch.manual_seed(6)
    net = randomise_bn(torchvision.models.resnet18(num_classes=10))
    module = LitModule(attr, net)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[30, 60])
    torch.save({"epoch": 3, "global_step": 300, "pytorch-lightning_version": "2.4.0", "state_dict": module.state_dict(),
                "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3}}}},
                "callbacks": {"ModelCheckpoint{'monitor': 'val_acc'}": {"best_model_score": torch.tensor(0.9), "dirpath": "/x"}},
                "optimizer_states": [opt.state_dict()], "lr_schedulers": [sched.state_dict()],
                "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1, "arch": "resnet18"}}, tmp_path / "epoch=3.ckpt")
    loaded = read_model(tmp_path / "epoch=3.ckpt")
    assert loaded.spec.name == "resnet18" and loaded.source == "a PyTorch Lightning checkpoint"
    assert f"stripped the prefix {attr}. that every key has" in loaded.notes
    x = torch.randn(2, 3, 64, 64)
    assert_same_logits(logits_of(loaded.model, x), logits_of(net, x))


def test_timm_train_checkpoint_uses_its_arch_and_ema_weights(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(7)
    model, ema = randomise_bn(timm.create_model("resnet18", num_classes=10)), randomise_bn(timm.create_model("resnet18", num_classes=10), 9)
    args = argparse.Namespace(model="resnet18", num_classes=10, mean=None, std=None, model_ema=True, lr=0.1, epochs=3, sched="cosine")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.save({"epoch": 2, "arch": "resnet18", "state_dict": model.state_dict(), "optimizer": opt.state_dict(), "version": 2,
                "args": args, "state_dict_ema": ema.state_dict(), "metric": 41.0}, tmp_path / "model_best.pth.tar")
    loaded = read_model(tmp_path / "model_best.pth.tar")
    assert loaded.spec.name == "timm:resnet18" and any("named by the file" in n for n in loaded.notes)
    assert any("state_dict_ema" in n for n in loaded.notes)
    x = torch.randn(2, 3, 64, 64)
    assert_same_logits(logits_of(loaded.model, x), logits_of(ema, x))


def test_dataparallel_prefix_and_an_unnamed_nesting_key(tmp_path):
    src = randomise_bn(create_model("wrn-16-1", 10))
    torch.save({"weights": {f"module.{k}": v for k, v in src.state_dict().items()}, "step": 10}, tmp_path / "ddp.pt")
    loaded = read_model(tmp_path / "ddp.pt")
    assert loaded.spec.name == "wrn-16-1"
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(logits_of(loaded.model, x), logits_of(src, x))


# ---------------------------------------------------------------- messages


def test_cifar_stem_resnet18_is_named_whole_and_pointed_to_resnet18_cifar(tmp_path):
    src = create_model("resnet18-cifar", 10)
    torch.save(src.state_dict(), tmp_path / "r18.pt")
    with pytest.raises(CheckpointError) as err:
        read_model(tmp_path / "r18.pt", arch="resnet18")
    msg = str(err.value)
    assert "\n" not in msg
    assert "conv1.weight is 64×3×3×3 in the file but 64×3×7×7 in resnet18" in msg
    assert "pass --arch resnet18-cifar" in msg
    assert read_model(tmp_path / "r18.pt").spec.name == "resnet18-cifar"  # and without --arch it is inferred


def test_option_a_name_for_projection_weights_says_which_name_fits(tmp_path):
    torch.save({"model": lit_resnet("resnet56").state_dict()}, tmp_path / "r56.pth")
    with pytest.raises(CheckpointError, match=r"the weights are resnet56x1: pass --arch resnet56x1, or leave --arch out"):
        read_model(tmp_path / "r56.pth", arch="resnet56")


def test_prefix_hint_when_the_model_sits_beside_other_modules(tmp_path):
    src = create_model("wrn-16-1", 10).state_dict()
    extra = {f"{m}.weight": torch.zeros(3) for m in ("loss", "metric", "ema_decay", "aux")}
    torch.save({**{f"model.{k}": v for k, v in src.items()}, **extra}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError) as err:
        read_model(tmp_path / "mixed.pt", arch="wrn-16-1")
    msg = str(err.value)
    assert "strip the prefix model." in msg and "next to 4 other keys" in msg


def test_onnx_file_is_named_as_what_it_is(tmp_path):
    model = create_model("wrn-16-1", 10).eval()
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(tmp_path / "t.onnx"), external_data=False, dynamo=False)
    with pytest.raises(CheckpointError, match=r"is an ONNX model .*torch\.save\(model\.state_dict\(\), 'teacher\.pt'\)"):
        read_model(tmp_path / "t.onnx")
    (tmp_path / "t.bin").write_bytes((tmp_path / "t.onnx").read_bytes())  # any name: recognised by its content
    with pytest.raises(CheckpointError, match="is an ONNX model"):
        read_model(tmp_path / "t.bin")


def test_safetensors_state_dict_loads(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    src = randomise_bn(create_model("resnet8x4", 100))
    safetensors.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "model.safetensors"))
    loaded = read_model(tmp_path / "model.safetensors")
    x = torch.randn(2, 3, 32, 32)
    assert loaded.spec.name == "resnet8x4" and torch.equal(logits_of(loaded.model, x), logits_of(src, x))


def test_torchscript_source_and_recipe(tmp_path):
    from compressor.models.importers import not_rebuildable

    torch.jit.save(torch.jit.trace(create_model("wrn-16-1", 10).eval(), torch.randn(1, 3, 32, 32)), str(tmp_path / "ts.pt"))
    loaded = read_model(tmp_path / "ts.pt")
    assert loaded.spec.family == "module" and loaded.source == "a TorchScript file (torch.jit.save)"
    msg = not_rebuildable(tmp_path / "ts.pt", loaded.source)
    assert "TorchScript" in msg and f"torch.jit.load('{tmp_path / 'ts.pt'}').state_dict()" in msg
    # and the recipe works: its state_dict loads with the architecture inferred
    torch.save(torch.jit.load(str(tmp_path / "ts.pt")).state_dict(), tmp_path / "sd.pt")
    assert read_model(tmp_path / "sd.pt").spec.name == "wrn-16-1"


def test_notes_are_json_friendly_one_liners(tmp_path):
    torch.save({"model": lit_resnet("resnet8x4").state_dict()}, tmp_path / "a.pth")
    loaded = read_model(tmp_path / "a.pth")
    json.dumps(loaded.notes)
    assert loaded.notes and all("\n" not in n for n in loaded.notes)


# ---------------------------------------------------------------- models that return more than logits


class DictHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = create_model("wrn-16-1", 10)

    def forward(self, x):
        return {"logits": self.net(x), "aux": torch.zeros(1)}


class NoLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return {"features": self.conv(x)}


@pytest.mark.slow
def test_tuple_and_dict_outputs_become_logits_with_a_note():
    from compressor.models.outputs import ensure_logits

    x = torch.randn(2, 3, 32, 32)
    mdistiller_like = lit_resnet("resnet8x4", feats=True)
    want = mdistiller_like(x)[0]
    note = ensure_logits(mdistiller_like, x, "the teacher")
    assert note == "the teacher returns a tuple of 2; atc uses its first element (a 2×100 tensor) as the logits"
    assert torch.equal(mdistiller_like(x), want)
    assert ensure_logits(mdistiller_like, x) is None  # idempotent: now it returns logits
    head = DictHead().eval()
    assert "its 'logits' entry" in ensure_logits(head, x, "the teacher")
    assert head(x).shape == (2, 10)
    assert ensure_logits(create_model("wrn-16-1", 10), x) is None


def test_outputs_without_logits_are_refused_in_one_line():
    from compressor.errors import ModelError
    from compressor.models.outputs import ensure_logits

    with pytest.raises(ModelError, match=r"returns a dict with keys features; atc needs its logits") as err:
        ensure_logits(NoLogits(), torch.randn(2, 3, 32, 32), "the teacher")
    assert "\n" not in str(err.value)


def test_traced_stage_outputs_of_a_tuple_returning_teacher_give_logits():
    from compressor.models.outputs import ensure_logits

    x = torch.randn(2, 3, 32, 32)
    teacher = lit_resnet("resnet8x4", feats=True)
    ensure_logits(teacher, x)
    wrapped, note = stage_outputs(teacher, ["layer1", "layer2", "layer3"], x)
    with torch.no_grad():
        logits, maps = wrapped(x)
    assert torch.allclose(logits, teacher(x), atol=1e-6) and [m.shape[-1] for m in maps] == [32, 16, 8]
