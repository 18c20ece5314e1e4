"""A procedurally generated dataset with known object masks, for measuring where networks look.

Each image holds one shape (circle, square, triangle, cross or ring; the shape is the class) of
random colour, size, rotation and position on a random textured background (a blend of
stripes and smooth noise in two random colours, plus pixel noise); half of the images also
carry a thin line in another colour as a distractor, which is not part of the object. Shapes
are drawn at 2× resolution and averaged down, so edges are anti-aliased; a pixel belongs to
the object mask when at least half of it is covered.

Everything is a pure function of the seed: ``load_shapes(seed=0)`` returns the same tensors on
every machine. ``--data shapes`` in ``atc train``/``compress``/``attention`` uses it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from compressor.data.images import ImageData, subset_indices

CLASSES = ("circle", "square", "triangle", "cross", "ring")

TRAIN_SIZE, TEST_SIZE = 6000, 1000

_SS = 2  # supersampling factor


@dataclass
class ShapesData(ImageData):
    """``ImageData`` plus boolean object masks (N×H×W) for both splits."""

    train_masks: torch.Tensor | None = None
    test_masks: torch.Tensor | None = None

    def subset(self, train: int = 0, test: int = 0, seed: int = 0) -> "ShapesData":
        g = torch.Generator().manual_seed(seed)
        it, iv = subset_indices(len(self.train_y), train, g), subset_indices(len(self.test_y), test, g)
        take = lambda t, i: t if i is None or t is None else t[i]  # noqa: E731
        return dataclasses.replace(self, train_x=take(self.train_x, it), train_y=take(self.train_y, it),
                                   test_x=take(self.test_x, iv), test_y=take(self.test_y, iv),
                                   train_masks=take(self.train_masks, it), test_masks=take(self.test_masks, iv))


def _smooth_noise(rng: np.random.Generator, n: int, size: int, cells: int = 4) -> np.ndarray:
    """n×size×size values in [0, 1]: a bicubic upsampling of a random cells×cells grid."""
    grid = torch.from_numpy(rng.random((n, 1, cells, cells), dtype=np.float32))
    up = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)[:, 0]
    return up.clamp(0, 1).numpy()


def _inside(kind: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray, ang: np.ndarray) -> np.ndarray:
    """Which points (dx, dy relative to each centre; n×S×S) lie inside shape ``kind`` of radius r, angle ang."""
    r, ang = r[:, None, None], ang[:, None, None]
    u = np.cos(ang) * dx + np.sin(ang) * dy
    v = -np.sin(ang) * dx + np.cos(ang) * dy
    name = CLASSES[kind]
    if name in ("circle", "ring"):
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2) if name == "ring" else d2 <= r * r
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if name == "triangle":  # equilateral, circumradius 1.2 r: three half-planes at distance 0.6 r
        return np.all([np.cos(a) * u + np.sin(a) * v <= 0.6 * r for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)], axis=0)
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3 * r) & (av <= r)) | ((av <= 0.3 * r) & (au <= r))  # cross


def _segment(dx: np.ndarray, dy: np.ndarray, length: np.ndarray, ang: np.ndarray, half_width: float) -> np.ndarray:
    length, ang = length[:, None, None], ang[:, None, None]
    along = np.cos(ang) * dx + np.sin(ang) * dy
    across = -np.sin(ang) * dx + np.cos(ang) * dy
    return (np.abs(along) <= length / 2) & (np.abs(across) <= half_width)


def render(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` images (uint8 n×3×size×size), labels (int64) and object masks (bool n×size×size)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    rng.shuffle(y)
    # Background: stripes and smooth noise blended, in two random colours, with pixel noise.
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    gx, gy = np.meshgrid(coords, coords)
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731  (float32 throughout: half the memory traffic)
    freq, s_ang, phase = f32(rng.uniform(2, 6, n)), f32(rng.uniform(0, np.pi, n)), f32(rng.uniform(0, 2 * np.pi, n))
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq[:, None, None] * (np.cos(s_ang)[:, None, None] * gx + np.sin(s_ang)[:, None, None] * gy)
                                 + phase[:, None, None])
    mix = f32(rng.uniform(0, 1, n))[:, None, None]
    t = mix * stripes + (1 - mix) * _smooth_noise(rng, n, size)
    c1, c2 = f32(rng.uniform(0, 1, (n, 3))), f32(rng.uniform(0, 1, (n, 3)))
    img = c1[:, :, None, None] * (1 - t[:, None]) + c2[:, :, None, None] * t[:, None]
    # Object colour: random, pushed away from the background's mean colour when too close.
    obj = f32(rng.uniform(0, 1, (n, 3)))
    bg_mean = (c1 + c2) / 2
    close = np.linalg.norm(obj - bg_mean, axis=1) < 0.45
    obj[close] = np.clip(1 - bg_mean[close] + rng.normal(0, 0.05, (int(close.sum()), 3)), 0, 1)
    obj_tex = obj[:, :, None, None] * (0.8 + 0.2 * _smooth_noise(rng, n, size)[:, None])
    # Geometry on the supersampled grid, in pixels of the final image.
    r = f32(rng.uniform(0.17, 0.3, n) * size)
    cx, cy = f32(rng.uniform(0, 1, (2, n)) * (size - 2.4 * r) + 1.2 * r)
    ang = f32(rng.uniform(0, 2 * np.pi, n))
    fine = (np.arange(size * _SS, dtype=np.float32) + 0.5) / _SS
    fx, fy = np.meshgrid(fine, fine)
    has_line = rng.uniform(0, 1, n) < 0.5
    lx, ly, l_len, l_ang = (f32(v) for v in (rng.uniform(0, size, n), rng.uniform(0, size, n), rng.uniform(0.3, 0.6, n) * size,
                                             rng.uniform(0, np.pi, n)))
    l_col = f32(rng.uniform(0, 1, (n, 3)))
    cover = np.empty((n, size, size), np.float32)
    line_cover = np.empty((n, size, size), np.float32)
    for lo in range(0, n, 500):  # chunks keep the supersampled arrays small
        sl = slice(lo, min(lo + 500, n))
        dx, dy = fx[None] - cx[sl, None, None], fy[None] - cy[sl, None, None]
        for k in range(len(CLASSES)):
            idx = np.flatnonzero(y[sl] == k)
            inside = _inside(k, dx[idx], dy[idx], r[sl][idx], ang[sl][idx]).astype(np.float32)
            cover[lo + idx] = inside.reshape(-1, size, _SS, size, _SS).mean(axis=(2, 4))
        seg = _segment(fx[None] - lx[sl, None, None], fy[None] - ly[sl, None, None], l_len[sl], l_ang[sl], 0.6)
        seg &= has_line[sl, None, None]
        line_cover[sl] = seg.astype(np.float32).reshape(-1, size, _SS, size, _SS).mean(axis=(2, 4))
    img = img * (1 - line_cover[:, None]) + l_col[:, :, None, None] * line_cover[:, None]
    img = img * (1 - cover[:, None]) + obj_tex * cover[:, None]
    img = img + 0.03 * rng.standard_normal(img.shape, dtype=np.float32)
    x = torch.from_numpy(np.clip(np.round(img * 255), 0, 255).astype(np.uint8))
    return x, torch.from_numpy(y.astype(np.int64)), torch.from_numpy(cover >= 0.5)


def load_shapes(image_size: int = 32, train: int = TRAIN_SIZE, test: int = TEST_SIZE, seed: int = 0) -> ShapesData:
    """The shapes dataset: ``train``/``test`` images of ``image_size``², five classes, with masks."""
    tx, ty, tm = render(train, image_size, seed * 2)
    vx, vy, vm = render(test, image_size, seed * 2 + 1)
    return ShapesData("shapes", tx, ty, vx, vy, list(CLASSES), [], train_masks=tm, test_masks=vm)
