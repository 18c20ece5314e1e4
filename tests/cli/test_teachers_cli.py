"""Teachers from other projects at the command line: what atc says when it reads them, and the
one-line refusals for files it cannot distil from."""

from __future__ import annotations

import textwrap

import pytest
import torch

from compressor.models import create_model
from tests.helpers import assert_error, make_image_folder

# mdistiller's CIFAR ResNet in brief: blocks that end a stage return (out, preact), the net (logits, feats).
MDISTILLER_FILE = textwrap.dedent('''
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride, last):
            super().__init__()
            self.last = last
            self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            res = x if self.downsample is None else self.downsample(x)
            pre = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + res
            return (F.relu(pre), pre) if self.last else F.relu(pre)

    class ResNet8x4(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
            self.layer1 = nn.Sequential(Block(32, 64, 1, True))
            self.layer2 = nn.Sequential(Block(64, 128, 2, True))
            self.layer3 = nn.Sequential(Block(128, 256, 2, True))
            self.fc = nn.Linear(256, num_classes)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x, p1 = self.layer1(x)
            x, p2 = self.layer2(x)
            x, p3 = self.layer3(x)
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1)), {"preact_feats": [p1, p2, p3]}
''')


@pytest.fixture(scope="module")
def folder32(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("d") / "tiny32", classes=3, per_class=6, size=32)


@pytest.mark.slow
def test_repdistiller_teacher_without_arch_is_inferred_and_paired_at_its_stages(atc, folder32, tmp_path):
    torch.save({"epoch": 240, "model": create_model("resnet8x4", 3).state_dict(), "accuracy": 70.0}, tmp_path / "ckpt.pth")
    r = atc("compress", "--teacher", str(tmp_path / "ckpt.pth"), "--data", str(folder32), "--preset", "cifar",
            "--student", "resnet8x1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "teacher: inferred --arch resnet8x4 from the weights" in r.stderr
    assert "layer1 16×32×32  ↔  layer1 64×32×32" in r.stderr and "downsample" not in r.stderr


def test_a_teacher_returning_logits_and_features_runs_with_notes(atc, folder32, tmp_path):
    (tmp_path / "md.py").write_text(MDISTILLER_FILE)
    import importlib.util

    spec = importlib.util.spec_from_file_location("md_for_test", tmp_path / "md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save({"model": module.ResNet8x4(num_classes=3).state_dict()}, tmp_path / "student_best")
    r = atc("compress", "--teacher", str(tmp_path / "student_best"), "--arch", f"{tmp_path / 'md.py'}:ResNet8x4",
            "--data", str(folder32), "--preset", "cifar", "--student", "resnet8x1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "teacher: the teacher returns a tuple of 2; atc uses its first element (a 2×3 tensor) as the logits" in r.stderr
    assert "↔  layer1[0] 64×32×32  ([0]: the first tensor of the module's tuple output)" in r.stderr


def test_torchscript_teacher_is_named_with_the_recipe(atc, folder32, tmp_path):
    scripted = torch.jit.trace(create_model("resnet8x1", 3).eval(), torch.zeros(1, 3, 32, 32))
    torch.jit.save(scripted, str(tmp_path / "ts.pt"))
    r = atc("compress", "--teacher", str(tmp_path / "ts.pt"), "--data", str(folder32), "--dry-run")
    line = assert_error(r, "is a TorchScript file (torch.jit.save): atc can run it but not rebuild its architecture by name")
    assert f"torch.jit.load('{tmp_path / 'ts.pt'}').state_dict()" in line


def test_onnx_teacher_is_named_as_onnx(atc, folder32, tmp_path):
    torch.onnx.export(create_model("resnet8x1", 3).eval(), (torch.zeros(1, 3, 32, 32),), str(tmp_path / "t.onnx"),
                      external_data=False, dynamo=False)
    r = atc("compress", "--teacher", str(tmp_path / "t.onnx"), "--data", str(folder32), "--dry-run")
    assert_error(r, "is an ONNX model (an inference graph, made by pytorch), not PyTorch weights")


def test_inspect_says_what_a_file_is_without_data(atc, tmp_path):
    import argparse
    import json

    torch.save({"opt": argparse.Namespace(model="resnet8x4", dataset="cifar100"), "model": create_model("resnet8x4", 100).state_dict(),
                "optimizer": {}}, tmp_path / "resnet8x4_last.pth")
    r = atc("inspect", str(tmp_path / "resnet8x4_last.pth"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "a RepDistiller checkpoint (_last.pth)" and info["container"] == "a torch.save zip archive"
    assert (info["architecture"], info["family"], info["architecture_from"]) == ("resnet8x4", "kd_resnet", "named by the file")
    assert info["num_classes"] == 100 and info["input_size"] == [3, 32, 32] and info["params"] == 1_233_540
    assert info["mean"] == [0.5071, 0.4867, 0.4408] and "RepDistiller's CIFAR-100 loader" in info["normalisation_from"]
    assert info["output"] == "logits"

    torch.save(create_model("wrn-16-1", 10).state_dict(), tmp_path / "sd.pt")
    info = json.loads(atc("inspect", str(tmp_path / "sd.pt"), "--json", "--preset", "demo").stdout)
    assert info["architecture"] == "wrn-16-1" and info["architecture_from"] == "inferred from the weights"
    assert info["input_size"] == [3, 16, 16] and info["mean"] is None and "pass --mean/--std" in info["normalisation_from"]
    info = json.loads(atc("inspect", str(tmp_path / "sd.pt"), "--json", "--mean", "0.1307", "--std", "0.3081").stdout)
    assert info["mean"] == [0.1307] * 3 and info["normalisation_from"] == "from --mean/--std"
    human = atc("inspect", str(tmp_path / "sd.pt"))
    assert human.returncode == 0 and "wrn-16-1 (family wrn; inferred from the weights)" in human.stdout


def test_inspect_refuses_what_it_cannot_rebuild_in_one_line(atc, tmp_path):
    torch.jit.save(torch.jit.trace(create_model("resnet8x1", 3).eval(), torch.zeros(1, 3, 32, 32)), str(tmp_path / "ts.pt"))
    assert_error(atc("inspect", str(tmp_path / "ts.pt")), "is a TorchScript file (torch.jit.save)")
    assert_error(atc("inspect", str(tmp_path / "ts.pt"), "--mean", "0.5"), "--mean/--std: give both the mean and the std")


@pytest.mark.slow
def test_train_and_export_a_model_returning_logits_and_features(atc, folder32, tmp_path):
    (tmp_path / "md.py").write_text(MDISTILLER_FILE)
    arch = f"{tmp_path / 'md.py'}:ResNet8x4"
    r = atc("train", "--arch", arch, "--data", str(folder32), "--preset", "demo", "--epochs", "1", "--out", str(tmp_path / "m.pt"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "ResNet8x4 returns a tuple of 2; atc uses its first element" in r.stderr
    r = atc("export", str(tmp_path / "m.pt"), "--arch", arch, "--out", str(tmp_path / "m.onnx"))  # its file: named again (issue 21)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    import onnx

    assert [o.name for o in onnx.load(str(tmp_path / "m.onnx")).graph.output] == ["logits"]
