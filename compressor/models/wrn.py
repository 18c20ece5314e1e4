"""Wide residual networks (Zagoruyko & Komodakis, 2016), the reference CIFAR definition.

WRN-d-k: d = 6n + 4, three groups of n pre-activation basic blocks with 16k, 32k and 64k
channels and strides 1, 2, 2; a 1x1 shortcut convolution wherever the shape changes; no
biases in convolutions. Attention transfer taps each group's output, which is taken before
the network's final BN-ReLU. ``wrn-D-K-td`` is torchdistill's variant of the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def init_wrn_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class PreActBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(in_ch)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv1 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.dropout = dropout
        needs_projection = in_ch != out_ch or stride != 1
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn0(x))
        y = self.conv0(o)
        y = F.relu(self.bn1(y))
        if self.dropout > 0:
            y = F.dropout(y, self.dropout, self.training)
        y = self.conv1(y)
        # The projection sees the pre-activated input, as in the reference code.
        return y + (self.shortcut(o) if self.shortcut is not None else x)


def wrn_widths(width: float) -> list[int]:
    return [16, int(round(16 * width)), int(round(32 * width)), int(round(64 * width))]


class WideResNet(nn.Module):
    def __init__(self, depth: int = 16, width: float = 1, num_classes: int = 10, dropout: float = 0.0, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = wrn_widths(width)
        self.conv0 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.group0 = self._group(widths[0], widths[1], n, 1, dropout)
        self.group1 = self._group(widths[1], widths[2], n, 2, dropout)
        self.group2 = self._group(widths[2], widths[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self._init_weights()

    @staticmethod
    def _group(in_ch: int, out_ch: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        blocks = [PreActBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, dropout) for i in range(n)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        init_wrn_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv0(x)
        x = self.group0(x)
        x = self.group1(x)
        x = self.group2(x)
        x = F.relu(self.bn(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class RawShortcutBlock(nn.Module):
    """torchdistill's WRN block: the same pre-activation block, but the 1x1 shortcut convolution
    takes the raw block input where the reference code's takes the pre-activated one (so the two
    nets compute different functions from the same weights). Module names are torchdistill's."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.dropout = dropout
        needs_projection = in_ch != out_ch or stride != 1
        self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        if self.dropout > 0:  # torchdistill drops before the second BN
            y = F.dropout(y, self.dropout, self.training)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (self.shortcut(x) if self.shortcut is not None else x)


class RawShortcutWideResNet(nn.Module):
    """``wrn-D-K-td``: WRN-D-K built from ``RawShortcutBlock``, with torchdistill's module names
    (``conv1``, ``layer1``…``layer3``, final ``bn1``, ``fc``)."""

    def __init__(self, depth: int = 16, width: float = 1, num_classes: int = 10, dropout: float = 0.0, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = wrn_widths(width)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers = []
        for i in range(3):
            layers.append(nn.Sequential(*[RawShortcutBlock(widths[i] if b == 0 else widths[i + 1], widths[i + 1],
                                                           (1 if i == 0 else 2) if b == 0 else 1, dropout) for b in range(n)]))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        init_wrn_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def foreign_wrn_key(key: str) -> str:
    """Map a key of the widespread public CIFAR WRN (``block1.layer.0.bn1.weight``) to ours."""
    parts = key.split(".")
    if parts[0].startswith("block") and len(parts) >= 4 and parts[1] == "layer":
        group = int(parts[0][len("block"):]) - 1
        renamed = {"bn1": "bn0", "conv1": "conv0", "bn2": "bn1", "conv2": "conv1", "convShortcut": "shortcut"}
        return ".".join([f"group{group}", parts[2], renamed.get(parts[3], parts[3])] + parts[4:])
    top = {"conv1": "conv0", "bn1": "bn"}
    if parts[0] in top:
        return ".".join([top[parts[0]]] + parts[1:])
    return key


def looks_like_foreign_wrn(state_dict: dict) -> bool:
    return any(k.startswith("block1.layer.0.") for k in state_dict)
