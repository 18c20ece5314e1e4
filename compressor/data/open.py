"""The one door to data: open a dataset by name or path (the bundled ``digits``, the generated
``shapes``, torchvision's CIFAR-10/100 folders ``cifar-10-batches-py``/``cifar-100-python``, or an
ImageFolder tree with ``train/`` and ``test/`` or ``val/``), in memory or, for training on a device
it does not fit, streamed.

Both kinds implement ``Dataset``: ``ImageData`` (``compressor.data.images``: uint8 tensors on the
device) and ``StreamingData`` (``compressor.data.streaming``: files read by a DataLoader). The rest
of atc sees a ``Dataset`` and asks for batches through ``compressor.distill.loop.make_batches``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from compressor.data.budget import decide, default_workers
from compressor.data.folders import find_layout, load_image_folder
from compressor.data.images import ImageData, with_source
from compressor.data.streaming import StreamingData, decode_subset
from compressor.errors import DataError
from compressor.events import SILENT, Reporter


class Dataset(Protocol):
    """What every step reads of a dataset, whether it is held in memory or streamed: its name, class
    names and labels, image size, what was done to the source images (for the report), the training
    images' channel statistics and a subset of the same images."""

    name: str
    class_names: list[str]
    skipped_files: list[str]
    source_channels: tuple[int, ...]
    resized_images: int
    resized_from: tuple[int, int] | None
    notes: list[str]

    @property
    def train_y(self) -> torch.Tensor: ...

    @property
    def test_y(self) -> torch.Tensor: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def input_size(self) -> tuple[int, int, int]: ...

    def channel_stats(self) -> tuple[list[float], list[float]]: ...

    def subset(self, train: int = 0, test: int = 0, seed: int = 0) -> "Dataset": ...


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


def check_generated_size(name: str, images: int, size: int) -> None:
    """Refuse to make ``images`` RGB images of ``size``² in memory when they could not fit the RAM:
    numpy or torch would otherwise try the allocation (terabytes, for a mistyped image size)."""
    from compressor.data.budget import available_ram

    need = images * 3 * size * size * 5  # uint8 images, and float working copies while they are made
    if need > available_ram():
        raise DataError(f"data.image_size {size} would make {name} take {need / 1e9:,.0f} GB while it is built ({images:,} images "
                        f"of 3x{size}x{size}), more than the {available_ram() / 1e9:,.0f} GB of RAM available; "
                        "use a smaller data.image_size")


def open_dataset(spec: str | os.PathLike, image_size: int | None = None, strict: bool = False,
                 reporter: Reporter = SILENT) -> ImageData:
    """Load the dataset named by ``spec``: ``digits`` or a folder in a supported layout (``reporter``: the
    progress of decoding a folder's images the first time)."""
    if str(spec) == "digits":
        check_generated_size("digits", 1797, image_size or 16)
        return load_digits(image_size or 16)
    if str(spec) == "shapes":  # generated shapes with object masks (compressor/data/shapes.py)
        from compressor.data.shapes import TEST_SIZE, TRAIN_SIZE, load_shapes

        check_generated_size("shapes", TRAIN_SIZE + TEST_SIZE, image_size or 32)
        return load_shapes(image_size or 32)
    kind, root = find_layout(Path(spec).expanduser())
    if kind in ("cifar10", "cifar100"):
        return _load_torchvision_cifar(root, kind == "cifar100")
    return load_image_folder(root, image_size, strict, reporter)


def open_for_device(spec: str | os.PathLike, image_size: int | None, device: torch.device, *, strict: bool = False,
                    train_subset: int = 0, test_subset: int = 0, budget_bytes: int | None = None, workers: int | None = None,
                    reporter: Reporter = SILENT) -> Dataset:
    """``spec`` opened for training on ``device``: in memory when it fits the budget, else streamed.

    The subset (``train_subset``/``test_subset``, picked with seed 0 as ``ImageData.subset`` does) is
    taken before the decision, so a small subset of a large folder is decoded, not streamed.
    """
    workers = default_workers() if workers is None else workers
    folder = None
    if str(spec) not in ("digits", "shapes"):
        kind, root = find_layout(Path(spec).expanduser())
        folder = root if kind == "folder" else None
    if folder is not None and image_size:
        full = StreamingData.from_folder(folder, image_size, strict)
        lazy = full.subset(train_subset, test_subset, seed=0)
        res = decide(lazy.nbytes(), len(lazy.train) + len(lazy.test), device, budget_bytes, decode_in_ram=True)
        reporter.info(res.message(workers))
        if not res.fits:
            return lazy
        if lazy is full or decide(full.nbytes(), 0, torch.device("cpu"), budget_bytes).fits:
            # the in-memory path, unchanged: decode the whole folder once (cached), then take the subset
            return open_dataset(spec, image_size=image_size, strict=strict, reporter=reporter).subset(train_subset, test_subset, seed=0)
        reporter.info(f"decoding the {len(lazy.train) + len(lazy.test):,} images of the subset")
        return decode_subset(lazy)
    data = open_dataset(spec, image_size=image_size, strict=strict, reporter=reporter).subset(train_subset, test_subset, seed=0)
    need = sum(t.numel() * t.element_size() for t in (data.train_x, data.train_y, data.test_x, data.test_y))
    res = decide(need, len(data.train_y) + len(data.test_y), device, budget_bytes)
    reporter.info(res.message(workers))
    return data if res.fits else StreamingData.from_memory(data)
