"""Augmentation of streamed images inside DataLoader workers: uint8 in, uint8 out.

Small images get the pad-and-crop and flip of the in-memory path; images of ``RRC_MIN_SIZE`` px
or more with no crop padding (the 224-px presets) get RandomResizedCrop and flip. The crop box is
written out here rather than taken from torchvision because torchvision draws from the global RNG,
and atc's augmentation of sample ``i`` in epoch ``e`` is a function of (seed, e, i) alone, so it
does not depend on the number of workers or on the order they run in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from compressor.data.images import Augment

RRC_MIN_SIZE = 64  # images this large or larger, with no crop padding, get RandomResizedCrop when streamed


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + index) % (1 << 63))


def random_resized_crop_box(h: int, w: int, g: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop covering a random share ``scale`` of the image with aspect
    ratio in ``ratio`` (log-uniform); ten tries, then the largest centred crop within ``ratio``."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(torch.rand(1, generator=g)))
        aspect = math.exp(log_lo + (log_hi - log_lo) * float(torch.rand(1, generator=g)))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class AugmentedSplit(torch.utils.data.Dataset):
    """Items are ``(index, epoch)`` pairs, so persistent workers see the epoch without being told."""

    def __init__(self, source, train: bool, augment: Augment, size: int, rrc: bool, seed: int):
        self.source, self.train, self.augment, self.size, self.rrc, self.seed = source, train, augment, size, rrc, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        """(pixels, label, skipped): an unreadable file is skipped for the next readable one, which
        brings its own label; ``skipped`` is the unreadable file's index (-1 when none), for the count."""
        i, epoch = item
        if not self.train:
            j, x = self.source.readable(i)
            return x, int(self.source.labels[j]), (i if j != i else -1)
        g = sample_generator(self.seed, epoch, i)
        if self.rrc:
            j, x = self.source.readable(i, native=True)
            top, left, ch, cw = random_resized_crop_box(x.shape[1], x.shape[2], g)
            x = x[None, :, top:top + ch, left:left + cw].float()
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
            x = x[0].round_().clamp_(0, 255).to(torch.uint8)
        else:
            j, x = self.source.readable(i)
            pad = self.augment.crop_padding
            if pad:
                h, w = x.shape[1:]
                dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=g))
                x = F.pad(x, (pad, pad, pad, pad))[:, dy:dy + h, dx:dx + w]
        label, skipped = int(self.source.labels[j]), (i if j != i else -1)
        if self.augment.flip and float(torch.rand(1, generator=g)) < 0.5:
            x = x.flip(2)
        return x.contiguous(), label, skipped
