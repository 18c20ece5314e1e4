"""Open a dataset by name or path: the bundled digits, the generated shapes, a torchvision CIFAR
folder, or an ImageFolder tree."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from compressor.data.folders import find_layout, load_image_folder
from compressor.data.images import ImageData, with_source
from compressor.errors import DataError


def load_digits(image_size: int = 16) -> ImageData:
    """scikit-learn's 1,797 handwritten digits, upscaled to ``image_size`` and made RGB; 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images).float().div(16).unsqueeze(1)  # values 0..16
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    tr, te = perm[:cut].sort().values, perm[cut:].sort().values
    data = ImageData("digits", x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)])
    return with_source(data, [1], len(y) if image_size != 8 else 0, [[8, 8]])


def _load_torchvision_cifar(root: Path, hundred: bool) -> ImageData:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR100 if hundred else CIFAR10
    try:
        train, test = cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError as exc:
        raise DataError(f"{root}: the CIFAR files are incomplete or corrupt ({exc}); download them again") from exc

    def tensors(ds):
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.long)

    (tx, ty), (vx, vy) = tensors(train), tensors(test)
    return ImageData("cifar100" if hundred else "cifar10", tx, ty, vx, vy, list(train.classes))


def open_dataset(spec: str | os.PathLike, image_size: int | None = None, strict: bool = False) -> ImageData:
    """Load the dataset named by ``spec``: ``digits`` or a folder in a supported layout."""
    if str(spec) == "digits":
        return load_digits(image_size or 16)
    if str(spec) == "shapes":  # generated shapes with object masks (compressor/shapes.py)
        from compressor.data.shapes import load_shapes

        return load_shapes(image_size or 32)
    kind, root = find_layout(Path(spec).expanduser())
    if kind in ("cifar10", "cifar100"):
        return _load_torchvision_cifar(root, kind == "cifar100")
    return load_image_folder(root, image_size, strict)
