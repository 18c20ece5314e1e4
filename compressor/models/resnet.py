"""ResNets: the CIFAR family of He et al. (resnet20/32/56/110), the CIFAR family of the KD
literature (resnet8x4, resnet32x4, resnet56x1 …) and torchvision's ImageNet ones.

The KD literature's CIFAR ResNet (RepDistiller, mdistiller, torchdistill) differs from He et al.'s
"option A" net in its shortcuts (1x1 convolution + BN wherever the shape changes, as in torchvision)
and in having a stem width of its own: ``resnet32x4`` has a 32-channel stem before stages of
64/128/256 channels. Its module names are those projects' (``layer2.0.downsample.0``), so their
state_dicts load unchanged. Their blocks return ``(out, preact)``; these return ``out`` alone, the
stage output attention transfer uses.

The ImageNet ResNet here keeps torchvision's module names (``conv1``, ``layer1``…``fc``), so
torchvision state_dicts load unchanged, and adds two knobs the derivation needs: blocks per
stage (``layers``) and a width multiplier. ``cifar_stem`` swaps the 7x7/2 stem and max-pool for
a 3x3/1 convolution, the usual way to train these nets on 32x32 images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv


class ChannelPadShortcut(nn.Module):
    """CIFAR ResNet "option A" shortcut: subsample spatially, zero-pad the new channels."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class CifarBasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        needs_shortcut = stride != 1 or in_ch != out_ch
        self.shortcut = ChannelPadShortcut(in_ch, out_ch, stride) if needs_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


def blocks_per_stage(depth: int) -> int:
    """n of a CIFAR ResNet of depth 6n+2."""
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    return (depth - 2) // 6


class _ThreeStageNet(nn.Module):
    """What both CIFAR ResNets share: a 3x3 stem, three stages of ``n`` blocks (strides 1/2/2), global
    average pooling and a linear head, under the module names ``conv1 bn1 layer1-3 fc``."""

    def _build(self, block: type[nn.Module], in_channels: int, stem: int, widths: list[int], n: int, num_classes: int) -> None:
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        stages, in_ch = [], stem
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[block(in_ch if b == 0 else w, w, stride if b == 0 else 1) for b in range(n)]))
            in_ch = w
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class CifarResNet(_ThreeStageNet):
    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self._build(CifarBasicBlock, in_channels, width, [width, 2 * width, 4 * width], blocks_per_stage(depth), num_classes)


class ScalableResNet(tv.ResNet):
    """torchvision's ResNet with per-stage depth and a width multiplier."""

    def __init__(self, block: str = "basic", layers: list[int] = (2, 2, 2, 2), width: float = 1.0,
                 num_classes: int = 1000, cifar_stem: bool = False):
        block_cls = tv.BasicBlock if block == "basic" else tv.Bottleneck
        super().__init__(block_cls, list(layers), num_classes=num_classes)
        if width != 1.0 or cifar_stem:
            self._rebuild(block_cls, list(layers), width, num_classes, cifar_stem)

    def _rebuild(self, block_cls, layers, width, num_classes, cifar_stem) -> None:
        widths = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        self.dilation = 1
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(block_cls, widths[0], layers[0])
        self.layer2 = self._make_layer(block_cls, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block_cls, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block_cls, widths[3], layers[3], stride=2)
        self.fc = nn.Linear(widths[3] * block_cls.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def kd_resnet_stem(k: float) -> int:
    """The stem width of ``resnetDxK``: 16K channels, at most 32 (RepDistiller's resnet8x4/resnet32x4)."""
    return max(1, int(round(min(16 * k, 32))))


class ProjectionBlock(nn.Module):
    """Post-activation basic block whose shortcut is a 1x1 convolution + BN where the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        needs_projection = stride != 1 or in_ch != out_ch
        self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)) \
            if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class KdCifarResNet(_ThreeStageNet):
    """``resnetDxK``: depth D = 6n+2, three stages of n blocks with 16K/32K/64K channels (strides
    1/2/2) after a 3x3 stem of ``stem`` channels (default ``kd_resnet_stem(K)``)."""

    def __init__(self, depth: int = 56, k: float = 1, stem: int | None = None, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        widths = [max(1, int(round(c * k))) for c in (16, 32, 64)]
        self._build(ProjectionBlock, in_channels, stem or kd_resnet_stem(k), widths, blocks_per_stage(depth), num_classes)
